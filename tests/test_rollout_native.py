"""Rollout protocol, sampler and native Megatron-core engine (fp32, CPU).

References: exact float64 distributions for the sampler; for the engine, the trainer's
full-sequence forward (no KV cache, no left padding) and a full-recompute greedy loop, at
TP=1, TP=2 and PP=2 (one gloo launch for all three layouts).
"""
import pytest
import torch

from agro_megatron.rollout import Completion, RolloutEngine, SamplingParams, make_engine
from agro_megatron.rollout.sampling import sample


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value; bins expecting < 5 draws are pooled."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(obs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def _truncated(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p = torch.where(keep, probs, torch.zeros_like(probs))
    return p / p.sum()


# --- protocol ---------------------------------------------------------------------------------
def test_sampling_params_validation():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0),
                dict(top_k=2.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="finish_reason"):
        Completion([1], [0.0], "eos")
    with pytest.raises(ValueError, match="log-probs"):
        Completion([1, 2], [0.0], "stop")


def test_make_engine_errors():
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("sglang")
    with pytest.raises(ValueError, match="model="):
        make_engine("native")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="'native'"):
            make_engine("vllm")


# --- sampler (exact distributions) ------------------------------------------------------------
V, N, T = 24, 20000, 0.7


@pytest.fixture(scope="module")
def logits():
    return torch.randn(V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


def _draw(logits, **kw):
    g = torch.Generator().manual_seed(kw.pop("seed", 0))
    return sample(logits.float().expand(N, -1), generator=g, **kw)


def test_sampler_matches_softmax_over_temperature(logits):
    probs = torch.softmax(logits / T, -1)
    s = _draw(logits, temperature=T)
    assert chi_square_p(s.tokens, probs) > 1e-3
    # the test has power: the T = 1 distribution is rejected
    assert chi_square_p(s.tokens, torch.softmax(logits, -1)) < 1e-6
    ref = torch.log_softmax(logits / T, -1)[s.tokens].float()
    torch.testing.assert_close(s.logprobs, ref, rtol=0, atol=1e-6)


def test_top_k_and_top_p_restrict_support_and_keep_untruncated_logprobs(logits):
    probs = torch.softmax(logits / T, -1)
    full_logp = torch.log_softmax(logits / T, -1)
    top5 = torch.zeros(V, dtype=torch.bool)
    top5[probs.topk(5).indices] = True
    s = _draw(logits, temperature=T, top_k=5, seed=1)
    assert set(s.tokens.unique().tolist()) == set(top5.nonzero()[:, 0].tolist())
    assert chi_square_p(s.tokens, _truncated(probs, top5)) > 1e-3
    torch.testing.assert_close(s.logprobs, full_logp[s.tokens].float(), rtol=0, atol=1e-6)

    order = probs.argsort(descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = torch.zeros(V, dtype=torch.bool)
    nucleus[order[before < 0.8]] = True
    assert 1 < int(nucleus.sum()) < V
    s = _draw(logits, temperature=T, top_p=0.8, seed=2)
    assert set(s.tokens.unique().tolist()) == set(nucleus.nonzero()[:, 0].tolist())
    assert chi_square_p(s.tokens, _truncated(probs, nucleus)) > 1e-3
    torch.testing.assert_close(s.logprobs, full_logp[s.tokens].float(), rtol=0, atol=1e-6)

    both = _draw(logits, temperature=T, top_k=5, top_p=0.8, seed=3)
    assert set(both.tokens.unique().tolist()) <= set((top5 & nucleus).nonzero()[:, 0].tolist())


def test_greedy_padding_and_determinism(logits):
    s = sample(logits.float()[None], temperature=0.0)
    assert int(s.tokens) == int(logits.argmax())
    assert float(s.logprobs) == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-6)
    # megatron's padded ids (>= vocab_size) are never drawn and leave the normaliser
    padded = torch.cat([logits.float(), torch.full((8,), 50.0)])
    s = _draw(padded, temperature=T, vocab_size=V)
    assert int(s.tokens.max()) < V
    torch.testing.assert_close(s.logprobs, torch.log_softmax(logits / T, -1)[s.tokens].float(),
                               rtol=0, atol=1e-6)
    assert torch.equal(_draw(logits, temperature=1.0, seed=9).tokens, _draw(logits, temperature=1.0, seed=9).tokens)
    assert not torch.equal(_draw(logits, temperature=1.0, seed=9).tokens, _draw(logits, temperature=1.0, seed=8).tokens)


# --- native engine at TP=1, TP=2, PP=2 ---------------------------------------------------------
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def engine_results():
    from agro_megatron.testing import rollout_checks
    from agro_megatron.testing.distributed import run_distributed

    return run_distributed(rollout_checks.engine_checks_layouts, 2, args=(LAYOUTS,))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1", "tp2", "pp2"])
def test_native_engine(engine_results, layout):
    ranks = [r[layout] for r in engine_results]
    last = next(r for r in ranks if r["last_stage"])
    # (1) behaviour log-probs == trainer's recomputed log softmax(logits / T) at the sampled tokens
    assert last["logprob_err_pad"] < 1e-5
    assert last["logprob_err_by_length"] < 1e-5
    # every rank (TP peers, PP stages, DP replicas) got the same completions
    for r in ranks:
        assert r["completions_pad"] == last["completions_pad"]
        assert r["model_training_after"] is True
    # (2) greedy and top_k=1 equal a full-recompute greedy loop
    assert last["greedy"] == last["greedy_ref"]
    assert all(s == ref for group, ref in zip(last["topk1"], last["greedy_ref"]) for s in group)
    # (3) first-token distribution and top-k / top-p supports
    probs = torch.softmax(last["first_logits"] / last["first_temperature"], -1)
    first = last["first_tokens"]
    assert chi_square_p(first["plain"], probs) > 1e-3
    top5 = torch.zeros_like(probs, dtype=torch.bool)
    top5[probs.topk(5).indices] = True
    assert set(first["top_k"].unique().tolist()) == set(top5.nonzero()[:, 0].tolist())
    assert chi_square_p(first["top_k"], _truncated(probs, top5)) > 1e-3
    order = probs.argsort(descending=True)
    nucleus = torch.zeros_like(top5)
    nucleus[order[(torch.cumsum(probs[order], 0) - probs[order]) < 0.6]] = True
    assert set(first["top_p"].unique().tolist()) <= set(nucleus.nonzero()[:, 0].tolist())
    assert chi_square_p(first["top_p"], _truncated(probs, nucleus)) > 1e-3
    # (4) deterministic for a seed, different for another seed
    assert last["det_a"] == last["det_b"]
    assert last["det_a"] != last["det_c"]
    # (5) weights changed in place (an optimizer step) are sampled from without a copy
    assert last["greedy_after_step"] == last["greedy_after_step_ref"]
    assert last["greedy_after_step"] != [g[:4] for g in last["greedy"]]
    # stop tokens end sequences with "stop" (token included); otherwise exactly max_new_tokens
    stop, reasons = set(last["params_stop"]), set()
    for batching in ("pad", "by_length"):
        for group in last[f"completions_{batching}"]:
            assert len({tuple(toks) for toks, _, _ in group}) > 1  # n samples of a prompt differ
            for toks, lps, reason in group:
                reasons.add(reason)
                assert not stop & set(toks[:-1])
                if reason == "stop":
                    assert toks[-1] in stop
                else:
                    assert reason == "length" and len(toks) == last["max_new_tokens"]
                    assert toks[-1] not in stop
                assert all(lp <= 0 for lp in lps)
    assert reasons == {"stop", "length"}


def test_native_engine_satisfies_protocol():
    from agro_megatron.rollout.native import NativeEngine

    for name in ("generate", "update_weights", "sleep", "wake"):
        assert callable(getattr(NativeEngine, name))
    assert issubclass(NativeEngine, RolloutEngine)
