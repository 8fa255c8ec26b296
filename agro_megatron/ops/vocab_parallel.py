"""Per-token log pi(y_t), entropy H_t and KL(pi || pi_ref) over a TP-sharded vocabulary.

Why a fused op: at V = 128256 and thousands of tokens, one fp32 copy of the logits is several
GB per rank. Megatron's `vocab_parallel_cross_entropy` keeps exactly such a copy (the softmax)
for backward and returns an fp32 gradient. Here the forward keeps only per-token scalars
(log-sum-exp, H, KL) plus references to the caller's logits, and the backward recomputes the
softmax chunk by chunk from them (docs/algorithm.md §6). Tokens are processed `chunk_size` at a
time in both directions, so the only full-vocabulary temporaries are two or three fp32 chunk
buffers (plus the gradient itself, unless `inplace_backward` reuses the logits' storage).

Maths (T = temperature, applied to both policies: pi = softmax(z/T), pi_ref = softmax(z_ref/T)):
    log pi(y) = z_y/T - lse,   H = lse - E_pi[z/T],   KL = E_pi[z/T - z_ref/T] - lse + lse_ref,
    d logp/dz_v = (1[v=y] - p_v)/T,  d H/dz_v = -p_v (log p_v + H)/T,
    d KL/dz_v = p_v (log p_v - log q_v - KL)/T       (no gradient reaches z_ref).
Each rank reduces its shard relative to its own maximum; two all-reduces over the TP group
(MAX of the shard maxima, then one SUM of stacked per-token partial sums, which also carries
the target logit from the one rank that owns it) give the global values. The vocabulary is
never gathered.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

# Elements per fp32 chunk buffer when chunk_size is None: 1M elements = 4 MB, so the two or
# three buffers stay in cache while each vectorised op still sees a million elements.
AUTO_CHUNK_ELEMENTS = 1 << 20
_F64 = torch.float64


class VocabParallelStats(NamedTuple):
    """Per-token outputs shaped like `target`; float32 (float64 for float64 logits)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    kl: torch.Tensor | None


class _Cfg(NamedTuple):
    inv_t: float
    group: object  # None: no communication
    world: int
    start: int  # global id of this shard's first column
    cols: int  # columns of this shard inside the real vocabulary (the rest is TP padding)
    chunk: int
    ignore_index: int
    want_h: bool
    inplace: bool


def _resolve_group(group):
    """(group or None, world size, rank): explicit group, megatron's TP group, or one rank."""
    if group is None:
        # Only consult megatron when someone already imported and initialised it.
        ps = sys.modules.get("megatron.core.parallel_state")
        if ps is None or not dist.is_initialized() or not ps.model_parallel_is_initialized():
            return None, 1, 0
        group = ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    return (group if world > 1 else None), world, dist.get_rank(group)


def _as_2d(t: torch.Tensor, vp: int) -> torch.Tensor:
    """[..., Vp] -> [N, Vp], without a copy whenever the layout allows it."""
    try:
        return t.view(-1, vp)
    except RuntimeError:
        return t.reshape(-1, vp)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return _F64 if t.dtype == _F64 else torch.float32


