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
    return fixed, old


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_and_eval_collectives_are_on_accepted_devices(strict_runs):
    fixed, _ = strict_runs
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
    _, old = strict_runs
    for r in old:
        bad = "\n".join(r["violations"])
        for module in ("train/loop.py", "train/context.py", "train/pipeline.py"):
            assert f"{module}:" in bad, (module, bad[:2000])


# -- 5. the local spec's model on one device -------------------------------------------------------
@pytest.mark.distributed
def test_build_model_puts_every_tensor_on_the_platform_device():
    """Megatron's local spec builds torch.nn.RMSNorm on the CPU; build_model must move the whole
    model to platform.device() (Megatron-LM's get_model calls .cuda()). The meta device stands in
    for CUDA: a tensor left on the CPU shows up as 'cpu'."""
    from agro_megatron.testing.platform_checks import model_devices_when_platform_names

    out = run_distributed(model_devices_when_platform_names, 1, args=("meta",), tp=1, pp=1)
    assert out == [["meta"]], out
