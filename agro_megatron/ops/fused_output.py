"""Log pi(y_t), entropy and KL(pi || pi_ref) straight from final hidden states: logits never exist.

Why: `vocab_parallel_logprobs` already avoids megatron's fp32 softmax copy, but it takes logits,
so the output layer still writes a [tokens, V/TP] tensor per micro-batch (and the reference
model another one for full-vocabulary KL). At V = 128256 and 16k-32k-token reasoning responses
that is several GB per sequence. This op takes the final hidden states [tokens, H] and this
rank's vocab-parallel output weight [V/TP, H] (and, for KL, the reference's hidden states and
weight) and works on [token block x vocab block] tiles of the logits that it computes with one
matmul and drops at once:

* forward: per token, an online (running-max) log-sum-exp over the vocab blocks of this shard,
  with the running sums the entropy and KL need; then the same two all-reduces over the TP group
  as `vocab_parallel_logprobs` (MAX of the shard maxima, one SUM of the rescaled partial sums,
  carrying the target logit and an ownership count). The vocabulary is never gathered.
* backward: the tiles are recomputed (one more matmul per tile) and turned into
  d logits with the closed forms of docs/algorithm.md section 6; each tile is at once folded into
  d W (rows of this vocab block) and d hidden. d hidden is summed over the TP group, as megatron's
  ColumnParallelLinear does in its backward, because every TP rank holds the same hidden states.

So the only [*, V/TP]-shaped memory is a few tiles, and the cost is one extra matmul (the
recomputation) against the unfused output layer + cross-entropy, which in exchange never makes
several full-vocabulary elementwise passes through main memory.

Numerics: tiles are computed by `torch.mm` in the inputs' dtype (bf16 logits are rounded exactly
as a bf16 output layer rounds them), then upcast to float32 (float64 for float64 inputs) for the
softmax statistics. d W and d hidden partial products are computed in the inputs' dtype per tile
and accumulated in float32 across tiles (a single token block writes d W directly).

Maths and conventions (temperature, ignore_index, TP padding via vocab_size, vocab_start_index)
are those of `agro_megatron.ops.vocab_parallel`; the outputs are the same VocabParallelStats.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from agro_megatron.ops.vocab_parallel import VocabParallelStats, _resolve_group, finish_stats, grad_coefficients

# Default tile: DEFAULT_TOKEN_BLOCK tokens x DEFAULT_VOCAB_BLOCK vocabulary columns, 4 MB per
# float32 buffer (1-3 of them, plus one tile in the matmul dtype). Fastest of the sizes tried on
# CPU at V = 128256, H = 256, 2048 tokens (512x512 ... 512x4096, 2048x512, 4096x256): large
# enough that each matmul call is efficient, small enough to stay in cache.
DEFAULT_TOKEN_BLOCK = 1024
DEFAULT_VOCAB_BLOCK = 1024
_F64 = torch.float64


class _Cfg(NamedTuple):
    inv_t: float
    group: object  # None: no communication
    world: int
    start: int  # global id of this shard's first row of the weight
    cols: int  # rows of this shard's weight inside the real vocabulary (the rest is TP padding)
    tb: int  # tokens per tile
    vb: int  # vocabulary columns per tile
    ignore_index: int
    want_h: bool


def _cdt(t: torch.Tensor) -> torch.dtype:
    return _F64 if t.dtype == _F64 else torch.float32


def _tile(h, w, raw, buf):
    """h [r, H] @ w[vb, H].T in the inputs' dtype (into `raw`), returned in the compute dtype."""
    torch.mm(h, w.t(), out=raw)
    return raw if raw.dtype == buf.dtype else buf.copy_(raw)