def _in_compute_dtype(chunk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """The chunk itself when it already has the compute dtype, else converted into `buf`.

    One explicit conversion copy: mixed-dtype ops would allocate a converted temporary per op.
    """
    return chunk if chunk.dtype == buf.dtype else buf.copy_(chunk)


def _shard_sums(z, w, cfg: _Cfg, want_dot: bool):
    """Per-token partial sums over this shard's columns, chunk by chunk (float64 results).

    m = max z/T, s = sum e, dz = sum e (z/T - m) with e = exp(z/T - m); for the reference:
    mq, sq = its max and sum exp, dw = sum e (z_ref/T - mq).
    """
    n, cdt, inv_t = z.shape[0], _compute_dtype(z), cfg.inv_t
    names = ("m", "s", "dz", "mq", "sq", "dw")
    out = {k: torch.zeros(n, dtype=_F64, device=z.device) for k in names}
    if cfg.cols == 0:  # a shard made only of TP padding contributes nothing
        out["m"].fill_(-float("inf"))
        out["mq"].fill_(-float("inf"))
        return out
    m, s, dz, mq, sq, dw = out.values()
    buf = torch.empty(2 if want_dot else 1, min(cfg.chunk, n), cfg.cols, dtype=cdt,
                      device=z.device)
    for a in range(0, n, cfg.chunk):
        b = min(a + cfg.chunk, n)
        r = b - a
        src = _in_compute_dtype(z[a:b], buf[0, :r])
        mc = src.amax(dim=-1).to(cdt).mul_(inv_t)
        m[a:b] = mc
        shifted = torch.add(mc.neg_().unsqueeze(-1), src, alpha=inv_t, out=buf[0, :r])
        if not want_dot:
            s[a:b] = shifted.exp_().sum(dim=-1)
            continue
        e = torch.exp(shifted, out=buf[1, :r])
        s[a:b] = e.sum(dim=-1)
        # Products in place (linalg.vecdot would allocate a chunk-sized temporary).
        dz[a:b] = shifted.mul_(e).sum(dim=-1)
        if w is not None:
            src = _in_compute_dtype(w[a:b], buf[0, :r])
            mqc = src.amax(dim=-1).to(cdt).mul_(inv_t)
            mq[a:b] = mqc
            shifted = torch.add(mqc.neg_().unsqueeze(-1), src, alpha=inv_t, out=buf[0, :r])
            dw[a:b] = e.mul_(shifted).sum(dim=-1)
            sq[a:b] = shifted.exp_().sum(dim=-1)
    return out


def _forward(z, w, target, cfg: _Cfg):
    """Outputs (in the compute dtype) and the float64 per-token state the backward needs.

    z, w: [N, Vp] (w may be None); target: [N] global ids.
    """
    n, vp = z.shape
    want_dot = cfg.want_h or w is not None
    cols = slice(0, cfg.cols)
    st = _shard_sums(z[:, cols], None if w is None else w[:, cols], cfg, want_dot)
    m, s = st["m"], st["s"]

    valid = target != cfg.ignore_index
    local = target - cfg.start
    owned = valid & (local >= 0) & (local < cfg.cols)
    idx = owned.nonzero().squeeze(-1)
    zy = torch.zeros(n, dtype=_F64, device=z.device)
    zy[idx] = z[idx, local[idx]].to(_F64) * cfg.inv_t

    # Global maxima, then every partial sum rescaled to them, in one SUM all-reduce.
    mx = torch.stack([m, st["mq"]]) if w is not None else m.unsqueeze(0).clone()
    if cfg.group is not None:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=cfg.group)
    big_m = mx[0]
    alpha = torch.exp(m - big_m)
    rel = torch.where(s > 0, m - big_m, 0.0)  # guards -inf * 0 for an all-padding shard
    parts = [alpha * s, torch.where(owned, zy - big_m, 0.0), owned.to(_F64)]
    if want_dot:
        parts.append(alpha * (st["dz"] + rel * s))  # sum_v e^{z/T - M} (z/T - M)
    if w is not None:
        mq, big_mq = st["mq"], mx[1]
        relq = torch.where(s > 0, mq - big_mq, 0.0)
        parts.append(torch.exp(mq - big_mq) * st["sq"])
        parts.append(alpha * (st["dw"] + relq * s))  # sum_v e^{z/T - M} (z_ref/T - M_ref)
    logp, ent, kl, lse, lse_q = finish_stats(parts, mx, valid, target, group=cfg.group, world=cfg.world,
                                             ignore_index=cfg.ignore_index, want_h=cfg.want_h,
                                             want_dot=want_dot, has_ref=w is not None, shard=f"shard size {vp}")
    odt = _compute_dtype(z)
    # Copies (also for float64): the float64 state must not alias what the caller receives.
    outs = tuple(None if t is None else t.to(odt, copy=True) for t in (logp, ent, kl))
    return outs, (lse, lse_q, ent, kl, valid, owned, local)


