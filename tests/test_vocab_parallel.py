"""agro_megatron.ops.vocab_parallel against a float64 full-vocabulary log_softmax reference.

World of one here; 4 gloo ranks (TP=2 through megatron's TP group, and 4 shards through an
explicit world group) in one launch at the end.
"""
import pytest
import torch

from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.testing.vocab_parallel_checks import (
    make_data, case, distributed_checks, peak_allocated_bytes, reference,
)

FP32_TOL, BF16_TOL = 1e-6, 1e-2
N, V = 41, 30


def _ok(res, tol, grad_tol=None):
    for k in ("logprobs", "entropy", "kl"):
        if k in res:
            assert res[k] <= tol, (k, res[k])
    if "grad" in res:
        assert res["grad"] <= (grad_tol or tol), ("grad", res["grad"])
        assert res["grad_dtype_ok"]
    assert res.get("logits_unchanged", True), "the caller's logits were modified"
    assert res.get("ref_unchanged", True), "the caller's ref_logits were modified"


@pytest.mark.parametrize("chunk", [1, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_values_and_grads(chunk, temperature):
    full, ref_full, target, ups = make_data(0, N, V)
    res = case(full, target, ref_full, upstream=ups, chunk_size=chunk, temperature=temperature)
    _ok(res, FP32_TOL)


def test_fp64_exact_and_leading_dims():
    full, ref_full, target, ups = make_data(1, 24, V)
    shape = (4, 6)
    res = case(full.view(*shape, V), target.view(shape), ref_full.view(*shape, V),
               dtype=torch.float64, upstream=tuple(u.view(shape) for u in ups), chunk_size=5,
               temperature=1.7)
    _ok(res, 1e-12)


@pytest.mark.parametrize("used", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)])
def test_each_output_alone(used):
    """Unused outputs give None grads into backward; each coefficient path is checked."""
    full, ref_full, target, ups = make_data(2, N, V)
    up = tuple(u if k else None for u, k in zip(ups, used))
    _ok(case(full, target, ref_full, upstream=up, chunk_size=6, temperature=0.9), FP32_TOL)


def test_optional_outputs_are_none():
    full, _, target, ups = make_data(3, N, V)
    out = vocab_parallel_logprobs(full.float(), target, compute_entropy=False)
    assert out.entropy is None and out.kl is None
    _ok(case(full, target, upstream=(ups[0], None, None), compute_entropy=False), FP32_TOL)


def test_bf16_outputs_fp32_accurate_grads_bf16():
    """bf16 logits are upcast exactly, so outputs stay fp32-accurate; only the grad is rounded."""
    full, ref_full, target, ups = make_data(4, N, V)
    for inplace in (False, True):
        res = case(full, target, ref_full, dtype=torch.bfloat16, upstream=ups, chunk_size=4,
                   temperature=0.8, inplace=inplace)
        _ok(res, 1e-5, grad_tol=BF16_TOL)


def test_ignore_index_zero_output_and_grad():
    full, ref_full, target, _ = make_data(5, N, V, ignore=False)
    target[::3] = -7
    z = full.float().requires_grad_()
    out = vocab_parallel_logprobs(z, target, ref_full.float(), ignore_index=-7, chunk_size=4)
    for t in out:
        assert torch.all(t[::3] == 0)
    sum(t.sum() for t in out).backward()
    assert torch.all(z.grad[::3] == 0) and z.grad[1::3].abs().sum() > 0


def test_vocab_size_excludes_padding():
    full, ref_full, target, ups = make_data(6, N, V)
    target = target.clamp(max=V - 5)
    res = case(full, target, ref_full, upstream=ups, chunk_size=8, vocab_size=V - 4)
    _ok(res, FP32_TOL)
    z = full.float().requires_grad_()
    vocab_parallel_logprobs(z, target, vocab_size=V - 4).logprobs.sum().backward()
    assert torch.all(z.grad[:, V - 4:] == 0)


def test_gradcheck_float64():
    full, ref_full, target, _ = make_data(7, 6, 9, scale=1.0)
    z = full.clone().requires_grad_()

    def f(x):
        return tuple(vocab_parallel_logprobs(x, target, ref_full, temperature=0.7, chunk_size=4))

    assert torch.autograd.gradcheck(f, (z,))


def test_no_grad_saves_nothing_and_matches():
    full, ref_full, target, _ = make_data(8, N, V)
    z = full.float().requires_grad_()
    with torch.no_grad():
        a = vocab_parallel_logprobs(z, target, ref_full.float())
    assert all(t.grad_fn is None and not t.requires_grad for t in a)
    b = vocab_parallel_logprobs(z, target, ref_full.float())
    for x, y in zip(a, b):
        assert torch.equal(x, y.detach())


