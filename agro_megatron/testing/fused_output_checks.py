"""Reference and comparison helpers for agro_megatron.ops.fused_output.

Used by tests/test_fused_output.py (also inside gloo ranks started by run_distributed). The
references are independent of the op: (a) float64 unfused torch, logits = hidden @ weight.T over
the full vocabulary, log_softmax, autograd for d hidden and d weight; (b) the existing
logits-based op (`vocab_parallel_logprobs`) on logits from a plain matmul, in the same dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.ops.fused_output import fused_output_logprobs
from agro_megatron.testing.vocab_parallel_checks import reference, rel_err

OUTPUTS = ("logprobs", "entropy", "kl")


def make_problem(seed, n, v, h, *, hq=None, scale=1.0, ignore=True):
    """float64 hidden [n, h], weight [v, h], ref hidden/weight, targets and upstream grads.

    Logits come out O(scale * 2), so the softmax is neither uniform nor one-hot.
    """
    g = torch.Generator().manual_seed(seed)
    hq = h if hq is None else hq
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 * scale / h ** 0.5)
    rhid = torch.randn(n, hq, generator=g, dtype=torch.float64)
    rw = torch.randn(v, hq, generator=g, dtype=torch.float64) * (2.0 * scale / hq ** 0.5)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore:
        target[torch.randperm(n, generator=g)[: n // 5]] = -100
    ups = tuple(torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    return dict(hidden=hid, weight=w, ref_hidden=rhid, ref_weight=rw, target=target, ups=ups)


def _loss(outs, ups):
    return sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, ups)
               if o is not None and u is not None)


def _fresh(t, dtype):
    """A new leaf copy (`.to` returns the very tensor when the dtype already matches)."""
    return t.detach().to(dtype, copy=True)


def run_fused(p, *, dtype=torch.float32, lo=0, hi=None, use_ref=True, ups=None, **opts):
    """The fused op on weight rows [lo, hi) in `dtype`; returns (outs, d hidden, d weight shard)."""
    hi = p["weight"].shape[0] if hi is None else hi
    hid = _fresh(p["hidden"], dtype).requires_grad_()
    w = _fresh(p["weight"][lo:hi], dtype).requires_grad_()
    rh = _fresh(p["ref_hidden"], dtype) if use_ref else None
    rw = _fresh(p["ref_weight"][lo:hi], dtype) if use_ref else None
    outs = fused_output_logprobs(hid, w, p["target"], rh, rw, **opts)
    _loss(outs, p["ups"] if ups is None else ups).backward()
    return outs, hid.grad, w.grad


def run_unfused_reference(p, *, dtype=torch.float32, use_ref=True, ups=None, temperature=1.0,
                          vocab_size=None, ignore_index=-100):
    """float64 unfused torch on the `dtype`-rounded inputs: (outs, d hidden, d weight [V, H])."""
    hid = _fresh(_fresh(p["hidden"], dtype), torch.float64).requires_grad_()
    w = _fresh(_fresh(p["weight"], dtype), torch.float64).requires_grad_()
    z = hid @ w.t()
    zq = (p["ref_hidden"].to(dtype).double() @ p["ref_weight"].to(dtype).double().t()
          if use_ref else None)
    outs = reference(z, p["target"], zq, temperature=temperature, ignore_index=ignore_index,
                     vocab_size=vocab_size)
    _loss(outs, p["ups"] if ups is None else ups).backward()
    return outs, hid.grad, w.grad


def run_logits_op(p, *, dtype=torch.float32, lo=0, hi=None, use_ref=True, ups=None, **opts):
    """The existing logits-based op on logits = hidden @ weight[lo:hi].T computed in `dtype`."""
    hi = p["weight"].shape[0] if hi is None else hi
    hid = _fresh(p["hidden"], dtype).requires_grad_()
    w = _fresh(p["weight"][lo:hi], dtype).requires_grad_()
    zq = (p["ref_hidden"].to(dtype) @ p["ref_weight"][lo:hi].to(dtype).t() if use_ref else None)
    outs = vocab_parallel_logprobs(hid @ w.t(), p["target"], zq, **opts)
    _loss(outs, p["ups"] if ups is None else ups).backward()
    if opts.get("group") is not None and dist.get_world_size(opts["group"]) > 1:
        dist.all_reduce(hid.grad, group=opts["group"])  # what the output layer's backward does
    return outs, hid.grad, w.grad


def compare(a, b, lo=0, hi=None) -> dict:
    """Errors (rel_err) of result triple `a` against `b`; b's d weight is sliced to [lo, hi)."""
    (oa, ha, wa), (ob, hb, wb) = a, b
    hi = wb.shape[0] if hi is None else hi
    res = {}
    for name, x, y in zip(OUTPUTS, oa, ob):
        if x is not None and y is not None:
            res[name] = rel_err(x, y)
    res["d_hidden"] = rel_err(ha, hb)
    res["d_weight"] = rel_err(wa, wb[lo:hi])
    return res