def _rescale(m, s, dz, new_m, mq=None, sq=None, dw=None, new_mq=None):
    """Partial sums relative to the maxima (m, mq) re-expressed relative to (new_m, new_mq).

    s = sum e^{z-m}, dz = sum e^{z-m} (z-m), sq = sum e^{zq-mq}, dw = sum e^{z-m} (zq-mq).
    A token with no columns yet (s == 0, m == -inf) stays at zero (guards -inf * 0).
    """
    alpha = torch.exp(m - new_m)
    rel = torch.where(s > 0, m - new_m, 0.0)
    out = [alpha * s, alpha * (dz + rel * s)]
    if mq is not None:
        relq = torch.where(s > 0, mq - new_mq, 0.0)
        out += [torch.exp(mq - new_mq) * sq, alpha * (dw + relq * s)]
    return out


def _forward(h, w, hq, wq, target, cfg: _Cfg):
    """Outputs (compute dtype) and the float64 per-token state the backward needs.

    h [N, H], w [Vp, H]; hq [N, Hq], wq [Vp, Hq] or None; target [N] global ids.
    """
    n, dev, cdt, inv_t = h.shape[0], h.device, _cdt(h), cfg.inv_t
    has_ref = hq is not None
    want_dot = cfg.want_h or has_ref
    f64 = dict(dtype=_F64, device=dev)
    valid = target != cfg.ignore_index
    local = target - cfg.start
    owned = valid & (local >= 0) & (local < cfg.cols)

    # Running per-token state over this shard's vocab blocks (float64, O(N)).
    m = torch.full((n,), -float("inf"), **f64)
    mq = torch.full((n,), -float("inf"), **f64)
    s, dz, sq, dw, zy = (torch.zeros(n, **f64) for _ in range(5))
    tb, vb = min(cfg.tb, max(n, 1)), min(cfg.vb, max(cfg.cols, 1))
    raw = torch.empty(tb, vb, dtype=h.dtype, device=dev)
    buf = torch.empty(2 if want_dot else 1, tb, vb, dtype=cdt, device=dev)
    rawq = None if not has_ref else torch.empty(tb, vb, dtype=hq.dtype, device=dev)
    bufq = None if not has_ref else torch.empty(tb, vb, dtype=cdt, device=dev)
    for c in range(0, cfg.cols, vb):
        d = min(c + vb, cfg.cols)
        k = d - c
        # Tokens whose target column lies in this vocab block.
        hit = owned & (local >= c) & (local < d)
        for a in range(0, n, tb):
            b = min(a + tb, n)
            r = b - a
            src = _tile(h[a:b], w[c:d], raw[:r, :k], buf[0, :r, :k])
            idx = hit[a:b].nonzero().squeeze(-1)
            if idx.numel():
                zy[a + idx] = src[idx, local[a + idx] - c].to(_F64) * inv_t
            bm = src.amax(dim=-1).to(cdt).mul_(inv_t)
            shifted = torch.add(bm.neg().unsqueeze(-1), src, alpha=inv_t, out=buf[0, :r, :k])
            bm = bm.to(_F64)
            new_m = torch.maximum(m[a:b], bm)
            if not want_dot:
                bs = shifted.exp_().sum(dim=-1).to(_F64)
                s[a:b] = _rescale(m[a:b], s[a:b], dz[a:b], new_m)[0] + torch.exp(bm - new_m) * bs
                m[a:b] = new_m
                continue
            e = torch.exp(shifted, out=buf[1, :r, :k])
            bs = e.sum(dim=-1).to(_F64)
            bdz = shifted.mul_(e).sum(dim=-1).to(_F64)
            blk = [bs, bdz]
            if has_ref:
                srcq = _tile(hq[a:b], wq[c:d], rawq[:r, :k], bufq[:r, :k])
                bmq = srcq.amax(dim=-1).to(cdt).mul_(inv_t)
                shq = torch.add(bmq.neg().unsqueeze(-1), srcq, alpha=inv_t, out=buf[0, :r, :k])
                bdw = e.mul_(shq).sum(dim=-1).to(_F64)
                bsq = shq.exp_().sum(dim=-1).to(_F64)
                bmq = bmq.to(_F64)
                new_mq = torch.maximum(mq[a:b], bmq)
                run = _rescale(m[a:b], s[a:b], dz[a:b], new_m, mq[a:b], sq[a:b], dw[a:b], new_mq)
                blk = _rescale(bm, bs, bdz, new_m, bmq, bsq, bdw, new_mq)
                sq[a:b], dw[a:b] = run[2] + blk[2], run[3] + blk[3]
                mq[a:b] = new_mq
            else:
                run = _rescale(m[a:b], s[a:b], dz[a:b], new_m)
                blk = _rescale(bm, bs, bdz, new_m)
            s[a:b], dz[a:b] = run[0] + blk[0], run[1] + blk[1]
            m[a:b] = new_m

    # Across the TP group: global maxima, then every partial sum rescaled to them, one SUM.
    mx = torch.stack([m, mq]) if has_ref else m.unsqueeze(0).clone()
    if cfg.group is not None:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=cfg.group)
    big_m = mx[0]
    if has_ref:
        parts = _rescale(m, s, dz, big_m, mq, sq, dw, mx[1])
    else:
        parts = _rescale(m, s, dz, big_m)
    parts = [parts[0], torch.where(owned, zy - big_m, 0.0), owned.to(_F64)] + parts[1:]
    logp, ent, kl, lse, lse_q = finish_stats(parts, mx, valid, target, group=cfg.group, world=cfg.world,
                                             ignore_index=cfg.ignore_index, want_h=cfg.want_h,
                                             want_dot=want_dot, has_ref=has_ref,
                                             shard=f"weight shard of {w.shape[0]} rows")
    outs = tuple(None if t is None else t.to(cdt, copy=True) for t in (logp, ent, kl))
    return outs, (lse, lse_q, ent, kl, valid, owned, local)


