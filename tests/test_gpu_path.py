"""The GPU-only branches, exercised on CPU: the TE layer spec, the process-group backend rule
(device-strict collectives), the model's device, and the vLLM engine's phases under the trainer.

Each test here failed on the code before the GPU-path fixes; the comments name the defect.
"""
import inspect

import pytest
import torch

from agro_megatron import platform
from agro_megatron.testing import train_checks as tc
from agro_megatron.testing.distributed import run_distributed


# -- 1. TE layer spec ------------------------------------------------------------------------------
def test_te_layer_spec_call_binds_to_megatron_core(monkeypatch):
    """megatron-core 0.16.1's get_gpt_layer_with_transformer_engine_spec takes no `normalization`
    (TE reads RMSNorm from TransformerConfig.normalization); the old call raised TypeError on every
    TE build. Without TE the real function cannot run here, so a stand-in with its exact signature
    takes the call."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from agro_megatron.models.llama import LlamaArch, layer_spec, transformer_config

    sig = inspect.signature(specs.get_gpt_layer_with_transformer_engine_spec)
    calls = []

    def stand_in(*args, **kwargs):
        sig.bind(*args, **kwargs)  # TypeError on a keyword the real function lacks
        calls.append(kwargs)
        return "te-spec"

    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec", stand_in)
    assert layer_spec(use_te=True) == "te-spec" and len(calls) == 1
    arch = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
    assert transformer_config(arch).normalization == "RMSNorm"  # where TE reads it


# -- 2. collectives on CPU tensors under NCCL ------------------------------------------------------
def test_platform_backend_rule():
    """One rule, in the platform layer: with CUDA the default group has a CPU backend as well."""
    assert platform.distributed_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert platform.distributed_backend(cuda=False) == "gloo"
    assert platform.backend_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert platform.backend_device_types("nccl") == {"cuda"}


@pytest.fixture(scope="module")
def strict_runs(tmp_path_factory):
    """Two DP ranks train 2 steps with an eval after each, under the device-strict recorder: once
    projecting the platform's CUDA backend, once projecting the old plain "nccl"."""
    root = tmp_path_factory.mktemp("strict")
    common = {"train.steps": 2, "eval.every": 1, "checkpoint.save_every": 0}
    fixed = run_distributed(tc.run_strict, 2, args=(str(root / "fixed"), common),
                            backend="cpu:gloo,cuda:gloo")
    old = run_distributed(tc.run_strict, 2, args=(str(root / "old"), common, "nccl"))
    engine = {**common, "rollout.engine": "vllm", "model.tiny": tc.VLLM_TINY}
    vllm = run_distributed(tc.run_strict, 2, args=(str(root / "vllm"), engine, None, True),
                           backend="cpu:gloo,cuda:gloo")
    return fixed, old, vllm


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_and_eval_collectives_are_on_accepted_devices(strict_runs):
    fixed, _, _ = strict_runs
    for r in fixed:
        assert r["steps"] == 2
        assert r["violations"] == [], "\n".join(r["violations"])
        # the recorder saw the call sites the defect list names (not a vacuous pass)
        for module in ("train/loop.py", "train/context.py", "train/pipeline.py"):
            assert any(c.endswith(module) for c in r["callers"]), (module, r["callers"])
        assert r["calls"] > 20


@pytest.mark.slow
@pytest.mark.distributed
def test_strict_recorder_flags_cpu_tensors_under_plain_nccl(strict_runs):
    """The pre-fix backend ("nccl" alone) fails the same run: the flags in loop.py, the eval sum in
    context.py and the metric reduction in pipeline.py are CPU tensors."""
    _, old, _ = strict_runs
    for r in old:
        bad = "\n".join(r["violations"])
        for module in ("train/loop.py", "train/context.py", "train/pipeline.py"):
            assert f"{module}:" in bad, (module, bad[:2000])


@pytest.mark.slow
@pytest.mark.distributed
def test_vllm_engine_collectives_are_on_accepted_devices(strict_runs):
    """The same with the vLLM engine (the stand-in): its rollout-layout check and seed sharing."""
    *_, vllm = strict_runs
    for r in vllm:
        assert r["steps"] == 2 and r["violations"] == [], "\n".join(r["violations"])
        assert any(c.endswith("rollout/vllm_engine.py") for c in r["callers"]), r["callers"]


# -- 5. the local spec's model on one device -------------------------------------------------------
@pytest.mark.distributed
def test_build_model_puts_every_tensor_on_the_platform_device():
    """Megatron's local spec builds torch.nn.RMSNorm on the CPU; build_model must move the whole
    model to platform.device() (Megatron-LM's get_model calls .cuda()). The meta device stands in
    for CUDA: a tensor left on the CPU shows up as 'cpu'."""
    from agro_megatron.testing.platform_checks import model_devices_when_platform_names

    out = run_distributed(model_devices_when_platform_names, 1, args=("meta",), tp=1, pp=1)
    assert out == [["meta"]], out