def finish_stats(parts: list, mx: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, *, group, world: int,
                 ignore_index: int, want_h: bool, want_dot: bool, has_ref: bool, shard: str):
    """The one SUM all-reduce of the rescaled per-shard partial sums and the statistics made from
    them, shared by this op and the hidden-state op (ops/fused_output.py), which differ only in
    how the partial sums are gathered. `parts` (float64, [N] each, rescaled to the global maxima
    `mx`): sum e^{z/T-M}, z_y/T - M on the owning shard, the ownership count, then (want_dot)
    sum e^{z/T-M}(z/T-M) and (has_ref) the reference's sum e^{z_ref/T-M_ref} and
    sum e^{z/T-M}(z_ref/T-M_ref). Returns (log-prob, entropy, KL, lse, lse_ref) in float64; a
    target owned by no shard or by several is a ValueError naming it (`shard` describes the shards)."""
    tot = torch.stack(parts)
    if group is not None:
        dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
    lost = valid & (tot[2] != 1)
    if bool(lost.any()):
        raise ValueError(
            f"target ids {target[lost][:5].tolist()} are not owned by exactly one vocab shard "
            f"({shard}, {world} rank(s)): targets must lie in [0, vocab_size) or "
            f"equal ignore_index ({ignore_index}); pass vocab_start_index when rank r does "
            f"not hold [r*Vp, (r+1)*Vp)")
    zero = torch.zeros((), dtype=_F64, device=tot.device)
    log_sigma = torch.log(tot[0])
    lse = mx[0] + log_sigma
    logp = torch.where(valid, tot[1] - log_sigma, zero)
    ent = kl = lse_q = None
    if want_dot:
        ez = tot[3] / tot[0]  # E_pi[z/T] - M
        if want_h:
            ent = torch.where(valid, log_sigma - ez, zero)
        if has_ref:
            log_sigma_q = torch.log(tot[4])
            lse_q = mx[1] + log_sigma_q
            kl = torch.where(valid, ez - tot[5] / tot[0] - log_sigma + log_sigma_q, zero)
    return logp, ent, kl, lse, lse_q


def grad_coefficients(state, g_lp, g_h, g_kl, inv_t: float, cdt: torch.dtype):
    """The per-token coefficients of the gradient of sum(g . (log-prob, entropy, KL)) with respect
    to the logits, shared by this op and the hidden-state op (ops/fused_output.py), which only
    differ in where the logits come from:

        d/dz_v = p_v (A + B log p_v + C log q_v) + 1[v = y] g_lp / T

    `state` is the forward's (lse, lse_q, ent, kl, valid, owned, local). Returns (A, B, C, -lse,
    -lse_q, g_lp masked to valid tokens), the first five as [N, 1] columns in `cdt` (B, C and
    -lse_q are None when no entropy/KL gradient or no reference is involved)."""
    lse, lse_q, ent, kl, valid, _, _ = state
    n = lse.shape[0]
    f64 = dict(dtype=_F64, device=lse.device)
    zero = torch.zeros((), **f64)
    mask = lambda g: torch.where(valid, g.reshape(-1).to(_F64), zero)  # noqa: E731
    coef_a = torch.zeros(n, **f64)
    coef_b = torch.zeros(n, **f64) if (g_h is not None or g_kl is not None) else None
    coef_c = None
    if g_lp is not None:
        g_lp = mask(g_lp)
        coef_a -= g_lp
    if g_h is not None:
        g_h = mask(g_h)
        coef_a -= g_h * ent
        coef_b -= g_h
    if g_kl is not None:
        g_kl = mask(g_kl)
        coef_a -= g_kl * kl
        coef_b += g_kl
        coef_c = (-g_kl * inv_t).to(cdt).unsqueeze(-1)
    col = lambda t: (t * inv_t).to(cdt).unsqueeze(-1)  # noqa: E731
    neg_lse_q = None if lse_q is None else (-lse_q).to(cdt).unsqueeze(-1)
    return (col(coef_a), None if coef_b is None else col(coef_b), coef_c, (-lse).to(cdt).unsqueeze(-1),
            neg_lse_q, g_lp)


