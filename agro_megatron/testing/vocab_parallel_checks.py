"""Reference, comparison and memory helpers for agro_megatron.ops.vocab_parallel.

Used by tests/test_vocab_parallel.py (also inside gloo ranks started by run_distributed) and by
benchmarks/vocab_parallel_logprob.py. The reference is independent of the op: float64
log_softmax over the full (gathered) vocabulary, differentiated by autograd.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.distributed as dist

from agro_megatron.ops import vocab_parallel_logprobs

OUTPUTS = ("logprobs", "entropy", "kl")


def reference(logits, target, ref_logits=None, *, temperature=1.0, ignore_index=-100,
              vocab_size=None):
    """(log pi(y), H, KL(pi||pi_ref)) in float64 from full-vocabulary logits [..., V]."""
    v = logits.shape[-1] if vocab_size is None else vocab_size
    lp = torch.log_softmax(logits[..., :v].double() / temperature, dim=-1)
    valid = target != ignore_index
    zero = torch.zeros((), dtype=torch.float64)
    logp = torch.where(valid, lp.gather(-1, target.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1), zero)
    ent = torch.where(valid, -(lp.exp() * lp).sum(-1), zero)
    kl = None
    if ref_logits is not None:
        lq = torch.log_softmax(ref_logits[..., :v].double() / temperature, dim=-1)
        kl = torch.where(valid, (lp.exp() * (lp - lq)).sum(-1), zero)
    return logp, ent, kl


def rel_err(a, b) -> float:
    """max |a - b| / max(1, max |b|): absolute for O(1) quantities, relative for large ones."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def case(full, target, ref_full=None, *, shard=(0, 1), dtype=torch.float32, upstream=None,
         inplace=False, start=None, **opts) -> dict:
    """Run the op on one vocab shard of `full` and compare with the float64 reference.

    full, ref_full: [..., V] float64 full-vocabulary logits (rounded to `dtype` before use);
    shard: (index, count) of this rank's equal slice, or `start` for an explicit offset.
    upstream: per-output gradient tensors (None entries: that output is not used in the loss).
    Returns {"logprobs": err, ..., "grad": err, "ref_unchanged": bool, "logits_unchanged": bool}.
    """
    idx, count = shard
    vp = full.shape[-1] // count
    lo = idx * vp if start is None else start
    rounded = full.to(dtype)
    ref_rounded = None if ref_full is None else ref_full.to(dtype)
    leaf = rounded[..., lo:lo + vp].clone().requires_grad_(upstream is not None)
    logits = leaf.clone() if inplace else leaf  # a non-leaf, as straight from an output layer
    ref_shard = None if ref_rounded is None else ref_rounded[..., lo:lo + vp].clone()
    before, ref_before = leaf.detach().clone(), None if ref_shard is None else ref_shard.clone()
    out = vocab_parallel_logprobs(logits, target, ref_shard, inplace_backward=inplace,
                                  vocab_start_index=start, **opts)
    rfull = rounded.double().requires_grad_(upstream is not None)
    ref_out = reference(rfull, target, None if ref_rounded is None else ref_rounded.double(),
                        temperature=opts.get("temperature", 1.0),
                        ignore_index=opts.get("ignore_index", -100),
                        vocab_size=opts.get("vocab_size"))
    res = {}
    for name, a, b in zip(OUTPUTS, out, ref_out):
        if a is None:
            continue
        res[name] = rel_err(a, b)
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if upstream is not None:
        loss = sum((a * g).sum() for a, g in zip(out, upstream) if g is not None and a is not None)
        rloss = sum((b * g).sum() for b, g in zip(ref_out, upstream) if g is not None and b is not None)
        loss.backward()
        rloss.backward()
        res["grad"] = rel_err(leaf.grad, rfull.grad[..., lo:lo + vp])
        res["grad_dtype_ok"] = leaf.grad.dtype == dtype
    if not inplace:
        res["logits_unchanged"] = bool(torch.equal(leaf.detach(), before))
    if ref_shard is not None:
        res["ref_unchanged"] = bool(torch.equal(ref_shard, ref_before))
    return res


