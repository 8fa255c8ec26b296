"""The trainer: exact resume, checkpoint safety under SIGKILL, NaN handling, regimes, TP/PP e2e."""
import json
import os

import pytest
import torch

from agro_megatron.testing import train_checks as tc
from agro_megatron.testing.distributed import launcher_free_env, run_distributed
from agro_megatron.train import state as ckpt

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(tmp, reward="length_reward", world=1, **overrides):
    return run_distributed(tc.run, world, args=(str(tmp), reward, overrides))


# Every scalar the trainer promises in TensorBoard each step (issue: Observability).
STEP_SCALARS = [
    "train/reward_mean", "train/reward_std", "train/accuracy", "train/response_length", "train/kl",
    "train/kl_full_vocab", "train/entropy", "train/advantage_mean", "train/advantage_rms",
    "train/pg_term_norm", "train/ratio_term_norm", "train/grad_norm", "train/lr", "train/loss",
    "perf/tokens_per_s", "time/rollout_s", "time/reward_s", "time/logprob_s", "time/train_s",
    "time/sync_s", "data/replay_fraction",
]


def _tensorboard_scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_after_sigterm_is_bit_exact(tmp_path, dtype):
    # bf16: megatron's mixed-precision optimizer (fp32 master weights) saved and restored
    full = _run(tmp_path / "full", **{"model.dtype": dtype})[0]
    assert not full["stopped"] and full["steps"] == 4
    tb = _tensorboard_scalars(tmp_path / "full")
    for tag in STEP_SCALARS:
        assert [step for step, _ in tb.get(tag, [])] == [1, 2, 3, 4], tag
    assert all(v > 0 for _, v in tb["time/rollout_s"] + tb["time/reward_s"] + tb["perf/tokens_per_s"])
    # agro_on, fully on-policy: both parts of the gradient are live, nothing is replayed
    assert all(v > 0 for _, v in tb["train/pg_term_norm"] + tb["train/ratio_term_norm"])
    assert all(v == 0 for _, v in tb["data/replay_fraction"])
    stopped = _run(tmp_path / "split", reward="sigterm_on_third_call", **{"model.dtype": dtype})[0]
    # reward calls: eval-before, step 1, step 2 (signal) -> stops after step 2 with a checkpoint
    assert stopped["stopped"] and stopped["steps"] == 2
    resumed = _run(tmp_path / "split", **{"model.dtype": dtype})[0]
    assert resumed["steps"] == 4
    assert resumed["losses"] == full["losses"]          # same losses, every step
    assert any(loss != 0.0 for _, loss in resumed["losses"])  # the run really learned something
    for k, v in full["weights"].items():
        assert torch.equal(v, resumed["weights"][k]), k  # bit-exact weights
    assert ckpt.latest_checkpoint(str(tmp_path / "split" / "checkpoints")).endswith("step_000004")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    with pytest.raises(RuntimeError):
        run_distributed(tc.run_killed_during_save, 1, args=(str(tmp_path), 2))
    root = str(tmp_path / "checkpoints")
    leftovers = [n for n in os.listdir(root) if ".tmp-" in n]
    assert leftovers, "the kill should have left a partial save behind"
    assert ckpt.latest_checkpoint(root).endswith("step_000001")
    resumed = _run(tmp_path)[0]
    assert resumed["steps"] == 4
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # cleaned by the next save


def test_nan_reward_skips_step_and_repeated_failures_stop(tmp_path):
    out = run_distributed(tc.run_each, 1, args=(str(tmp_path), {
        "once": ("nan_reward_on_second_call", {"checkpoint.save_every": 0}),
        "always": ("always_nan_reward", {"checkpoint.save_every": 0})}))[0]
    once = out["once"]
    skipped = [r["step"] for r in once["history"] if r.get("train/skipped") == 1.0]
    # reward calls: eval-before, then step 1 (NaN): step 1 is skipped, the run goes on
    assert skipped == [1] and once["steps"] == 4
    assert "consecutive steps had non-finite loss or reward" in out["always"]["error"]


REGIMES_AND_ESTIMATORS = {
    "replay": {"algorithm.regime": "replay", "algorithm.replay_p": 0.5, "data.synthetic_train_size": 4},
    "stale": {"algorithm.regime": "stale", "algorithm.staleness": 2, "algorithm.estimator": "agro_off"},
    "kl_pg": {"algorithm.estimator": "kl_pg", "checkpoint.save_every": 0},
    "local_kl": {"algorithm.token_estimator": "local_kl", "checkpoint.save_every": 0},
    "epochs2_mean": {"algorithm.epochs_per_batch": 2, "algorithm.logratio_reduction": "mean",
                     "checkpoint.save_every": 0},
}


@pytest.fixture(scope="module")
def regime_runs(tmp_path_factory):
    """Every run of REGIMES_AND_ESTIMATORS, one after another in one launch."""
    root = tmp_path_factory.mktemp("regimes")
    runs = {name: ("length_reward", o) for name, o in REGIMES_AND_ESTIMATORS.items()}
    return run_distributed(tc.run_each, 1, args=(str(root), runs))[0]


@pytest.mark.parametrize("name", sorted(REGIMES_AND_ESTIMATORS))
def test_regimes_and_estimators_run(regime_runs, name):
    out, overrides = regime_runs[name], REGIMES_AND_ESTIMATORS[name]
    assert "error" not in out, out.get("error")
    assert out["steps"] == 4
    hist = [r for r in out["history"] if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in hist)
    if overrides.get("algorithm.regime") in ("replay", "stale"):
        # some samples after step 1 are off-policy (replayed / generated by an older policy)
        assert max(r["data/replay_fraction"] for r in hist[1:]) > 0
    if overrides.get("algorithm.regime") == "stale":
        assert hist[0]["data/replay_fraction"] == 0.0  # nothing older than the start exists