# ------------------------------------------------------------------ distributed worker
def distributed_checks(seed: int = 0) -> dict:
    """Inside each rank of a TP group (megatron initialised): TP result vs TP=1 and float64.

    Returns {case: {"vs_tp1": errors, "vs_f64": errors, "vs_logits_op": errors}} plus "owners".
    """
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    world, wr = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([k]) for k in range(world)]  # collective: every rank creates all
    alone = singles[wr]
    out = {}
    vp = 23  # odd shard size, not a multiple of the blocks below
    v = vp * tp
    p = make_problem(seed + 31, 29, v, 12, hq=9)
    for k in range(tp):  # a token owned by every rank, at both ends of each shard
        p["target"][2 * k], p["target"][2 * k + 1] = k * vp, k * vp + vp - 1
    out["owners"] = sorted({int(t) // vp for t in p["target"].tolist() if t >= 0})
    lo, hi = r * vp, (r + 1) * vp
    cases = {
        "fp32": dict(dtype=torch.float32, token_block=8, vocab_block=10, temperature=0.8),
        "fp64_logp_only": dict(dtype=torch.float64, token_block=100, vocab_block=4,
                               use_ref=False, compute_entropy=False),
        "bf16": dict(dtype=torch.bfloat16, token_block=16, vocab_block=6),
        # megatron-style TP padding: the last shard's final 5 rows are outside the vocabulary
        "fp32_padded": dict(dtype=torch.float32, token_block=7, vocab_block=5,
                            vocab_size=v - 5),
    }
    for name, kw in cases.items():
        kw = dict(kw)
        dtype, use_ref = kw.pop("dtype"), kw.pop("use_ref", True)
        q = p
        if "vocab_size" in kw:
            q = dict(p, target=torch.where(p["target"] >= kw["vocab_size"],
                                           p["target"] % kw["vocab_size"], p["target"]))
        # Without entropy the loss uses the log-probs only (the reference always has H).
        ups = p["ups"] if kw.get("compute_entropy", True) else (p["ups"][0], None, None)
        tp_res = run_fused(q, dtype=dtype, lo=lo, hi=hi, use_ref=use_ref, ups=ups, **kw)
        one = run_fused(q, dtype=dtype, use_ref=use_ref, group=alone, ups=ups, **kw)
        ref = run_unfused_reference(q, dtype=dtype, use_ref=use_ref, ups=ups,
                                    temperature=kw.get("temperature", 1.0),
                                    vocab_size=kw.get("vocab_size"))
        lkw = {k: kw[k] for k in ("temperature", "vocab_size", "compute_entropy") if k in kw}
        logits_op = run_logits_op(q, dtype=dtype, lo=lo, hi=hi, use_ref=use_ref, ups=ups,
                                  group=ps.get_tensor_model_parallel_group(), **lkw)
        out[name] = {"vs_tp1": compare(tp_res, one, lo, hi), "vs_f64": compare(tp_res, ref, lo, hi),
                     "vs_logits_op": compare(tp_res, logits_op)}
        if "vocab_size" in kw and hi > kw["vocab_size"]:
            out[name]["padding_grad_zero"] = bool(
                torch.all(tp_res[2][kw["vocab_size"] - lo:] == 0))
    out["gpt_head_untied"] = gpt_head_check(False, seed)
    out["gpt_head_tied"] = gpt_head_check(True, seed)
    bad = p["target"].clone()
    bad[0] = v + 3
    try:
        fused_output_logprobs(p["hidden"].float(), p["weight"][lo:hi].float(), bad)
        out["bad_target_raised"] = False
    except ValueError as e:
        out["bad_target_raised"] = "not owned" in str(e)
    return out


def gpt_head_check(tie: bool, seed: int = 0) -> dict:
    """A megatron GPTModel (this rank's TP shard): fused op on its hidden states vs logits path.

    Same loss (sum of upstream-weighted log-probs and entropies) through (a) the model's logits and
    the logits-based op, (b) `enable_hidden_states_output` + the fused op on `output_weight`.
    Returns {"outputs": err, "grads": max err over every parameter, "restored": bool}.
    """
    from agro_megatron.models import LlamaArch, build_model
    from agro_megatron.models.hidden_head import (
        enable_hidden_states_output, hidden_states_output, output_weight, restore_logits_output,
        returns_hidden_states,
    )

    vocab = 250  # megatron pads it (to 256 at TP=2): the padding rows must stay out
    arch = LlamaArch(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tie,
                     max_position_embeddings=64)
    torch.manual_seed(seed)
    model = build_model(arch, dtype="fp32")
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (2, 9), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    positions = torch.arange(9).unsqueeze(0).expand_as(tokens)
    ups = [torch.randn(2, 9, generator=g) for _ in range(2)]

    def run(fused):
        model.zero_grad(set_to_none=True)
        out = model(tokens, positions, None)
        if fused:
            st = fused_output_logprobs(out, output_weight(model), labels, vocab_size=vocab,
                                       token_block=5, vocab_block=16)
        else:
            st = vocab_parallel_logprobs(out, labels, vocab_size=vocab)
        ((st.logprobs * ups[0]).sum() + (st.entropy * ups[1]).sum()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return (st.logprobs.detach(), st.entropy.detach()), grads, out.shape

    keys = sorted(model.state_dict())
    (lp_a, h_a), grads_a, shape_a = run(False)
    if tie:  # both spellings: the context manager, and enable/restore
        with hidden_states_output(model):
            (lp_b, h_b), grads_b, shape_b = run(True)
            hidden_mode = returns_hidden_states(model)
    else:
        enable_hidden_states_output(model)
        (lp_b, h_b), grads_b, shape_b = run(True)
        hidden_mode = returns_hidden_states(model)
        restore_logits_output(model)
    _, _, shape_c = run(False)
    return {
        "outputs": max(rel_err(lp_b, lp_a), rel_err(h_b, h_a)),
        "grads": max(rel_err(grads_b[n], grads_a[n]) for n in grads_a),
        "same_params": sorted(grads_a) == sorted(grads_b),
        "hidden_shape": tuple(shape_b) == (2, 9, arch.hidden_size),
        # logits again, and no parameter left behind by the hook (a checkpoint would carry it)
        "restored": hidden_mode and shape_c == shape_a and not returns_hidden_states(model)
                    and sorted(model.state_dict()) == keys,
    }
