"""Vocab-parallel log-prob: agro_megatron.ops.vocab_parallel_logprobs vs megatron-core.

    python benchmarks/vocab_parallel_logprob.py [--tokens 2048] [--reps 3]   (~2 min on 2 cores)

CPU, V = 128256 (Llama-3), bf16 logits, TP = 1 and TP = 2 (gloo ranks from run_distributed,
one torch thread per rank). Baseline (b): megatron-core's vocab_parallel_cross_entropy used
as a log-prob, as verl does: logp = -vocab_parallel_cross_entropy(logits, target). Ours (a):
vocab_parallel_logprobs(logits, target, compute_entropy=False), i.e. the same quantity.

Two workloads: fwd+bwd of sum(logp) (the policy) and forward only under no_grad (the
reference model). The logits come out of a stand-in output layer (a non-leaf autograd output
whose backward consumes d/dlogits), so the in-place gradient option is legal, as it is after
a real output layer.

Memory = peak bytes allocated by torch's CPU allocator above what existed before the step
(the logits themselves are allocated beforehand, so they are excluded). torch keeps no CPU
allocator statistics; the peak is replayed from the allocation/free events torch.profiler
(profile_memory=True) records (agro_megatron.testing.vocab_parallel_checks.
peak_allocated_bytes), in a separate, untimed run. The RSS high-water mark above the
pre-step RSS (VmHWM after resetting it through /proc/self/clear_refs) is printed next to it
as a cross-check. Time = median wall time over --reps runs (methods interleaved); with TP=2
the step time is the slower rank's. The ratios on the last line are ours (in-place) /
megatron, the larger of the TP=1 and TP=2 values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agro_megatron.testing.distributed import run_distributed  # noqa: E402

VOCAB = 128256


class _OutputLayer(torch.autograd.Function):
    """Stand-in for the output layer: emits precomputed logits as a non-leaf autograd output.

    Its backward consumes d/dlogits and keeps nothing (a real layer turns them into dW, dh).
    """

    @staticmethod
    def forward(ctx, anchor, box):
        return box.pop()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(()), None


def _rss_reset() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return _status("VmRSS")
    except OSError:
        return None


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _methods(base, target, ref):
    """name -> (needs fresh logits through the stand-in layer?, step function)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from agro_megatron.ops import vocab_parallel_logprobs as ours

    def fwd_bwd(fn):
        def step(logits):
            fn(logits).sum().backward()
        return step

    def fwd(fn):
        def step(_):
            with torch.no_grad():
                fn(base)
        return step

    meg = lambda z: -vocab_parallel_cross_entropy(z, target)  # noqa: E731
    return {
        "megatron fwd+bwd": (True, fwd_bwd(meg)),
        "ours fwd+bwd in-place": (True, fwd_bwd(
            lambda z: ours(z, target, compute_entropy=False, inplace_backward=True).logprobs)),
        "ours fwd+bwd": (True, fwd_bwd(lambda z: ours(z, target, compute_entropy=False).logprobs)),
        "ours +H+KL fwd+bwd in-place": (True, fwd_bwd(
            lambda z: sum(ours(z, target, ref, inplace_backward=True)))),
        "megatron fwd no_grad": (False, fwd(meg)),
        "ours fwd no_grad": (False, fwd(lambda z: ours(z, target, compute_entropy=False).logprobs)),
    }


def bench_rank(tokens: int, reps: int, seed: int) -> dict:
    from megatron.core import parallel_state as ps

    from agro_megatron.testing.vocab_parallel_checks import peak_allocated_bytes

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    vp = VOCAB // tp
    g = torch.Generator().manual_seed(seed + rank)
    base = (torch.randn(tokens, vp, generator=g) * 2).bfloat16()
    ref = (base.float() + 0.3 * torch.randn(tokens, vp, generator=g)).bfloat16()
    target = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(seed))
    anchor = torch.zeros((), requires_grad=True)
    methods = _methods(base, target, ref)
    res = {name: {"times": [], "rss": []} for name in methods}

    def run(name, measure_memory):
        layer, step = methods[name]
        logits = _OutputLayer.apply(anchor, [base.clone()]) if layer else None
        dist.barrier()
        if measure_memory:  # untimed, doubles as the warm-up run
            res[name]["peak"] = peak_allocated_bytes(lambda: step(logits))
            return
        before = _rss_reset()
        t0 = time.perf_counter()
        step(logits)
        dt = time.perf_counter() - t0
        if before is not None:
            res[name]["rss"].append(_status("VmHWM") - before)
        slowest = torch.tensor([dt], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        res[name]["times"].append(float(slowest))

    for name in methods:
        run(name, True)
    for _ in range(reps):
        for name in methods:
            run(name, False)
    out = {"logits_bytes": base.numel() * base.element_size()}
    for name, r in res.items():
        out[name] = {"peak": r["peak"], "rss": max(r["rss"]) if r["rss"] else float("nan"),
                     "time": statistics.median(r["times"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"V={VOCAB} tokens={args.tokens} bf16 logits, CPU, 1 torch thread per rank, "
          f"median of {args.reps}")
    print("memory: torch CPU-allocator peak above the pre-step allocations (torch.profiler "
          "memory events); rss: VmHWM above pre-step VmRSS (cross-check)")
    ratios = {"peak": [], "fwd": [], "time": []}
    t_start = time.perf_counter()
    for tp in (1, 2):
        per_rank = run_distributed(bench_rank, tp, tp=tp, args=(args.tokens, args.reps, args.seed))
        lb = per_rank[0]["logits_bytes"]
        names = [k for k in per_rank[0] if k != "logits_bytes"]
        agg = {n: {"peak": max(r[n]["peak"] for r in per_rank),
                   "rss": max(r[n]["rss"] for r in per_rank),
                   "time": per_rank[0][n]["time"]} for n in names}
        print(f"\nTP={tp}: logits per rank {lb / 2**20:.0f} MiB (bf16 [{args.tokens}, {VOCAB // tp}])")
        print(f"  {'method':30s} {'peak MiB':>9s} {'B/elem':>7s} {'rss MiB':>8s} {'time s':>7s}")
        for n in names:
            a = agg[n]
            print(f"  {n:30s} {a['peak'] / 2**20:9.1f} {2 * a['peak'] / lb:7.3f} "
                  f"{a['rss'] / 2**20:8.1f} {a['time']:7.3f}")
        meg, mfwd = agg["megatron fwd+bwd"], agg["megatron fwd no_grad"]
        ours, ofwd = agg["ours fwd+bwd in-place"], agg["ours fwd no_grad"]
        r = (ours["peak"] / meg["peak"], ofwd["peak"] / mfwd["peak"], ours["time"] / meg["time"])
        print(f"  TP={tp}: peak_mem_ratio={r[0]:.4f} fwd_mem_ratio={r[1]:.4f} "
              f"time_ratio={r[2]:.3f} (without in-place: peak "
              f"{agg['ours fwd+bwd']['peak'] / meg['peak']:.3f}, time "
              f"{agg['ours fwd+bwd']['time'] / meg['time']:.3f}; fwd-only time "
              f"{ofwd['time'] / mfwd['time']:.3f})")
        for k, v in zip(ratios, r):
            ratios[k].append(v)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; ratios below: max over TP=1, TP=2")
    print(f"peak_mem_ratio={max(ratios['peak']):.4f} fwd_mem_ratio={max(ratios['fwd']):.4f} "
          f"time_ratio={max(ratios['time']):.3f}")


if __name__ == "__main__":
    main()
