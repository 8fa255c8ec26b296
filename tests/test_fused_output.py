"""agro_megatron.ops.fused_output: log-prob/entropy/KL from hidden states, logits never formed.

Against (a) float64 unfused torch (logits = hidden @ weight.T, log_softmax, autograd) and (b) the
existing logits-based op on logits from a plain matmul. Sizes are odd on purpose: tokens and
vocabulary are not multiples of the tile. One 2-rank gloo launch (TP=2 vs TP=1) at the end.
"""
import pytest
import torch

from agro_megatron.ops.fused_output import fused_output_logprobs
from agro_megatron.testing.fused_output_checks import (
    compare, make_problem, run_fused, run_logits_op, run_unfused_reference,
)
from agro_megatron.testing.vocab_parallel_checks import peak_allocated_bytes

N, V, H, HQ = 37, 53, 16, 11


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tiles: one intra-op thread avoids OpenMP barrier cost on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ok(res, tol, grad_tol=None):
    for k, e in res.items():
        lim = grad_tol if (grad_tol is not None and k.startswith("d_")) else tol
        assert e <= lim, (k, e, lim)


@pytest.mark.parametrize("tb,vb", [(8, 10), (64, 7), (5, 1000), (1, 9), (10, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_values_and_grads_vs_float64(tb, vb, temperature):
    p = make_problem(0, N, V, H, hq=HQ)
    ours = run_fused(p, token_block=tb, vocab_block=vb, temperature=temperature)
    ref = run_unfused_reference(p, temperature=temperature)
    _ok(compare(ours, ref), 2e-6)
    assert set(compare(ours, ref)) == {"logprobs", "entropy", "kl", "d_hidden", "d_weight"}


def test_fp64_exact_with_leading_dims():
    p = make_problem(1, 24, V, H, hq=HQ, scale=2.0)
    shaped = dict(p, hidden=p["hidden"].view(4, 6, H), ref_hidden=p["ref_hidden"].view(4, 6, HQ),
                  target=p["target"].view(4, 6), ups=tuple(u.view(4, 6) for u in p["ups"]))
    outs, dh, dw = run_fused(shaped, dtype=torch.float64, token_block=5, vocab_block=9,
                             temperature=1.7)
    assert outs.logprobs.shape == (4, 6) and dh.shape == (4, 6, H)
    assert outs.logprobs.dtype == torch.float64
    ref = run_unfused_reference(p, dtype=torch.float64, temperature=1.7)
    _ok(compare(((o.reshape(-1) for o in outs), dh.reshape(-1, H), dw), ref), 1e-12)


def test_gradcheck_float64_hidden_and_weight():
    p = make_problem(2, 6, 9, 4, hq=3, scale=1.5)

    def f(h, w):
        return tuple(fused_output_logprobs(h, w, p["target"], p["ref_hidden"], p["ref_weight"],
                                           temperature=0.7, token_block=4, vocab_block=4))

    args = (p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("used", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)])
def test_each_output_alone(used):
    """Unused outputs reach backward as None: each gradient coefficient path on its own."""
    p = make_problem(3, N, V, H, hq=HQ)
    ups = tuple(u if k else None for u, k in zip(p["ups"], used))
    ours = run_fused(p, ups=ups, token_block=9, vocab_block=8, temperature=0.9)
    _ok(compare(ours, run_unfused_reference(p, ups=ups, temperature=0.9)), 2e-6)


def test_logprob_only_without_reference():
    p = make_problem(4, N, V, H)
    outs, dh, dw = run_fused(p, use_ref=False, compute_entropy=False, token_block=6,
                             vocab_block=11)
    assert outs.entropy is None and outs.kl is None
    ref = run_unfused_reference(p, use_ref=False, ups=(p["ups"][0], None, None))
    ours = run_fused(p, use_ref=False, ups=(p["ups"][0], None, None), compute_entropy=False,
                     token_block=6, vocab_block=11)
    _ok(compare(ours, ref), 2e-6)


def test_matches_logits_based_op_fp32_and_bf16():
    """Same quantities as vocab_parallel_logprobs on materialised logits, in fp32 and bf16.

    In bf16 both paths round the logits to bf16 (ours tile by tile), so the outputs agree to
    fp32 accuracy; d hidden/d weight differ only by bf16 rounding of the per-tile products.
    """
    p = make_problem(5, 70, 301, 32, scale=2.0)
    for dtype, tol, gtol in ((torch.float32, 2e-6, 1e-5), (torch.bfloat16, 1e-4, 2e-2)):
        ours = run_fused(p, dtype=dtype, token_block=16, vocab_block=64, temperature=0.8)
        theirs = run_logits_op(p, dtype=dtype, temperature=0.8)
        _ok(compare(ours, theirs), tol, gtol)
        assert ours[1].dtype == dtype and ours[2].dtype == dtype
        assert ours[0].logprobs.dtype == torch.float32
    # and bf16 against float64 on the same rounded inputs: only the logits' bf16 rounding differs
    ours = run_fused(p, dtype=torch.bfloat16, token_block=16, vocab_block=64)
    _ok(compare(ours, run_unfused_reference(p, dtype=torch.bfloat16)), 3e-2)


def test_ignore_index_and_padding_rows():
    p = make_problem(6, N, V, H, hq=HQ, ignore=False)
    vocab = V - 6
    p["target"] = p["target"] % vocab
    p["target"][::3] = -7
    ours = run_fused(p, token_block=10, vocab_block=7, ignore_index=-7, vocab_size=vocab)
    ref = run_unfused_reference(p, ignore_index=-7, vocab_size=vocab)
    _ok(compare(ours, ref), 2e-6)
    (outs, dh, dw) = ours
    for t in outs:
        assert torch.all(t[::3] == 0)
    assert torch.all(dh[::3] == 0) and dh[1::3].abs().sum() > 0
    assert torch.all(dw[vocab:] == 0) and dw[:vocab].abs().sum() > 0


def test_no_gradient_into_reference_and_no_grad_matches():
    p = make_problem(7, N, V, H, hq=HQ)
    hid = p["hidden"].float().requires_grad_()
    w = p["weight"].float().requires_grad_()
    rh = p["ref_hidden"].float().requires_grad_()
    rw = p["ref_weight"].float().requires_grad_()
    outs = fused_output_logprobs(hid, w, p["target"], rh, rw, token_block=8, vocab_block=8)
    sum(o.sum() for o in outs).backward()
    assert rh.grad is None and rw.grad is None and hid.grad is not None
    with torch.no_grad():
        again = fused_output_logprobs(hid, w, p["target"], rh, rw, token_block=8, vocab_block=8)
    assert all(t.grad_fn is None and not t.requires_grad for t in again)
    for x, y in zip(again, outs):
        assert torch.equal(x, y.detach())


def test_weight_only_and_hidden_only_grads():
    """Frozen hidden (e.g. a detached trunk) or a frozen output weight: the other grad only."""
    p = make_problem(8, N, V, H, hq=HQ)
    ref = run_unfused_reference(p)
    hid = p["hidden"].float()
    w = p["weight"].float().requires_grad_()
    outs = fused_output_logprobs(hid, w, p["target"], p["ref_hidden"].float(),
                                 p["ref_weight"].float(), token_block=8, vocab_block=8)
    sum((o * u.float()).sum() for o, u in zip(outs, p["ups"])).backward()
    # fp32 against float64: the error grows with the gradient's size (entries up to ~2.4 here; 2.4e-6 seen on an AMD EPYC)
    assert (w.grad - ref[2]).abs().max() < 2e-6 * max(1.0, ref[2].abs().max().item())
    hid = p["hidden"].float().requires_grad_()
    w = p["weight"].float()
    outs = fused_output_logprobs(hid, w, p["target"], p["ref_hidden"].float(),
                                 p["ref_weight"].float(), token_block=8, vocab_block=8)
    sum((o * u.float()).sum() for o, u in zip(outs, p["ups"])).backward()
    assert (hid.grad - ref[1]).abs().max() < 2e-6 * max(1.0, ref[1].abs().max().item())


@pytest.mark.slow
def test_memory_never_holds_a_logits_copy():
    """Allocator peak of fwd+bwd: tiles + d hidden + d weight, far below one bf16 logits copy.

    The unfused path holds at least the bf16 logits (2 B/element) plus megatron's fp32 softmax.
    """
    n, v, h, tb, vb = 1024, 2048, 8, 256, 128
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.3).bfloat16().requires_grad_()
    rh, rw = hid.detach().clone(), (w.detach().float() * 0.9).bfloat16()
    target = torch.randint(0, v, (n,), generator=g)
    logits_bytes = n * v * 2

    def run():
        outs = fused_output_logprobs(hid, w, target, rh, rw, token_block=tb, vocab_block=vb)
        torch.autograd.grad(sum(o.sum() for o in outs), (hid, w))

    peak = peak_allocated_bytes(run)
    tiles = tb * vb * (3 * 4 + 2 * 2)  # fp32 tile buffers + bf16 matmul tiles
    grads = v * h * 2 + n * h * (4 + 2) + vb * h * 6  # d W, d hidden fp32 + bf16, partials
    bound = 2 * tiles + grads + 256 * n
    assert peak <= bound, (peak, bound, logits_bytes)
    assert peak < logits_bytes / 4, (peak, logits_bytes)


def test_bad_inputs_raise_clear_errors():
    p = make_problem(9, N, V, H, hq=HQ)
    hid, w, t = p["hidden"].float(), p["weight"].float(), p["target"]
    with pytest.raises(ValueError, match="not owned"):
        fused_output_logprobs(hid, w, torch.full((N,), V))
    with pytest.raises(ValueError, match="target shape"):
        fused_output_logprobs(hid, w, t[:-1])
    with pytest.raises(TypeError, match="integer"):
        fused_output_logprobs(hid, w, t.float())
    with pytest.raises(ValueError, match=r"\[V/tp, H\]"):
        fused_output_logprobs(hid, w[:, :-1], t)
    with pytest.raises(TypeError, match="dtype"):
        fused_output_logprobs(hid, w.double(), t)
    with pytest.raises(ValueError, match="both ref_hidden and ref_weight"):
        fused_output_logprobs(hid, w, t, p["ref_hidden"].float())
    with pytest.raises(ValueError, match="ref_weight shape"):
        fused_output_logprobs(hid, w, t, p["ref_hidden"].float(), p["ref_weight"][:-1].float())
    with pytest.raises(ValueError, match="temperature"):
        fused_output_logprobs(hid, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="positive"):
        fused_output_logprobs(hid, w, t, vocab_block=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_matches_tp1_and_float64():
    from agro_megatron.testing.distributed import run_distributed
    from agro_megatron.testing.fused_output_checks import distributed_checks

    results = run_distributed(distributed_checks, 2, tp=2)
    for rank, res in enumerate(results):
        assert res.pop("owners") == [0, 1], "targets must land on both TP ranks"
        assert res.pop("bad_target_raised"), f"rank {rank}: out-of-vocab target not rejected"
        for name in ("gpt_head_untied", "gpt_head_tied"):  # the trainer-side hook on GPTModel
            r = res.pop(name)
            assert r["same_params"] and r["hidden_shape"] and r["restored"], (rank, name, r)
            assert r["outputs"] <= 2e-6 and r["grads"] <= 1e-5, (rank, name, r)
        for name, r in res.items():
            bf16 = name.startswith("bf16")
            if "padding_grad_zero" in r:
                assert r.pop("padding_grad_zero"), f"rank {rank}: padding rows got gradient"
            limits = {"vs_tp1": (1e-4, 2e-2) if bf16 else (1e-6, 1e-5),
                      "vs_f64": (3e-2, 3e-2) if bf16 else (2e-6, 2e-6),
                      "vs_logits_op": (1e-4, 2e-2) if bf16 else (2e-6, 1e-5)}
            for against, (tol, gtol) in limits.items():
                try:
                    _ok(r[against], tol, gtol)
                except AssertionError as e:
                    raise AssertionError(f"rank {rank}, case {name}, {against}: {e}") from None