def peak_allocated_bytes(fn) -> int:
    """Peak bytes allocated by torch's CPU allocator while `fn()` runs, above what existed before.

    torch has no CPU allocator statistics, so this replays the allocation/free events that
    torch.profiler(profile_memory=True) records from the CPU allocator (every tensor storage
    torch allocates), keyed by address. Blocks allocated before `fn` do not count; neither do
    allocations made outside torch's allocator (gloo's internal buffers, oneDNN scratch).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live, cur, peak = {}, 0, 0
    for e in events:
        a = e["args"]
        if a.get("Device Type", 0) != 0:
            continue
        addr, nbytes = a["Addr"], a["Bytes"]
        if nbytes > 0:
            live[addr] = nbytes
            cur += nbytes
            peak = max(peak, cur)
        elif addr in live:
            cur -= live.pop(addr)
    return peak


# ------------------------------------------------------------------ distributed worker
def make_data(seed, n, v, *, scale=2.0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    ref_full = full + 0.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore:
        target[torch.randperm(n, generator=g)[: n // 5]] = -100
    ups = tuple(torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    return full, ref_full, target, ups


def distributed_checks(seed: int = 0) -> dict:
    """Run inside every rank with megatron TP initialised; returns {case name: result dict}."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    world, wr = dist.get_world_size(), dist.get_rank()
    dp_rank = ps.get_data_parallel_rank()
    n, vp = 53, 24
    v = vp * tp
    # Different data per DP replica: mixing in the wrong group would show.
    full, ref_full, target, ups = make_data(seed + 100 * dp_rank, n, v)
    for k in range(tp):  # a token owned by every rank, at both ends of each shard
        target[2 * k], target[2 * k + 1] = k * vp, k * vp + vp - 1
    out = {"owners": sorted({int(t) // vp for t in target.tolist() if t >= 0})}
    shard = (r, tp)
    out["fp32"] = case(full, target, ref_full, shard=shard, upstream=ups, chunk_size=7)
    out["fp32_T"] = case(full, target, ref_full, shard=shard, upstream=ups, chunk_size=16,
                         temperature=0.7)
    out["fp32_logp_only"] = case(full, target, shard=shard, upstream=(ups[0], None, None),
                                 chunk_size=5, compute_entropy=False)
    out["bf16"] = case(full, target, ref_full, shard=shard, dtype=torch.bfloat16, upstream=ups,
                       chunk_size=8, temperature=1.3)
    out["bf16_inplace"] = case(full, target, ref_full, shard=shard, dtype=torch.bfloat16,
                               upstream=ups, chunk_size=8, temperature=1.3, inplace=True)
    out["fp32_inplace"] = case(full, target, ref_full, shard=shard, upstream=ups, chunk_size=6,
                               inplace=True)
    with torch.no_grad():
        out["no_grad"] = case(full, target, ref_full, shard=shard, chunk_size=9)

    # Explicit group = the whole world, shards in reversed order via vocab_start_index, and
    # megatron-style TP padding: vocab_size cuts into the second-to-last shard, so with 4
    # ranks the last shard is padding only.
    vpw = 10
    vw = vpw * world
    fw, rw, tw, uw = make_data(seed + 7, 31, vw)
    vocab = vw - vpw - 3
    tw = torch.where(tw >= vocab, tw % vocab, tw)
    pos = world - 1 - wr
    out["world_reversed_padded"] = case(
        fw, tw, rw, shard=(pos, world), start=pos * vpw, upstream=uw, chunk_size=4,
        group=dist.group.WORLD, vocab_size=vocab)
    out["world_padded_inplace"] = case(
        fw, tw, rw, shard=(wr, world), upstream=uw, chunk_size=4, group=dist.group.WORLD,
        vocab_size=vocab, inplace=True, temperature=0.8)
    bad = tw.clone()
    bad[0] = vocab + 1  # inside the padding: no rank owns it
    try:
        vocab_parallel_logprobs(fw[:, wr * vpw:(wr + 1) * vpw].float(), bad,
                                group=dist.group.WORLD, vocab_size=vocab)
        out["bad_target_raised"] = False
    except ValueError as e:
        out["bad_target_raised"] = "not owned" in str(e)
    return out