def _backward(h, w, hq, wq, state, g_lp, g_h, g_kl, cfg: _Cfg):
    """(d hidden [N, H] float32/64, d W [Vp, H] in w's dtype) of sum(g . outputs)."""
    lse, lse_q, ent, kl, valid, owned, local = state
    n, dev, cdt, inv_t = h.shape[0], h.device, _cdt(h), cfg.inv_t
    # d/dz_v = p_v (A + B log p_v + C log q_v) + 1[v=y] g_lp/T: the logits op's coefficients
    coef_a, coef_b, coef_c, neg_lse, neg_lse_q, g_lp = grad_coefficients(state, g_lp, g_h, g_kl, inv_t, cdt)
    hot = None if g_lp is None else (g_lp * inv_t).to(cdt)

    mdt = h.dtype  # matmul dtype of the d W / d hidden products (as an unfused output layer)
    grad_w = torch.zeros_like(w)
    grad_h = torch.zeros(h.shape, dtype=cdt, device=dev)
    tb, vb = min(cfg.tb, max(n, 1)), min(cfg.vb, max(cfg.cols, 1))
    single = n <= tb  # one token block: d W rows are written by one matmul, no accumulator
    nbuf = 1 + (coef_b is not None) + (coef_c is not None)
    raw = torch.empty(tb, vb, dtype=mdt, device=dev)
    buf = torch.empty(nbuf, tb, vb, dtype=cdt, device=dev)
    rawq = None if coef_c is None else torch.empty(tb, vb, dtype=hq.dtype, device=dev)
    acc_w = None if single else torch.empty(vb, w.shape[1], dtype=cdt, device=dev)
    part_w = None if single or mdt == cdt else torch.empty(vb, w.shape[1], dtype=mdt, device=dev)
    part_h = None if mdt == cdt else torch.empty(tb, h.shape[1], dtype=mdt, device=dev)
    for c in range(0, cfg.cols, vb):
        d = min(c + vb, cfg.cols)
        k = d - c
        hit = owned & (local >= c) & (local < d)
        if not single:
            acc_w[:k].zero_()
        for a in range(0, n, tb):
            b = min(a + tb, n)
            r = b - a
            src = _tile(h[a:b], w[c:d], raw[:r, :k], buf[0, :r, :k])
            logp = torch.add(neg_lse[a:b], src, alpha=inv_t, out=buf[0, :r, :k])  # log p_v
            if coef_b is None:
                g = logp.exp_().mul_(coef_a[a:b])
            else:
                g = torch.exp(logp, out=buf[1, :r, :k])
                factor = logp.mul_(coef_b[a:b]).add_(coef_a[a:b])
                if coef_c is not None:
                    srcq = _tile(hq[a:b], wq[c:d], rawq[:r, :k], buf[2, :r, :k])
                    logq = torch.add(neg_lse_q[a:b], srcq, alpha=inv_t, out=buf[2, :r, :k])
                    factor.add_(logq.mul_(coef_c[a:b]))
                g.mul_(factor)
            if hot is not None:
                idx = hit[a:b].nonzero().squeeze(-1)
                if idx.numel():
                    g.index_put_((idx, local[a + idx] - c), hot[a + idx], accumulate=True)
            gm = g if mdt == cdt else raw[:r, :k].copy_(g)  # d logits in the matmul dtype
            # d W[c:d] += g^T h[a:b];  d hidden[a:b] += g W[c:d]
            if single:
                torch.mm(gm.t(), h[a:b], out=grad_w[c:d])
            elif part_w is None:
                acc_w[:k].addmm_(gm.t(), h[a:b])
            else:
                acc_w[:k].add_(torch.mm(gm.t(), h[a:b], out=part_w[:k]))
            if part_h is None:
                grad_h[a:b].addmm_(gm, w[c:d])
            else:
                grad_h[a:b].add_(torch.mm(gm, w[c:d], out=part_h[:r]))
        if not single:
            grad_w[c:d].copy_(acc_w[:k])
    if cfg.group is not None:  # every TP rank holds the same hidden states
        dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=cfg.group)
    return grad_h, grad_w


