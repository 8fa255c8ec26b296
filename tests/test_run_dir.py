"""A run directory belongs to one run (train/run_dir.py, issue 17 items 3 and 4), TensorBoard after
a resume shows each step once (train/metrics.py), and a checkpoint resumes only at the process
layout that saved it (train/state.py check_layout)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from agro_megatron.config import JobConfig
from agro_megatron.testing import run_dir_checks as rdc
from agro_megatron.testing import train_checks as tc
from agro_megatron.testing.distributed import launcher_free_env, run_distributed
from agro_megatron.train import run_dir
from agro_megatron.train.metrics import MetricsLogger


def _cfg(log_dir, *overrides) -> JobConfig:
    return JobConfig.load(None, [f"logging.dir={log_dir}", *overrides])


def _tensorboard(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- the claim itself (one process, no model) ------------------------------------------------------
def test_config_changes_are_exactly_the_changed_keys(tmp_path):
    overrides = {"algorithm.estimator": "rloo", "algorithm.beta": 0.5, "train.steps": 7, "rollout.n": 4,
                 "data.synthetic_levels": [1, 3], "model.tiny": {"hidden_size": 64}}
    recorded = _cfg(tmp_path).to_dict()
    changes = run_dir.config_changes(recorded, _cfg(tmp_path, *(f"{k}={json.dumps(v)}" for k, v in overrides.items())))
    assert set(changes) == set(overrides)
    assert changes["algorithm.beta"] == (0.1, 0.5) and changes["algorithm.estimator"] == ("agro_on", "rloo")
    assert changes["data.synthetic_levels"] == ([1], [1, 3])
    # a record from before a key existed: that key counts with its default, so it is no change
    del recorded["checkpoint"]["accept_changes"], recorded["data"]["seed"]
    assert run_dir.config_changes(recorded, _cfg(tmp_path)) == {}


def test_resumable_keys_are_config_keys():
    keys = set(run_dir.config_keys())
    assert set(run_dir.RESUMABLE_KEYS) <= keys
    assert all(why.strip() for why in run_dir.RESUMABLE_KEYS.values())
    # nothing that decides what is trained or measured may change silently
    for key in ("algorithm.estimator", "algorithm.beta", "optim.lr", "rollout.n", "rollout.temperature",
                "model.tiny", "model.megatron_checkpoint", "data.train", "eval.n", "sft.steps", "train.seed",
                "train.prompts_per_step", "checkpoint.dir"):
        assert key in keys and key not in run_dir.RESUMABLE_KEYS, key


def test_claim_refuses_a_changed_config_and_names_the_fixes(tmp_path):
    d = tmp_path / "run"
    run_dir.claim(_cfg(d, "algorithm.beta=0.1"))
    record = (d / "config.json").read_text()
    with pytest.raises(run_dir.RunConfigMismatch) as err:
        run_dir.claim(_cfg(d, "algorithm.beta=0.5", "algorithm.estimator=rloo", "train.steps=9"))
    msg = str(err.value)
    assert err.value.changes == {"algorithm.estimator": ("agro_on", "rloo"), "algorithm.beta": (0.1, 0.5)}
    assert 'algorithm.estimator: "agro_on" -> "rloo"; algorithm.beta: 0.1 -> 0.5' in msg
    assert f"logging.dir={d}-2" in msg and "checkpoint.resume=never" in msg, msg
    assert "checkpoint.accept_changes=[algorithm.estimator,algorithm.beta]" in msg and "\n" not in msg
    assert isinstance(err.value, run_dir.ConfigError)  # the CLI prints it on one line and exits 2
    assert (d / "config.json").read_text() == record and not (d / "config_history.jsonl").exists()
    claim = run_dir.claim(_cfg(d, "algorithm.beta=0.5", "checkpoint.accept_changes=[algorithm]"))
    assert claim.resumed and claim.changes == {"algorithm.beta": (0.1, 0.5), "checkpoint.accept_changes": ([], ["algorithm"])}
    assert json.loads((d / "config.json").read_text())["algorithm"]["beta"] == 0.5
    with pytest.raises(run_dir.RunDirError, match="algorithm.betta"):
        run_dir.claim(_cfg(d, "checkpoint.accept_changes=[algorithm.betta]"))


def test_claim_adopts_seeded_inputs_and_refuses_outputs_without_a_record(tmp_path):
    seeded = tmp_path / "seeded"  # what examples/compare.py prepares: no record, only a run's inputs
    (seeded / "sft_model").mkdir(parents=True)
    (seeded / "sft_model" / "COMPLETE").write_text("")
    (seeded / "eval_before.json").write_text("{}")
    claim = run_dir.claim(_cfg(seeded))
    assert not claim.resumed and not claim.moved and (seeded / "sft_model" / "COMPLETE").exists()
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(run_dir.RunDirError, match=r"metrics\.jsonl.*no config\.json.*checkpoint\.resume=never"):
        run_dir.claim(_cfg(orphan))
    claim = run_dir.claim(_cfg(orphan, "checkpoint.resume=never"))
    (old, new), = claim.moved
    assert old == str(orphan) and re.fullmatch(re.escape(str(orphan)) + r"\.old-\d{8}-\d{6}", new)
    assert open(os.path.join(new, "metrics.jsonl")).read() == '{"step": 1}\n'
    assert sorted(os.listdir(orphan)) == ["config.json"]
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(run_dir.RunDirError, match="not an agro-megatron run record"):
        run_dir.claim(_cfg(foreign, "checkpoint.resume=never"))  # never moved: not a run of ours


def test_tensorboard_after_restore_has_each_step_once(tmp_path):
    first = MetricsLogger(str(tmp_path), enabled=True)
    for step in range(1, 5):
        first.log(step, {"train/loss": float(step)})
    first.log(4, {"eval/accuracy": 0.25})  # logged at the checkpoint's step, but after its save
    checkpoint = [r for r in first.history if r["step"] <= 2]
    first.close()
    time.sleep(1.1)  # event files are read in name order, and the name starts with the second
    resumed = MetricsLogger(str(tmp_path), enabled=True)
    resumed.restore(checkpoint)
    for step in (3, 4):
        resumed.log(step, {"train/loss": 10.0 * step})
    resumed.close()
    tb = _tensorboard(tmp_path / "tensorboard")
    assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert tb.get("eval/accuracy", []) == []  # logged after the checkpoint at its step: purged


def test_layout_of_a_checkpoint_without_a_layout_record_is_its_rank_file_count(tmp_path):
    from agro_megatron.train import state

    step = tmp_path / "step_000007"  # as written before the record had a layout: one file per rank
    step.mkdir()
    (step / state.META_NAME).write_text('{"layer_spec": "local/sdpa"}')
    (step / "rank_00000.pt").write_bytes(b"")
    state.check_layout(str(step))  # this process is a world of one, as was the writer
    (step / "rank_00001.pt").write_bytes(b"")
    with pytest.raises(state.CheckpointLayoutMismatch) as err:
        state.check_layout(str(step))
    msg = str(err.value)
    assert "saved by 2 processes (counted from its rank files" in msg and "this job runs 1 process." in msg, msg
    assert "torchrun --nproc-per-node 2" in msg and "train.steps=7" in msg and "Nothing was loaded" in msg


# -- whole runs ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_changed_config_is_refused_and_resumable_keys_resume(tmp_path):
    out = run_distributed(rdc.changed_config_then_allowed_keys, 1, args=(str(tmp_path),))[0]
    assert out["first"]["steps"] == 2
    changed = out["changed"]
    assert changed is not None, "a run with another estimator and beta resumed the old run"
    assert set(changed["changes"]) == {"algorithm.estimator", "algorithm.beta"}
    assert 'algorithm.estimator: "agro_on" -> "rloo"' in changed["message"]
    assert out["untouched"], "the refused start changed the run dir"
    first = out["first"]["losses"]
    allowed, accepted = out["allowed"], out["accepted"]
    assert allowed["steps"] == 3 and allowed["losses"][:2] == first  # resumed, not restarted
    assert [s for s, _ in allowed["losses"]] == [1, 2, 3]
    assert accepted["steps"] == 4 and accepted["losses"][:3] == allowed["losses"]
    history = [json.loads(line) for line in out["history_file"].splitlines()]
    assert history[0]["changes"]["train.steps"] == [2, 3] and "algorithm.beta" not in history[0]["changes"]
    assert history[1]["changes"]["algorithm.beta"] == [0.1, 0.5]
    assert json.loads(out["record"])["algorithm"]["beta"] == 0.5


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_never_moves_the_old_run_aside_and_loses_nothing(tmp_path):
    out = run_distributed(rdc.resume_never_in_a_used_dir, 1, args=(str(tmp_path),))[0]
    assert out["first_steps"] == 3 and out["second_steps"] == 2
    assert len(out["aside"]) == 1 and re.fullmatch(r"run\.old-\d{8}-\d{6}", out["aside"][0]), out["aside"]
    aside = out["aside_files"][out["aside"][0]]
    assert aside == out["before"], "the old run is not whole where it was moved"
    assert any(p.startswith("final_model") for p in aside) and "result.json" in aside
    assert "checkpoints/step_000003/COMPLETE" in aside
    # the new run is whole too: its own checkpoints (keep_last=3), metrics and result
    assert out["checkpoints"] == ["step_000001", "step_000002"]
    assert [r["step"] for r in out["second_history"] if "train/loss" in r] == [1, 2]
    assert f"to {tmp_path / out['aside'][0]}" in out["printed"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_tensorboard_after_a_kill_and_resume_has_each_step_once(tmp_path):
    overrides = {"checkpoint.save_every": 2}
    with pytest.raises(RuntimeError):  # killed in step 4: steps 1-3 logged, the newest checkpoint is step 2
        run_distributed(rdc.run_killed_in_step_4, 1, args=(str(tmp_path), overrides))
    logged = _tensorboard(tmp_path / "tensorboard")
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3]
    out = run_distributed(rdc.resume_then_rerun, 1, args=(str(tmp_path), overrides))[0]
    assert out["resumed_steps"] == out["again_steps"] == 4
    tb = _tensorboard(tmp_path / "tensorboard")
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(tb) > 10 and "train/loss" in tb
    for tag, events in tb.items():  # every tag: the steps and values of metrics.jsonl, each step once
        want = [(r["step"], pytest.approx(r[tag], rel=1e-6, abs=1e-6)) for r in metrics if tag in r]
        assert events == want, tag
        assert sorted({s for s, _ in events}) == [s for s, _ in events], tag
    for tag in ("train/loss", "train/kl", "train/reward_mean", "time/rollout_s"):
        assert [s for s, _ in tb[tag]] == [1, 2, 3, 4], tag
    assert [s for s, _ in tb["eval/accuracy"]] == [0, 4]  # before, and after (once, though run twice)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_with_another_process_count_is_a_named_error(tmp_path):
    run = tmp_path / "run"
    cfg = tc.tiny_config(str(run), **{"train.steps": 2})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    saved = run_distributed(tc.run, 2, args=(str(run), "length_reward", {"train.steps": 2}))
    assert saved[0]["layout"]["dp"] == 2
    before = rdc.snapshot(str(run))

    def agro_train(*overrides):
        return subprocess.run([sys.executable, "-m", "agro_megatron.train", str(config), *overrides],
                              capture_output=True, text=True, env=launcher_free_env(), timeout=600)

    changed = agro_train("algorithm.beta=0.5")
    assert changed.returncode == 2, changed.stderr[-3000:]
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    assert "algorithm.beta: 0.1 -> 0.5" in lines[0] and "checkpoint.accept_changes=[algorithm.beta]" in lines[0]

    proc = agro_train("train.steps=3")  # one process resuming a checkpoint of two
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("agro-train:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    msg = err[0]
    assert "step_000002 was saved by 2 processes (tp=1 pp=1 cp=1 dp=2) (recorded)" in msg, msg
    assert "this job runs 1 process (tp=1 pp=1 cp=1 dp=1)" in msg, msg
    assert "torchrun --nproc-per-node 2" in msg and "train.steps=2" in msg and "final_model" in msg, msg
    after = rdc.snapshot(str(run))
    assert {k: v for k, v in after.items() if k not in ("config.json", "config_history.jsonl")} == \
        {k: v for k, v in before.items() if k != "config.json"}, "a refused resume changed the run"