def test_memory_no_full_size_buffers():
    """Allocator peak: no_grad forward and in-place fwd+bwd allocate only chunk buffers."""
    n, v, chunk = 256, 2048, 32
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, v, generator=g).bfloat16()
    target = torch.randint(0, v, (n,), generator=g)
    logits_bytes = base.numel() * base.element_size()
    chunk_bytes = chunk * v * 4
    with torch.no_grad():
        fwd = peak_allocated_bytes(lambda: vocab_parallel_logprobs(base, target, chunk_size=chunk))
    assert fwd <= 2 * chunk_bytes + 64 * n, (fwd, logits_bytes)
    leaf = base.clone().requires_grad_()

    def step(inplace):
        logits = leaf.clone()  # fresh non-leaf logits outside the measured region
        def run():
            out = vocab_parallel_logprobs(logits, target, chunk_size=chunk, inplace_backward=inplace)
            torch.autograd.grad(out.logprobs.sum(), logits)
        return peak_allocated_bytes(run)

    inplace, copy = step(True), step(False)
    assert inplace <= 2 * chunk_bytes + 64 * n, (inplace, logits_bytes)
    assert logits_bytes <= copy <= logits_bytes + 2 * chunk_bytes + 64 * n, (copy, logits_bytes)


def _grad(z, target, **kw):
    z = z.detach().requires_grad_()
    vocab_parallel_logprobs(z, target, **kw).logprobs.sum().backward()
    return z.grad


def test_inplace_misuse_detected():
    full, ref_full, target, ups = make_data(9, N, V)
    leaf = full.float().requires_grad_()
    with pytest.raises(ValueError, match="leaf"):
        vocab_parallel_logprobs(leaf, target, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf"):  # a view of a leaf: the leaf would change
        vocab_parallel_logprobs(leaf[:, :V - 2], target.clamp(max=V - 3), inplace_backward=True)
    shifted = torch.randn(2, 6, V, requires_grad=True).clone()[:, :-1]  # [B, S-1, V] slice
    with pytest.raises(ValueError, match="flatten"):
        vocab_parallel_logprobs(shifted, target[:10].clamp(min=0).view(2, 5), inplace_backward=True)
    # Without inplace the same slice is fine (a reshape copy); a transposed 2-D view works in place.
    vocab_parallel_logprobs(shifted, target[:10].clamp(min=0).view(2, 5)).logprobs.sum().backward()
    t = leaf.detach().t().contiguous().requires_grad_()
    vocab_parallel_logprobs(t.clone().t(), target, inplace_backward=True).logprobs.sum().backward()
    assert torch.allclose(t.grad.t(), _grad(full.float(), target), atol=1e-6)

    # Logits modified between forward and backward (any mode): autograd's version check.
    for inplace in (False, True):
        logits = leaf.clone()
        out = vocab_parallel_logprobs(logits, target, inplace_backward=inplace)
        with torch.no_grad():
            logits.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.logprobs.sum().backward()

    # A second backward through the same graph would read gradients as logits.
    logits = leaf.clone()
    out = vocab_parallel_logprobs(logits, target, inplace_backward=True)
    out.logprobs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.logprobs.sum().backward()

    # Another consumer that saved the logits and runs its backward after ours.
    logits = leaf.clone()
    w = torch.randn(V, requires_grad=True)
    other = (logits * w).sum()  # saves logits for d/dw; created first, so backpropagated last
    out = vocab_parallel_logprobs(logits, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logprobs.sum() + other).backward()


def test_inplace_with_another_consumer_is_exact_when_allowed():
    """A consumer whose backward runs first (or saves nothing) is unaffected: same grads."""
    full, ref_full, target, ups = make_data(10, N, V)
    grads = []
    for inplace in (False, True):
        leaf = full.float().requires_grad_()
        w = torch.linspace(0.5, 1.5, V, requires_grad=True)
        logits = leaf.clone()
        out = vocab_parallel_logprobs(logits, target, ref_full.float(), inplace_backward=inplace)
        extra = (logits * w).sum() + logits.sum()  # after ours: backpropagated first
        (sum((o * u.float()).sum() for o, u in zip(out, ups)) + extra).backward()
        grads.append((leaf.grad, w.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.equal(grads[0][1], grads[1][1])


def test_bad_inputs_raise_clear_errors():
    full, _, target, _ = make_data(11, N, V)
    z = full.float()
    with pytest.raises(ValueError, match="not owned"):
        vocab_parallel_logprobs(z, torch.full((N,), V))
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs(z, target[:-1])
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs(z, target.float())
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(z, target, temperature=0.0)
    with pytest.raises(ValueError, match="ref_logits shape"):
        vocab_parallel_logprobs(z, target, z[:, :-1])


def test_reference_is_log_softmax():
    """The reference itself: logp of a uniform distribution is -log V, H = log V, KL(p||p) = 0."""
    z = torch.zeros(3, 5, dtype=torch.float64)
    lp, h, kl = reference(z, torch.tensor([0, 4, -100]), z)
    assert torch.allclose(lp, torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64) * torch.log(torch.tensor(5.0)).double())
    assert torch.allclose(h[:2], torch.log(torch.tensor(5.0, dtype=torch.float64)))
    assert torch.allclose(kl, torch.zeros(3, dtype=torch.float64))


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_tp2_and_four_shards():
    from agro_megatron.testing.distributed import run_distributed

    results = run_distributed(distributed_checks, 4, tp=2)
    for rank, res in enumerate(results):
        assert res.pop("owners") == [0, 1], "targets must land on every TP rank"
        assert res.pop("bad_target_raised"), f"rank {rank}: out-of-vocab target not rejected"
        for name, r in res.items():
            bf16 = name.startswith("bf16")
            try:
                _ok(r, 1e-5 if bf16 else FP32_TOL, grad_tol=BF16_TOL if bf16 else None)
            except AssertionError as e:
                raise AssertionError(f"rank {rank}, case {name}: {e}") from None
