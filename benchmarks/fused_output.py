"""Fused output layer + log-prob (logits never materialised) vs megatron's output layer + CE.

    python benchmarks/fused_output.py [--tokens 2048] [--hidden 256] [--reps 3]   (~2-6 min on 2 busy cores)

CPU, V = 128256 (Llama-3), bf16 hidden states and output weight, TP = 1 and TP = 2 (gloo ranks
from run_distributed, one torch thread per rank). Per rank the weight shard is [V/TP, H].

Baseline (b), measured in the same run: megatron-core's ColumnParallelLinear (no bias, no
gather: the GPT output layer) on hidden [tokens, 1, H], then megatron's
vocab_parallel_cross_entropy; fwd+bwd of sum(CE), which gives d hidden and d W.
Ours (a): agro_megatron.ops.fused_output.fused_output_logprobs(hidden, layer.weight, target,
compute_entropy=False): the same log-probs (= -CE) and the same gradients, on the same
Parameter; the benchmark checks they agree. Also printed (not in the ratios): forward-only under
no_grad (the reference model's pass) for both, and with --all-outputs ours with entropy and KL to
a reference (ref hidden + ref weight).

Memory = peak bytes allocated by torch's CPU allocator above what existed before the step
(hidden, weight, targets exist beforehand; everything the step allocates counts, including the
d W and d hidden it returns). torch keeps no CPU allocator statistics, so the peak is replayed
from the allocation/free events torch.profiler(profile_memory=True) records
(agro_megatron.testing.vocab_parallel_checks.peak_allocated_bytes), in a separate, untimed run.
d W ([V/TP, H], identical for both) is also shown separately: under megatron's DDP it lands in a
persistent gradient buffer, so "excl dW" is the per-micro-batch activation cost. Time = median
wall time over --reps runs (methods interleaved); with TP=2 a step's time is the slower rank's.
Last line: ours / baseline for fwd+bwd, the larger of the TP=1 and TP=2 values.
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


def _output_layer(hidden_size: int, tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=torch.bfloat16,
                              use_cpu_initialization=True, perform_initialization=False)
    return ColumnParallelLinear(hidden_size, VOCAB, config=cfg, init_method=lambda w: None,
                                bias=False, gather_output=False)


def bench_rank(tokens: int, hidden_size: int, reps: int, seed: int, all_outputs: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from agro_megatron.ops.fused_output import fused_output_logprobs as ours
    from agro_megatron.testing.vocab_parallel_checks import peak_allocated_bytes

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    vp = VOCAB // tp
    layer = _output_layer(hidden_size, tp)
    assert layer.weight.shape == (vp, hidden_size), layer.weight.shape
    g = torch.Generator().manual_seed(seed)  # same hidden/targets on every rank
    hid0 = torch.randn(tokens, 1, hidden_size, generator=g).bfloat16()
    target = torch.randint(0, VOCAB, (tokens, 1), generator=g)
    ref_hid = (hid0.float() + 0.3 * torch.randn(hid0.shape, generator=g)).bfloat16()
    gw = torch.Generator().manual_seed(seed + 1 + rank)  # this rank's shard of the weights
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vp, hidden_size, generator=gw) * (2 / hidden_size ** 0.5))
    ref_w = (layer.weight.detach().float()
             + 0.3 / hidden_size ** 0.5 * torch.randn(vp, hidden_size, generator=gw)).bfloat16()
    w = layer.weight
    hidden = hid0.clone().requires_grad_()

    def meg_fwd_bwd():
        logits, _ = layer(hidden)
        vocab_parallel_cross_entropy(logits, target).sum().backward()

    def ours_fwd_bwd():
        (-ours(hidden, w, target, compute_entropy=False).logprobs).sum().backward()

    def ours_all_fwd_bwd():
        sum(t.sum() for t in ours(hidden, w, target, ref_hid, ref_w)).backward()

    def meg_fwd():
        with torch.no_grad():
            vocab_parallel_cross_entropy(layer(hid0)[0], target)

    def ours_fwd():
        with torch.no_grad():
            ours(hid0, w, target, compute_entropy=False)

    methods = {"megatron fwd+bwd": meg_fwd_bwd, "ours fwd+bwd": ours_fwd_bwd,
               "megatron fwd no_grad": meg_fwd, "ours fwd no_grad": ours_fwd}
    if all_outputs:
        methods["ours +H+KL fwd+bwd"] = ours_all_fwd_bwd

    # Agreement check (also the warm-up): same log-probs and gradients.
    grads = {}
    for name in ("megatron fwd+bwd", "ours fwd+bwd"):
        hidden.grad = w.grad = None
        methods[name]()
        grads[name] = (hidden.grad.float(), w.grad.float())
    with torch.no_grad():
        lp_meg = -vocab_parallel_cross_entropy(layer(hid0)[0], target)
        lp_ours = ours(hid0, w, target, compute_entropy=False).logprobs
    (hm, wm), (ho, wo) = grads["megatron fwd+bwd"], grads["ours fwd+bwd"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    check = {"logp_max_abs": float((lp_meg - lp_ours).abs().max()),
             "d_hidden_rel": rel(ho, hm), "d_weight_rel": rel(wo, wm)}
    del grads, hm, wm, ho, wo

    res = {name: {"times": []} for name in methods}

    def run(name, measure_memory):
        hidden.grad = w.grad = None
        dist.barrier()
        if measure_memory:
            res[name]["peak"] = peak_allocated_bytes(methods[name])
            return
        t0 = time.perf_counter()
        methods[name]()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        res[name]["times"].append(float(dt))

    for name in methods:
        run(name, True)
    for _ in range(reps):
        for name in methods:
            run(name, False)
    out = {"check": check, "dw_bytes": w.numel() * w.element_size(),
           "logits_bytes": tokens * vp * 2}
    for name, r in res.items():
        out[name] = {"peak": r["peak"], "time": statistics.median(r["times"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-outputs", action="store_true",
                    help="also time ours with entropy and KL to a reference (informational)")
    args = ap.parse_args()
    print(f"V={VOCAB} tokens={args.tokens} H={args.hidden} bf16, CPU, 1 torch thread per rank, "
          f"median of {args.reps}")
    print("memory: torch CPU-allocator peak above pre-step allocations (torch.profiler memory "
          "events), including d W and d hidden")
    ratios = {"peak": [], "peak_excl_dw": [], "time": []}
    t_start = time.perf_counter()
    for tp in (1, 2):
        per_rank = run_distributed(bench_rank, tp, tp=tp,
                                   args=(args.tokens, args.hidden, args.reps, args.seed,
                                         args.all_outputs))
        r0 = per_rank[0]
        dw, lb = r0["dw_bytes"], r0["logits_bytes"]
        names = [k for k in r0 if k not in ("check", "dw_bytes", "logits_bytes")]
        agg = {n: {"peak": max(r[n]["peak"] for r in per_rank), "time": r0[n]["time"]}
               for n in names}
        checks = {k: max(r["check"][k] for r in per_rank) for k in r0["check"]}
        print(f"\nTP={tp}: per rank: bf16 logits would be {lb / 2**20:.0f} MiB "
              f"([{args.tokens}, {VOCAB // tp}]), d W {dw / 2**20:.1f} MiB")
        print("  agreement ours vs megatron: " + " ".join(f"{k}={v:.2e}" for k, v in checks.items()))
        print(f"  {'method':24s} {'peak MiB':>9s} {'excl dW':>8s} {'time s':>7s}")
        for n in names:
            a = agg[n]
            bwd = "fwd+bwd" in n
            excl = a["peak"] - dw if bwd else a["peak"]
            print(f"  {n:24s} {a['peak'] / 2**20:9.1f} {excl / 2**20:8.1f} {a['time']:7.3f}")
        meg, mine = agg["megatron fwd+bwd"], agg["ours fwd+bwd"]
        r = (mine["peak"] / meg["peak"], (mine["peak"] - dw) / (meg["peak"] - dw),
             mine["time"] / meg["time"])
        mf, of = agg["megatron fwd no_grad"], agg["ours fwd no_grad"]
        print(f"  TP={tp}: peak_mem_ratio={r[0]:.4f} (excl dW {r[1]:.4f}) time_ratio={r[2]:.3f}; "
              f"no_grad fwd: mem {of['peak'] / mf['peak']:.4f} time {of['time'] / mf['time']:.3f}")
        for k, v in zip(ratios, r):
            ratios[k].append(v)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; last line: fwd+bwd, max over TP=1, TP=2 "
          f"(peak excl dW: {max(ratios['peak_excl_dw']):.4f})")
    print(f"peak_mem_ratio={max(ratios['peak']):.4f} time_ratio={max(ratios['time']):.3f}")


if __name__ == "__main__":
    main()
