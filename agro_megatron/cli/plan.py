"""agro-plan: will this AGRO run fit, and how fast will it go? (memory per GPU, step time, search)

    agro-plan --model llama3-8b --gpu H100 --nodes 1 --tp 2
    agro-plan --model llama3-70b --nodes 2 --search
    agro-plan --model path/to/config.json --nodes 4 --tp 8 --pp 4 --json plan.json
    agro-plan --png memory.png          # memory per GPU vs model size, default layouts

Without --tp/--pp the best fitting layout is searched for and shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from agro_megatron.models.llama import LLAMA3_PRESETS, LlamaArch
from agro_megatron.plan.hardware import GB, GPU_PRESETS, GiB, get_gpu
from agro_megatron.plan.spec import Efficiency, Layout, PlanInput, RolloutOptions, TrainOptions, Workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agro-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="llama3-8b",
                   help=f"{' | '.join(LLAMA3_PRESETS)} or an HF config.json / checkpoint directory")
    g.add_argument("--gpu", default="H100", help=f"preset: {', '.join(GPU_PRESETS)}; or a measured profile "
                   "(*.json, benchmarks/planner_calibration.py --profile-out; needs --rollout-engine native)")
    g.add_argument("--gpu-memory-gib", type=float, help="override the preset's device memory")
    g.add_argument("--gpu-tflops", type=float, help="override dense bf16 TFLOP/s")
    g.add_argument("--hbm-tbs", type=float, help="override HBM bandwidth, TB/s")
    g.add_argument("--nvlink-gbs", type=float, help="override NVLink GB/s per GPU per direction")
    g.add_argument("--network-gbs", type=float, help="override inter-node GB/s per GPU")
    g.add_argument("--pcie-gbs", type=float, help="override host<->device GB/s per GPU")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g = p.add_argument_group("training layout")
    g.add_argument("--tp", type=int, help="tensor parallel (default: searched)")
    g.add_argument("--pp", type=int, help="pipeline parallel (default: searched)")
    g.add_argument("--cp", type=int, default=1, help="context parallel")
    g.add_argument("--dp", type=int, help="data parallel (default: the rest)")
    g.add_argument("--recompute", action="store_true", help="full activation recompute")
    g.add_argument("--no-sequence-parallel", action="store_true")
    g.add_argument("--no-distributed-optimizer", action="store_true")
    g.add_argument("--bf16-grads", action="store_true", help="reduce grads in bf16 (default fp32 main grads)")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="DDP buckets of max(40M, 1M*DP)")
    g.add_argument("--full-vocab-kl", action="store_true", help="kl_pg / local_kl: reference logits in the loss")
    g.add_argument("--loss-chunk-tokens", type=int, default=1024)
    g.add_argument("--offload-train-state", action="store_true",
                   help="free the grads and park the optimizer state on the host during rollout and "
                   "weight sync (trainer: optim.offload_train_state=true)")
    g.add_argument("--optimizer-offload-fraction", type=float, default=0.0,
                   help="megatron optimizer_cpu_offload: share of the optimizer (fp32 master + Adam "
                   "moments) kept and updated on the host (trainer: optim.offload_fraction; bf16)")
    g.add_argument("--no-reference", action="store_true", help="no resident reference model")
    g.add_argument("--spec", choices=("te", "local"), default="te", help="layer spec: te (GPU) or local")
    g = p.add_argument_group("the RL step")
    g.add_argument("--prompts-per-step", type=int, default=64)
    g.add_argument("--n", type=int, default=8, help="responses per prompt")
    g.add_argument("--prompt-len", type=int, default=512)
    g.add_argument("--response-len", type=int, default=1024)
    g.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    g.add_argument("--epochs-per-batch", type=int, default=1)
    g = p.add_argument_group("rollout engine")
    g.add_argument("--rollout-engine", choices=("vllm", "native"), default="vllm")
    g.add_argument("--rollout-tp", type=int, help="vLLM TP (default: the fastest that fits)")
    g.add_argument("--rollout-pp", type=int, help="vLLM PP (default: chosen with the TP)")
    g.add_argument("--vllm-gpu-util", type=float, default=0.4, help="vLLM gpu_memory_utilization")
    g.add_argument("--kv-cache-gib", type=float, help="KV cache per GPU (overrides --vllm-gpu-util)")
    g.add_argument("--sleep-level", type=int, default=2, choices=(0, 1, 2))
    g.add_argument("--vllm-overhead-gib", type=float, default=2.0)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--sync-bucket-gib", type=float)
    g = p.add_argument_group("efficiency assumptions")
    d = Efficiency()
    g.add_argument("--mfu", type=float, default=d.mfu)
    g.add_argument("--prefill-mfu", type=float, default=d.prefill_mfu)
    g.add_argument("--decode-mfu", type=float, default=d.decode_mfu)
    g.add_argument("--hbm-efficiency", type=float, default=d.hbm_efficiency)
    g.add_argument("--comm-efficiency", type=float, default=d.comm_efficiency)
    g.add_argument("--allreduce-latency-us", type=float, default=d.allreduce_latency_s * 1e6)
    g.add_argument("--cpu-adam-rate", type=float, default=d.cpu_adam_elems_s, help="elements/s per GPU")
    g.add_argument("--reserve-gib", type=float, default=d.reserve_gib)
    g.add_argument("--fragmentation", type=float, default=d.fragmentation)
    g = p.add_argument_group("output")
    g.add_argument("--search", action="store_true", help="rank the layouts that fit on these GPUs")
    g.add_argument("--search-cp", action="store_true", help="also try CP = 2, 4")
    g.add_argument("--top", type=int, default=10)
    g.add_argument("--json", metavar="PATH", help="write JSON ('-' for stdout instead of the table)")
    g.add_argument("--png", metavar="PATH", help="plot memory per GPU vs model size (default layouts)")
    g.add_argument("--plain", action="store_true", help="plain-text tables (no rich)")
    return p


def load_arch(model: str) -> tuple[LlamaArch, str]:
    if model.lower() in LLAMA3_PRESETS:
        return LLAMA3_PRESETS[model.lower()], model.lower()
    if os.path.exists(model):
        return LlamaArch.from_hf_config(model), os.path.basename(os.path.normpath(model))
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(LLAMA3_PRESETS)}) nor an existing "
                     "config.json / checkpoint directory")


def input_from_args(a: argparse.Namespace) -> PlanInput:
    arch, name = load_arch(a.model)
    gpu = get_gpu(a.gpu).with_overrides(
        memory_bytes=int(a.gpu_memory_gib * GiB) if a.gpu_memory_gib else None,
        bf16_flops=a.gpu_tflops * 1e12 if a.gpu_tflops else None,
        hbm_bytes_s=a.hbm_tbs * 1e12 if a.hbm_tbs else None,
        intra_node_bytes_s=a.nvlink_gbs * GB if a.nvlink_gbs else None,
        inter_node_bytes_s=a.network_gbs * GB if a.network_gbs else None,
        host_bytes_s=a.pcie_gbs * GB if a.pcie_gbs else None,
        gpus_per_node=a.gpus_per_node)
    layout = Layout(a.nodes, a.gpus_per_node, a.tp or 1, a.pp or 1, a.cp, a.dp)
    work = Workload(a.prompts_per_step, a.n, a.prompt_len, a.response_len, a.micro_batch, a.epochs_per_batch)
    train = TrainOptions(
        distributed_optimizer=not a.no_distributed_optimizer, grad_reduce_in_fp32=not a.bf16_grads,
        overlap_grad_reduce=a.overlap_grad_reduce, recompute=a.recompute,
        sequence_parallel=False if a.no_sequence_parallel else None, spec=a.spec,
        full_vocab_kl=a.full_vocab_kl, loss_chunk_tokens=a.loss_chunk_tokens,
        offload_train_state=a.offload_train_state, optimizer_offload_fraction=a.optimizer_offload_fraction,
        reference_resident=not a.no_reference)
    rollout = RolloutOptions(
        engine=a.rollout_engine, tp=a.rollout_tp, pp=a.rollout_pp, gpu_memory_utilization=a.vllm_gpu_util,
        kv_cache_gib=a.kv_cache_gib, sleep_level=a.sleep_level, overhead_gib=a.vllm_overhead_gib,
        prefix_caching=not a.no_prefix_caching, sync_bucket_gib=a.sync_bucket_gib)
    eff = Efficiency(mfu=a.mfu, prefill_mfu=a.prefill_mfu, decode_mfu=a.decode_mfu,
                     hbm_efficiency=a.hbm_efficiency, comm_efficiency=a.comm_efficiency,
                     allreduce_latency_s=a.allreduce_latency_us * 1e-6, cpu_adam_elems_s=a.cpu_adam_rate,
                     reserve_gib=a.reserve_gib, fragmentation=a.fragmentation)
    return PlanInput(arch, gpu, layout, work, train, rollout, eff, model_name=name)


def default_layout_plans(inp: PlanInput):
    """The built-in models at their default layouts (search.DEFAULT_LAYOUTS) on this GPU type."""
    from agro_megatron.plan.planner import make_plan
    from agro_megatron.plan.search import DEFAULT_LAYOUTS

    plans = []
    for name, d in DEFAULT_LAYOUTS.items():
        lay = dataclasses.replace(d["layout"], gpus_per_node=inp.layout.gpus_per_node)
        train = dataclasses.replace(inp.train, **d.get("train", {}))
        plans.append(make_plan(inp.replace(arch=LLAMA3_PRESETS[name], model_name=name, layout=lay, train=train)))
    return plans


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agro_megatron.plan import report
    from agro_megatron.plan.planner import make_plan
    from agro_megatron.plan.search import search

    try:
        inp = input_from_args(args)
        out_json = None
        text = []
        if args.search or (args.tp is None and args.pp is None):
            fits, misses = search(inp, top=args.top if args.search else 1, cps=(1, 2, 4) if args.search_cp else None)
            if args.search:
                text.append(f"{inp.model_name} on {inp.layout.nodes}x{inp.layout.gpus_per_node} {inp.gpu.name}: "
                            f"{len(fits)} layout(s) fit")
                text.append(report.render(*report.search_rows(fits, misses), plain=args.plain))
                if not fits:
                    text.append("nothing fits: try more nodes, --offload-train-state, --optimizer-offload-fraction, "
                                "--recompute, a smaller --vllm-gpu-util, or a larger GPU (--gpu H200 / B200)")
                out_json = {"fits": [p.to_dict() for p in fits], "closest_misses": [p.to_dict() for p in misses]}
            else:
                best = (fits or misses or [None])[0]
                if best is None:
                    raise ValueError("no TP x PP layout divides this job; check --nodes / --micro-batch")
                text.append("(layout chosen by search: pass --tp/--pp to fix it)" if fits else
                            "(NO layout fits: showing the one with the smallest peak; try more GPUs, "
                            "--offload-train-state, --optimizer-offload-fraction or --recompute)")
                text.append(report.plan_text(best, plain=args.plain))
                out_json = best.to_dict()
        else:
            plan = make_plan(inp)
            text.append(report.plan_text(plan, plain=args.plain))
            out_json = plan.to_dict()
        if args.png:
            report.plot_memory_vs_size(default_layout_plans(inp), args.png)
            text.append(f"wrote {args.png}")
        if args.json == "-":
            print(report.to_json(out_json))
        else:
            print("\n\n".join(text))
            if args.json:
                with open(args.json, "w") as f:
                    f.write(report.to_json(out_json))
                print(f"wrote {args.json}")
    except (ValueError, FileNotFoundError) as e:
        print(f"agro-plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