class _FusedOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, target, cfg, shape):
        h = hidden.reshape(-1, hidden.shape[-1])
        hq = None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1])
        (logp, ent, kl), state = _forward(h, weight, hq, ref_weight, target, cfg)
        # Saved: the caller's tensors (no copy; autograd's version counter guards them) and
        # O(tokens) float64 scalars. Nothing of size V/TP.
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight)
        ctx.state, ctx.cfg = state, cfg
        ctx.set_materialize_grads(False)
        return tuple(None if t is None else t.view(shape) for t in (logp, ent, kl))

    @staticmethod
    def backward(ctx, g_lp, g_h, g_kl):
        hidden, weight, ref_hidden, ref_weight = ctx.saved_tensors
        if g_lp is None and g_h is None and g_kl is None:
            return None, None, None, None, None, None, None
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        hq = None if ref_hidden is None else ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
        wq = None if ref_weight is None else ref_weight.detach()
        grad_h, grad_w = _backward(h, weight.detach(), hq, wq, ctx.state, g_lp, g_h, g_kl,
                                   ctx.cfg)
        grad_h = grad_h.to(hidden.dtype).view(hidden.shape)
        return (grad_h if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None, None, None, None, None, None)


def fused_output_logprobs(hidden, weight, target, ref_hidden=None, ref_weight=None, *,
                          temperature=1.0, group=None, token_block=None, vocab_block=None,
                          ignore_index=-100, compute_entropy=True, vocab_start_index=None,
                          vocab_size=None) -> VocabParallelStats:
    """Log pi(target), entropy and KL(pi || pi_ref) per token from hidden states, blockwise.

    The logits z = hidden @ weight.T are never materialised (see the module docstring).

    hidden: [..., H] final hidden states (bf16, fp32 or fp64), the same on every TP rank (as the
        input of megatron's output layer without sequence parallelism).
    weight: [V/TP, H] this rank's vocab shard of the output weight; rank r holds global ids
        [r*Vp, (r+1)*Vp) as megatron lays them out, unless `vocab_start_index`.
    target: [...] (hidden.shape[:-1]) global token ids; `ignore_index` tokens get 0 outputs and
        zero gradient.
    ref_hidden, ref_weight: the reference policy's final hidden states [..., Hq] and output-weight
        shard [V/TP, Hq] (both or neither); KL(pi || pi_ref) is returned. No gradient flows into
        them. The same temperature divides both policies' logits.
    group: process group of the vocab shards; default: megatron's TP group when megatron's
        parallel state is initialised, else a world of one (no communication). d hidden is
        summed over this group in the backward (each rank's shard contributes to it).
    token_block, vocab_block: tile size (default DEFAULT_TOKEN_BLOCK x DEFAULT_VOCAB_BLOCK).
    vocab_size: the real (unpadded) vocabulary size; weight rows at global ids >= vocab_size
        (megatron's TP padding) are excluded and get zero gradient.
    Returns VocabParallelStats(logprobs, entropy or None, kl or None), float32 (float64 for
    float64 hidden states), shaped like `target`. Gradients: d hidden and d weight.
    """
    if not torch.is_tensor(hidden) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError("hidden must be a floating-point tensor [..., H]")
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be this rank's output-weight shard [V/tp, H] with "
                         f"H = hidden.shape[-1] = {hidden.shape[-1]}, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype} "
                        f"(the output layer's matmul dtype)")
    if not torch.is_tensor(target) or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of token ids, got "
                        f"{getattr(target, 'dtype', type(target))}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] "
                         f"= {tuple(hidden.shape[:-1])}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("pass both ref_hidden and ref_weight (for KL to the reference) or "
                         "neither")
    if ref_hidden is not None:
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's "
                             f"leading dims {tuple(hidden.shape[:-1])}")
        if ref_weight.dim() != 2 or ref_weight.shape != (weight.shape[0], ref_hidden.shape[-1]):
            raise ValueError(f"ref_weight shape {tuple(ref_weight.shape)} must be "
                             f"({weight.shape[0]}, {ref_hidden.shape[-1]}): same vocab shard "
                             f"as weight, ref_hidden's hidden size")
        if ref_weight.dtype != ref_hidden.dtype:
            raise TypeError(f"ref_weight dtype {ref_weight.dtype} must equal ref_hidden dtype "
                            f"{ref_hidden.dtype}")
    if not 0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    tb = DEFAULT_TOKEN_BLOCK if token_block is None else int(token_block)
    vb = DEFAULT_VOCAB_BLOCK if vocab_block is None else int(vocab_block)
    if tb < 1 or vb < 1:
        raise ValueError(f"token_block and vocab_block must be positive, got {token_block}, "
                         f"{vocab_block}")
    vp = weight.shape[0]
    grp, world, rank = _resolve_group(group)
    start = rank * vp if vocab_start_index is None else int(vocab_start_index)
    cols = vp if vocab_size is None else min(vp, max(0, int(vocab_size) - start))
    cfg = _Cfg(1.0 / float(temperature), grp, world, start, cols, tb, vb, int(ignore_index),
               bool(compute_entropy))
    flat_target = target.reshape(-1).long()
    rh = None if ref_hidden is None else ref_hidden.detach()
    rw = None if ref_weight is None else ref_weight.detach()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad:
        return VocabParallelStats(*_FusedOutput.apply(hidden, weight, rh, rw, flat_target, cfg,
                                                      target.shape))
    with torch.no_grad():
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        hq = None if rh is None else rh.reshape(-1, rh.shape[-1])
        outs = _forward(h, weight.detach(), hq, rw, flat_target, cfg)[0]
    return VocabParallelStats(*(None if t is None else t.view(target.shape) for t in outs))