# -- 3 and 4. the vLLM engine's phases and the stale regime, through every trainer path ------------
STAND_IN_RUNS = {
    # eval before training and after each step in 2 batches (70 problems, batches of 64)
    "onpolicy": {"train.steps": 3, "eval.every": 1, "eval.n": 1, "eval.max_problems": 70,
                 "data.synthetic_heldout_size": 70, "rollout.vllm_sleep_level": 2},
    "onpolicy+resume": {"train.steps": 4, "eval.every": 1, "eval.n": 1, "eval.max_problems": 70,
                        "data.synthetic_heldout_size": 70, "rollout.vllm_sleep_level": 2},
    "ppo_level1": {"train.steps": 2, "algorithm.epochs_per_batch": 2, "rollout.vllm_sleep_level": 1},
    # offline data generated from pi_ref in 2 batches (40 prompts, batches of 32)
    "offline": {"train.steps": 2, "algorithm.regime": "offline", "algorithm.estimator": "agro_off",
                "data.synthetic_train_size": 40, "rollout.vllm_sleep_level": 2},
    "replay": {"train.steps": 3, "algorithm.regime": "replay", "algorithm.replay_p": 0.5,
               "data.synthetic_train_size": 4, "rollout.vllm_sleep_level": 2},
    "stale": {"train.steps": 4, "algorithm.regime": "stale", "algorithm.staleness": 1,
              "algorithm.estimator": "agro_off", "eval.every": 1, "rollout.vllm_sleep_level": 2},
}


@pytest.fixture(scope="module")
def stand_in_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_stand_in")
    runs = dict(STAND_IN_RUNS)
    runs["offline"] = {**runs["offline"], "algorithm.offline_data": str(root / "offline.jsonl")}
    return run_distributed(tc.run_with_stand_in_vllm, 1, args=(str(root), runs), timeout_s=1200)[0]


def _sleep_cycles(events):
    """Each sleep and the events up to the next generate (what update_weights did in between)."""
    cycles, cur = [], None
    for e in events:
        if e[0] == "sleep":
            cur = [e]
            cycles.append(cur)
        elif cur is not None:
            if e[0] == "generate":
                cur = None
            else:
                cur.append(e)
    return cycles


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(STAND_IN_RUNS))
def test_vllm_engine_phases_through_the_trainer(stand_in_runs, name):
    """The real VLLMEngine against the stand-in (which raises on generate while asleep, on weights
    lost at level 2, on a wrong wake order, and on a second sleep-mode engine in the process):
    every path completes, sleeps once per step when training starts, and wakes as weights ->
    reload -> prefix-cache reset -> KV cache."""
    out, cfg = stand_in_runs[name], STAND_IN_RUNS[name]
    level = cfg["rollout.vllm_sleep_level"]
    assert out["steps"] == cfg["train.steps"]
    assert out["sleep_mode"] == [True] and out["rejected"] == [[]] and out["shut_down"] == [True]
    events = out["events"][0]
    first_step = 3 if name.endswith("+resume") else 0
    assert [e for e in events if e[0] == "sleep"] == [("sleep", level)] * (cfg["train.steps"] - first_step)
    for cycle in _sleep_cycles(events):
        names = [e[0] for e in cycle]
        assert names[0] == "sleep" and names[1] == "wake_up" and cycle[1][1] == ("weights",), cycle
        assert set(names[2:-2]) == {"reload_weights"}, cycle
        assert names[-2:] == ["reset_prefix_cache", "wake_up"] and cycle[-1][1] == ("kv_cache",), cycle
    generates = [e[1] for e in events if e[0] == "generate"]
    if name.startswith("onpolicy"):
        # eval before (fresh run only), after every step but the last, and at the end: 2 batches each
        evals = (1 if first_step == 0 else 0) + (cfg["train.steps"] - first_step - 1) + 1
        assert generates.count(64) == evals and generates.count(6) == evals
    if name == "offline":
        assert generates[:2] == [32 * 2, 8 * 2]  # 40 prompts x n=2 in batches of 32 (before any sleep)
    # every rollout sampled from the weights its regime asks for (offline steps read the file)
    for r in out["rollouts"]:
        if name == "offline":
            assert r["used"] == [], r
        else:
            assert r["used"] and all(u == r["expected"] for u in r["used"]), r


@pytest.mark.slow
@pytest.mark.distributed
def test_stale_snapshot_reaches_the_one_engine(stand_in_runs):
    """staleness=1: from the second step on the engine samples from the previous version's weights,
    which differ from the current policy's; the old code sampled from the starting weights."""
    rollouts = stand_in_runs["stale"]["rollouts"]
    later = [r for r in rollouts if r["step"] >= 1]
    assert len(later) == 3
    for r in later:
        assert r["expected"] != r["policy"] and r["used"] == [r["expected"]]
    assert len({r["expected"] for r in later}) == 3  # a different (older) version each step
