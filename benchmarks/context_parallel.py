"""Context parallelism: per-rank activation memory and step time of one long sequence, CP=2 vs CP=1.

    python benchmarks/context_parallel.py [--seq 4096] [--reps 3]   (~2 min on 2 cores)

What CP is for: a response too long for one rank's activations. One sequence of --seq tokens goes
forward and backward through the trainer's own path (make_micro_batches -> run_micro_batches ->
vocab-parallel log-probs -> sum) on a small Llama-shaped model (GQA 8 query / 2 KV heads) at
CP=1 (one gloo rank) and CP=2 (two ranks, each holding 2 of the 4 load-balanced chunks).

Memory = peak bytes allocated by torch's CPU allocator during the step, above what existed before
(replayed from torch.profiler's allocation events; see vocab_parallel_checks.peak_allocated_bytes),
the larger of the two ranks at CP=2. Time = median over --reps (the slower rank).

Two baselines, both measured in this run at CP=1:
* `sdpa`: the same attention core (models/attention.py, the local spec's default), so the ratio
  isolates what splitting the sequence saves;
* `megatron`: megatron-core's own local DotProductAttention (which refuses CP > 1).
Last line: `cp2_peak_mem_ratio=<CP=2 / sdpa CP=1> vs_megatron=<CP=2 / megatron CP=1>
time_ratio=<CP=2 / sdpa CP=1>`; the memory target is <= 0.6 (ideal 0.5 plus the all-gathered
keys and values).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agro_megatron.testing.distributed import run_distributed  # noqa: E402


def _step(seq_len: int, reps: int, attention: str) -> dict:
    import torch.distributed as dist

    from agro_megatron.models import attention as attention_core
    from agro_megatron.models import llama
    from agro_megatron.ops import vocab_parallel_logprobs
    from agro_megatron.testing.vocab_parallel_checks import peak_allocated_bytes
    from agro_megatron.train.layout import make_micro_batches
    from agro_megatron.train.pipeline import run_micro_batches

    arch = llama.LlamaArch(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                           num_kv_heads=2, head_dim=32, max_position_embeddings=seq_len + 8)
    torch.manual_seed(0)
    model = llama.build_model(arch, dtype="fp32", use_te=False, attention=attention)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, arch.vocab_size, (seq_len,), generator=g).tolist()
    mbs = make_micro_batches([seq], [16], pad_id=0, max_tokens=seq_len + 16, uniform=False)

    def loss_fn(logits, mb):
        st = vocab_parallel_logprobs(logits, mb.labels, compute_entropy=False, vocab_size=arch.vocab_size)
        loss = -(st.logprobs * mb.loss_mask).sum() / seq_len
        return loss, {"loss": loss.detach()}

    def step():
        attention_core._chunk_masks.cache_clear()  # count the CP masks in every step's peak
        model.zero_grad(set_to_none=True)
        run_micro_batches(model, mbs, loss_fn, forward_only=False)

    step()  # warm-up
    peak = peak_allocated_bytes(step)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak": peak, "time": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    res = {}
    for name, world, attention in (("megatron_cp1", 1, "megatron"), ("sdpa_cp1", 1, "sdpa"),
                                   ("sdpa_cp2", 2, "sdpa")):
        out = run_distributed(_step, world, args=(args.seq, args.reps, attention), tp=1, cp=world)
        res[name] = {"peak": max(o["peak"] for o in out), "time": max(o["time"] for o in out)}
        print(f"{name:14s} peak_mb={res[name]['peak'] / 2**20:8.1f} step_s={res[name]['time']:.3f}", flush=True)
    cp2, base, meg = res["sdpa_cp2"], res["sdpa_cp1"], res["megatron_cp1"]
    print(f"cp2_peak_mem_ratio={cp2['peak'] / base['peak']:.3f} vs_megatron={cp2['peak'] / meg['peak']:.3f} "
          f"time_ratio={cp2['time'] / base['time']:.3f}")


if __name__ == "__main__":
    main()