def _backward(z, w, grad_out, state, g_lp, g_h, g_kl, cfg: _Cfg):
    """d(sum g . outputs)/dz written chunk by chunk into `grad_out` (which may be z itself)."""
    lse, lse_q, ent, kl, valid, owned, local = state
    n, inv_t, cdt = z.shape[0], cfg.inv_t, _compute_dtype(z)
    coef_a, coef_b, coef_c, neg_lse, neg_lse_q, g_lp = grad_coefficients(state, g_lp, g_h, g_kl, inv_t, cdt)

    if cfg.cols < z.shape[1]:
        grad_out[:, cfg.cols:].zero_()  # TP padding columns are outside the distribution
    cols = slice(0, cfg.cols)
    z, grad_out, w = z[:, cols], grad_out[:, cols], (None if w is None else w[:, cols])
    nbuf = 1 + (coef_b is not None) + (coef_c is not None)
    buf = torch.empty(nbuf, min(cfg.chunk, n), cfg.cols, dtype=cdt, device=z.device)
    direct = grad_out.dtype == cdt
    for a in range(0, n if cfg.cols else 0, cfg.chunk):
        b = min(a + cfg.chunk, n)
        r = b - a
        src = _in_compute_dtype(z[a:b], buf[0, :r])
        logp = torch.add(neg_lse[a:b], src, alpha=inv_t, out=buf[0, :r])  # log p_v
        if coef_b is None:  # log-prob only: grad = p A
            g, factor = logp.exp_(), coef_a[a:b]
        else:
            g = torch.exp(logp, out=buf[1, :r])
            factor = logp.mul_(coef_b[a:b]).add_(coef_a[a:b])  # A + B log p, in place
            if coef_c is not None:
                src = _in_compute_dtype(w[a:b], buf[2, :r])
                logq = torch.add(neg_lse_q[a:b], src, alpha=inv_t, out=buf[2, :r])
                factor.add_(logq.mul_(coef_c[a:b]))
        # Written last: with inplace_backward, grad_out[a:b] is this very chunk of the logits.
        if direct:
            torch.mul(g, factor, out=grad_out[a:b])
        else:
            grad_out[a:b].copy_(g.mul_(factor))
    if g_lp is not None:
        idx = owned.nonzero().squeeze(-1)
        grad_out.index_put_((idx, local[idx]), (g_lp[idx] * inv_t).to(grad_out.dtype),
                            accumulate=True)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, target, cfg, shape):
        vp = logits.shape[-1]
        z = _as_2d(logits, vp)
        w = None if ref_logits is None else _as_2d(ref_logits, vp)
        (logp, ent, kl), state = _forward(z, w, target, cfg)
        # Saved: the caller's tensors themselves (no copy; autograd's version counter guards
        # them) and O(tokens) float64 scalars.
        ctx.save_for_backward(logits, ref_logits)
        ctx.state, ctx.cfg = state, cfg
        ctx.set_materialize_grads(False)
        return tuple(None if t is None else t.view(shape) for t in (logp, ent, kl))

    @staticmethod
    def backward(ctx, g_lp, g_h, g_kl):
        # Unpacking raises if logits/ref_logits were modified in place after the forward
        # (this includes a previous in-place backward on the same logits).
        logits, ref_logits = ctx.saved_tensors
        state, cfg = ctx.state, ctx.cfg
        if g_lp is None and g_h is None and g_kl is None:
            return None, None, None, None, None
        logits = logits.detach()
        vp = logits.shape[-1]
        z = _as_2d(logits, vp)
        w = None if ref_logits is None else _as_2d(ref_logits.detach(), vp)
        # In place: the gradient overwrites the logits' storage; out= writes bump its version
        # counter, so any other saved user of these logits fails loudly in its backward.
        grad = z if cfg.inplace else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        _backward(z, w, grad, state, g_lp, g_h, g_kl, cfg)
        return grad.view(logits.shape), None, None, None, None