# The README's main command, shortened (fewer SFT and RL steps, fewer eval samples), launched the
# way a user does on one node: torchrun, 2 ranks, at TP=2 and at PP=2.
DEMO_SHORT = ["sft.steps=20", "train.steps=2", "eval.every=1", "eval.n=2", "eval.max_problems=6",
              "rollout.n=2", "train.prompts_per_step=2", "checkpoint.save_every=1", "logging.progress=false"]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_demo_command_at_tp2_and_pp2(tmp_path, tp, pp):
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "agro_megatron.train", "examples/tiny_cpu.yaml", f"parallel.tp={tp}", f"parallel.pp={pp}",
           f"logging.dir={tmp_path}", *DEMO_SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launcher_free_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"heldout_accuracy before=(\d\.\d{4}) after=(\d\.\d{4})", lines[-1])
    assert m, lines[-5:]
    assert sum(line.startswith("heldout_accuracy") for line in lines) == 1  # one logging rank
    result = json.loads((tmp_path / "result.json").read_text())
    assert (f"{result['before']:.4f}", f"{result['after']:.4f}") == m.groups()
    assert result["layout"] == {"tp": tp, "pp": pp, "cp": 1, "dp": 1} and result["steps"] == 2
    assert (tmp_path / "sft_model").is_dir()  # the SFT stage ran first
    assert ckpt.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("step_000002")
    with open(tmp_path / "training.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "eval/accuracy" in r] == [0, 1, 2]


@pytest.mark.parametrize("tp,pp,cp", [(1, 1, 1), (1, 1, 2)], ids=["dp2", "cp2"])
def test_e2e_parallel_layouts(tmp_path, tp, pp, cp):
    outs = run_distributed(tc.run, 2, args=(str(tmp_path), "length_reward",
                                            {"parallel.tp": tp, "parallel.pp": pp, "parallel.cp": cp,
                                             "train.steps": 2}))
    assert all(o["steps"] == 2 for o in outs)
    assert all(o["layout"] == {"tp": tp, "pp": pp, "cp": cp, "dp": 2 // (tp * pp * cp)} for o in outs)
    assert ckpt.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("step_000002")
    assert os.listdir(tmp_path / "tensorboard")
    logging_ranks = [o for o in outs if o["losses"]]  # last pipeline stage, TP rank 0, DP rank 0
    assert len(logging_ranks) == 1
    assert [s for s, _ in logging_ranks[0]["losses"]] == [1, 2]


def test_paper_configs_run_shrunk_at_their_layout(tmp_path):
    """Every examples/paper config runs through the trainer with what a CPU cannot have swapped
    out (8B checkpoint, MATH files, vLLM: train_checks.SHRINK_PAPER) and the rest kept: TP=2, bf16,
    the algorithm, regime and optimizer settings."""
    import glob
    import math

    paths = sorted(p for p in glob.glob("examples/paper/*.yaml") if not p.endswith("llama3_8b_math.yaml"))
    assert len(paths) == 7
    outs = run_distributed(tc.run_paper_configs_shrunk, 2, args=(paths, str(tmp_path), 2))
    runs = outs[0]  # rank 0: TP rank 0 of the only pipeline stage, the logging rank
    assert sorted(runs) == sorted(os.path.basename(p)[:-5] for p in paths)
    for name, r in runs.items():
        assert r["steps"] == 2 and r["tp"] == 2 and r["dtype"] == "bf16", name
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]), name
        expected = 1.0 if r["regime"] == "offline" else 0.0  # offline samples are all off-policy
        if r["regime"] != "replay":
            assert r["replay_fraction"] == [expected, expected], name
    assert runs["offline_kl_pg"]["estimator"] == "kl_pg" and runs["replay_agro_on"]["regime"] == "replay"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_starting_weights_reach_the_optimizer(tmp_path, dtype):
    """A learning-rate-0 step leaves the loaded (SFT) weights as they are: in bf16 the optimizer's
    fp32 master copies were taken at build time, before the weights were loaded, and used to
    overwrite them with the random initialisation at the first step."""
    out = run_distributed(tc.zero_lr_step_keeps_loaded_weights, 1, args=(str(tmp_path), dtype))[0]
    assert out["skipped"] == 0.0 and out["checked"] > 10
    assert out["changed"] == [], out["changed"][:5]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_at_dp2_is_bit_exact(tmp_path, dtype):
    """Two data-parallel ranks: megatron's DistributedOptimizer (sharded optimizer state). Without
    apex/TE megatron-core 0.16.1 could not build the state to load into a fresh optimizer (an
    assertion on the missing Adam step), and its dp_reshardable load put back a stale step count;
    both are handled in train/state.py."""
    full = _run(tmp_path / "full", world=2, **{"model.dtype": dtype})
    stopped = _run(tmp_path / "split", reward="sigterm_on_third_call", world=2, **{"model.dtype": dtype})
    assert all(r["stopped"] and r["steps"] == 2 for r in stopped)
    resumed = _run(tmp_path / "split", world=2, **{"model.dtype": dtype})
    assert all(r["steps"] == 4 for r in resumed) and resumed[0]["layout"]["dp"] == 2
    assert resumed[0]["losses"] == full[0]["losses"] and len(full[0]["losses"]) == 4
    for rank in range(2):
        for k, v in full[rank]["weights"].items():
            assert torch.equal(v, resumed[rank]["weights"][k]), (rank, k)