def vocab_parallel_logprobs(logits, target, ref_logits=None, *, temperature=1.0, group=None,
                            chunk_size=None, ignore_index=-100, compute_entropy=True,
                            inplace_backward=False, vocab_start_index=None,
                            vocab_size=None) -> VocabParallelStats:
    """Log pi(target), entropy and KL(pi || pi_ref) per token over a TP-sharded vocabulary.

    logits: [..., Vp] this rank's vocab shard (bf16, fp32 or fp64, finite); rank r holds
        global ids [r*Vp, (r+1)*Vp) as megatron lays them out, unless `vocab_start_index`.
    target: [...] global token ids; `ignore_index` tokens get 0 outputs and zero gradient.
    ref_logits: optional reference-policy shard, same shape; no gradient flows into it.
        The same temperature divides both: pi = softmax(z/T), pi_ref = softmax(z_ref/T).
    group: process group of the vocab shards; default: megatron's TP group when megatron's
        parallel state is initialised, else a world of one (no communication).
    chunk_size: tokens per chunk; default: as many as fit AUTO_CHUNK_ELEMENTS fp32 values.
    vocab_size: the real (unpadded) vocabulary size; columns at global ids >= vocab_size
        (megatron's TP padding) are excluded and get zero gradient. Default: none excluded.
    inplace_backward: the backward writes d/dlogits into the logits' own storage instead of a
        new buffer. Valid only when this op is the logits' sole consumer (e.g. straight from
        the output layer). Misuse that is detected: leaf logits or a view of a leaf (the
        caller's own values would be overwritten; raises here); logits or ref_logits modified in place between forward
        and backward, a second backward through the graph, or a second in-place op on the
        same logits (autograd's version check raises); another autograd op that saved the
        logits and runs its backward after this one (its version check raises). Not
        detectable: the caller reading a reference it kept after backward, or code that stashes
        the tensor outside autograd.
    Returns VocabParallelStats(logprobs, entropy or None, kl or None), float32 (float64 for
    float64 logits). Under no_grad, or for logits that do not require grad, nothing is saved.
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError("logits must be a floating-point tensor [..., V/tp]")
    if not torch.is_tensor(target) or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must be an integer tensor of token ids, got "
                        f"{getattr(target, 'dtype', type(target))}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits.shape[:-1] "
                         f"= {tuple(logits.shape[:-1])}")
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal the logits "
                         f"shape {tuple(logits.shape)}")
    if not 0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    vp = logits.shape[-1]
    chunk = max(1, AUTO_CHUNK_ELEMENTS // vp) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and needs_grad:
        base = logits if logits._base is None else logits._base
        if logits.grad_fn is None or base.grad_fn is None:
            raise ValueError(
                "inplace_backward=True needs logits produced by an autograd op (e.g. the output "
                "layer); these are a leaf tensor the caller owns (or a view of one), and the "
                "backward would overwrite their values. Pass inplace_backward=False.")
        try:
            logits.view(-1, vp)
        except RuntimeError:
            raise ValueError("inplace_backward=True needs logits whose leading dims flatten "
                             "without a copy; pass contiguous logits or inplace_backward=False"
                             ) from None
    grp, world, rank = _resolve_group(group)
    start = rank * vp if vocab_start_index is None else int(vocab_start_index)
    cols = vp if vocab_size is None else min(vp, max(0, int(vocab_size) - start))
    cfg = _Cfg(1.0 / float(temperature), grp, world, start, cols, chunk, int(ignore_index),
               bool(compute_entropy), bool(inplace_backward))
    flat_target = target.reshape(-1).long()
    ref = None if ref_logits is None else ref_logits.detach()
    if needs_grad:
        return VocabParallelStats(*_VocabParallelLogprobs.apply(
            logits, ref, flat_target, cfg, target.shape))
    with torch.no_grad():
        z = _as_2d(logits.detach(), vp)
        outs = _forward(z, None if ref is None else _as_2d(ref, vp), flat_target, cfg)[0]
    return VocabParallelStats(*(None if t is None else t.view(target.shape) for t in outs))
