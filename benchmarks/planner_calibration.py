"""Is `agro-plan`'s time model right? Predicted vs measured RL step times on this machine.

1. Microbenchmarks measure this machine's constants (right before and right after each
   configuration's run, combined by geometric mean), on both ranks at once (as the trainer's two
   processes run): fp32 matmul FLOP/s on a grid of shapes [m, s] x [s, s] (m = 1 .. 4096 rows,
   s = 16 .. 512), copy bandwidth, the fixed host cost of one framework op, and gloo all-reduce
   latency and bandwidth between the two ranks. They become a `cpu` hardware profile
   (`plan/hardware.py`; `--profile-out` writes it as JSON for `agro-plan --gpu PATH.json`).
   Nothing is fitted to the step times being predicted.
2. For every configuration (TP1 x DP2, TP2, PP2; two model sizes ~6x apart; 32 and 128 new
   tokens), between its own microbenchmarks, the real trainer (train/run.py's setup_job and the
   Trainer's loop: native sampler, paired log-prob pass, megatron schedule, Adam) runs a few steps;
   the median of the steps after the warm-up, from the trainer's `time/*_s` phases, is compared with
   `make_plan` on the fresh profile.

Response lengths are fixed: the benchmark process turns the stop tokens off (RunData.stop_ids =
()), so every response runs to rollout.max_new_tokens, which is what the planner assumes; the
script checks it. The reward is a trivial function (the planner does not model rewards; its
measured time is shown). Micro-batches: the default token budget holds each rank's whole batch
(one micro-batch), so PP2's schedule is fully serial (its bubble is p - 1 of p stage slots).

Last line: `max_rel_error=<x> median_rel_error=<y>` (|predicted - measured| / measured of the
step total). Runs on 2 processes (gloo, one thread each).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

from agro_megatron.testing.distributed import run_distributed

MODELS = {  # two sizes, ~6x apart in parameters (vocabulary 512: the tiny tokenizer's)
    "S": "{hidden_size: 64, intermediate_size: 256, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
    "L": "{hidden_size: 128, intermediate_size: 512, num_layers: 4, num_heads: 4, num_kv_heads: 2, head_dim: 32}",
}
LAYOUTS = {"TP1xDP2": (1, 1), "TP2": (2, 1), "PP2": (1, 2)}
RESPONSES = (32, 128)
MATMUL_ROWS = (1, 16, 64, 256, 1024, 4096)
MATMUL_SIZES = (16, 32, 64, 128, 256, 512)
PROMPTS, N = 4, 4


def all_configs() -> list[tuple]:
    return [(f"{size}-{lay}-r{resp}", size, lay, resp)
            for size in MODELS for resp in RESPONSES for lay in LAYOUTS]


# ---------------------------------------------------------------------------------- microbenchmarks
def _timed(fn, loop_s: float = 0.01, loops: int = 3) -> float:
    """Seconds per fn() call: the median over `loops` back-to-back loops of >= `loop_s` each.

    Loops, not single calls: on a shared machine a single short call usually runs unpreempted,
    while the trainer's phases pay the machine's time slicing; a loop of ~10 ms pays it as they do."""
    fn()
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(loop_s / max(time.perf_counter() - t0, 1e-7)))
    per_call = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def measure_matmuls() -> list[tuple]:
    import torch

    rows = []
    for s in MATMUL_SIZES:
        w = torch.randn(s, s)
        for m in MATMUL_ROWS:
            x = torch.randn(m, s)
            t = _timed(lambda: torch.mm(x, w))
            rows.append((m, s, s, 2.0 * m * s * s / t))
    return rows


def measure_copies() -> list[tuple]:
    """(tensor bytes, bytes moved per second) of fp32 copies from 16 KiB to 32 MiB."""
    import torch

    rows = []
    for kib in (16, 128, 1024, 8192, 32768):
        a, b = torch.randn(kib * 256), torch.empty(kib * 256)
        rows.append((kib * 1024, 2 * kib * 1024 / _timed(lambda: b.copy_(a))))
    return rows


def measure_op_overhead() -> float:
    """Seconds per aten op of framework code as the trainer runs it: a forward of megatron-core's
    own GPT model (local spec, TP1, 2 layers) at negligible sizes (width 16, 1 x 4 tokens), timed,
    divided by the aten ops it dispatches (counted with TorchDispatchMode). The shapes make every
    kernel's arithmetic negligible, so what remains is Python, module and dispatch cost per op.
    Re-initialises megatron's parallel state at TP1 (the next run_config sets its own)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from agro_megatron import parallel
    from agro_megatron.models import unwrap_model
    from agro_megatron.models.llama import LlamaArch, build_model

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    parallel.init_model_parallel(tp=1, pp=1)
    model = build_model(LlamaArch(64, 16, 32, 2, 2, 1, 8), dtype="fp32")
    gpt = unwrap_model(model[0] if isinstance(model, list) else model)
    gpt.eval()
    tokens = torch.randint(0, 60, (1, 4))
    positions = torch.arange(4)[None]
    with torch.no_grad():
        with Count():
            gpt(tokens, positions, None)
        t = _timed(lambda: gpt(tokens, positions, None), loop_s=0.02)
    return t / Count.n


def measure_allreduce() -> tuple[float, float]:
    """(latency, tensor bytes per second) of all-reduces over the world, each issued between two
    pieces of local compute as the trainer issues them: a collective waits for the slower rank,
    and on a time-sliced machine that wait is part of its cost. Latency: (loop of compute +
    1-element all-reduce) - (loop of compute alone), per call; bandwidth: 4 MiB / the time of a
    4 MiB all-reduce measured the same way."""
    import torch
    import torch.distributed as dist

    small, big = torch.zeros(1), torch.zeros(2 ** 20)
    x, w = torch.randn(64, 128), torch.randn(128, 128)

    def loop(t, reps, comm=True):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            for _ in range(4):
                torch.mm(x, w)
            if comm:
                dist.all_reduce(t)
        return (time.perf_counter() - t0) / reps

    loop(small, 3)
    lat = statistics.median(max(loop(small, 30) - loop(small, 30, comm=False), 1e-6) for _ in range(3))
    t_big = statistics.median(max(loop(big, 3) - loop(big, 3, comm=False), 1e-6) for _ in range(3))
    return lat, big.numel() * 4 / t_big   # latency included: small differences of noisy times are not


def measure_profile(name: str) -> dict:
    """This machine's `cpu` profile (plan/hardware.py fields), measured now on every rank."""
    import psutil

    t0 = time.perf_counter()
    mm = measure_matmuls()
    copies = measure_copies()
    bw = copies[-1][1]
    op = measure_op_overhead()
    lat, ar_bw = measure_allreduce()
    return dict(name=name, kind="cpu", memory_bytes=int(psutil.virtual_memory().total),
                bf16_flops=max(r[3] for r in mm), hbm_bytes_s=bw, intra_node_bytes_s=ar_bw,
                inter_node_bytes_s=ar_bw, host_bytes_s=bw, gpus_per_node=2, matmul_table=mm, copy_table=copies,
                op_overhead_s=op, allreduce_latency_s=lat, _seconds=time.perf_counter() - t0)


def bracket_profiles(before: dict, after: dict, name: str) -> dict:
    """The constants measured right before and right after a run, combined: geometric means of
    every rate, latency and overhead (table rows matched by shape). The load of a shared machine
    drifts within seconds; bracketing the run follows it better than either side alone."""
    def gm(x, y):
        return (x * y) ** 0.5

    out = dict(before, name=name)
    for key in ("bf16_flops", "hbm_bytes_s", "intra_node_bytes_s", "inter_node_bytes_s", "host_bytes_s",
                "op_overhead_s", "allreduce_latency_s"):
        out[key] = gm(before[key], after[key])
    out["matmul_table"] = [(*a[:3], gm(a[3], b[3])) for a, b in zip(before["matmul_table"], after["matmul_table"])]
    out["copy_table"] = [(a[0], gm(a[1], b[1])) for a, b in zip(before["copy_table"], after["copy_table"])]
    out["_seconds"] = before["_seconds"] + after["_seconds"]
    return out


# ---------------------------------------------------------------------------------- the trainer
def _reward(responses, truths):
    return [float(len(r) % 3 == 0) for r in responses]


def run_config(root: str, size: str, layout: str, resp: int, steps: int) -> dict:
    """setup_job + the Trainer's loop for `steps` steps; per step: phases, prompt/response lengths."""
    import torch.distributed as dist

    from agro_megatron.config import JobConfig
    from agro_megatron.train.loop import Trainer
    from agro_megatron.train.run import setup_job

    tp, pp = LAYOUTS[layout]
    cfg = JobConfig.load(None, [
        f"logging.dir={root}", "logging.progress=false", "logging.plots=false", "logging.tensorboard=false",
        f"model.tiny={MODELS[size]}", "model.dtype=fp32", "data.synthetic_levels=[1]",
        "data.synthetic_train_size=64", "data.heldout=null", "data.system_prompt=null",
        f"rollout.n={N}", f"rollout.max_new_tokens={resp}", f"train.steps={steps}",
        f"train.prompts_per_step={PROMPTS}", "sft.steps=0", "eval.every=0", "checkpoint.save_every=0",
        "checkpoint.resume=never", f"parallel.tp={tp}", f"parallel.pp={pp}"])
    run, parts = setup_job(cfg, reward_fn=_reward)
    shapes = []
    next_batch = parts.source.next_batch

    def recording(step, timings):
        batch = next_batch(step, timings)
        shapes.append({"prompt_lens": [len(p) for p in batch.prompts],
                       "response_lens": [len(s.token_ids) for row in batch.samples for s in row]})
        return batch

    parts.source.next_batch = recording
    trainer = Trainer(run, bundle=parts.bundle, engine=parts.engine, objective=parts.objective,
                      source=parts.source, evaluator=parts.evaluator)
    trainer.metrics.restore([])
    trainer.run()
    trainer.metrics.close()
    parts.engine.close()
    hist = [{k: v for k, v in r.items() if k.startswith("time/")} for r in trainer.metrics.history
            if "time/train_s" in r]
    out = {"history": hist, "shapes": shapes, "dp": run.layout.dp, "arch": run.arch, "logging": run.layout.is_logging_rank,
           "paired_train": bool(parts.objective.needs_reference_logits)}
    del trainer, parts, run
    gc.collect()
    dist.barrier()
    return out


def worker(root: str, configs: list, steps: int) -> list[dict]:
    """On every rank: for each configuration, its microbenchmarks, then its training run."""
    import torch.distributed as dist

    from agro_megatron.train import context

    context.RunData.stop_ids = property(lambda self: ())  # fixed response lengths (see the docstring)
    results = []
    for name, size, layout, resp in configs:
        dist.barrier()
        profile = measure_profile(f"cpu-before-{name}")
        t0 = time.perf_counter()
        res = run_config(os.path.join(root, name), size, layout, resp, steps)
        wall = time.perf_counter() - t0
        after = measure_profile(f"cpu-after-{name}")
        res.update(name=name, size=size, layout=layout, resp=resp, wall_s=wall,
                   profile=bracket_profiles(profile, after, f"cpu-{name}"))
        results.append(res)
    return results


# ---------------------------------------------------------------------------------- prediction
def predict(res: dict, warmup: int):
    import dataclasses

    from agro_megatron.plan import Layout, PlanInput, RolloutOptions, TrainOptions, Workload, make_plan
    from agro_megatron.plan.hardware import GPU

    prof = {k: v for k, v in res["profile"].items() if not k.startswith("_")}
    gpu = GPU(**prof)
    arch = res["arch"]
    shapes = res["shapes"][warmup:]
    longest = statistics.median(max(s["prompt_lens"]) for s in shapes)
    resp = res["resp"]
    seq = -(-int(longest + resp) // 8) * 8            # the layout pads rows to a multiple of 8
    tp, pp = LAYOUTS[res["layout"]]
    dp = res["dp"]
    per_rank = PROMPTS * N // dp
    inp = PlanInput(arch, gpu, Layout(nodes=1, gpus_per_node=2, tp=tp, pp=pp),
                    Workload(prompts_per_step=PROMPTS, n=N, prompt_len=seq - resp, response_len=resp,
                             micro_batch=per_rank),
                    TrainOptions(dtype_bytes=4, spec="local", full_vocab_kl=res["paired_train"],
                                 distributed_optimizer=dp > 1),
                    RolloutOptions(engine="native"), model_name=res["size"])
    plan = make_plan(dataclasses.replace(inp), with_mbs=False)
    return plan


def phase_medians(hist: list[dict], warmup: int) -> dict:
    h = hist[warmup:]
    med = {k: statistics.median(r[f"time/{k}_s"] for r in h) for k in ("rollout", "reward", "logprob", "train", "sync")}
    med["total"] = statistics.median(sum(r[f"time/{k}_s"] for k in ("rollout", "reward", "logprob", "train", "sync"))
                                     for r in h)
    return med


def predicted_phases(t) -> dict:
    d = t.detail
    return {"rollout": t.rollout_prefill + t.rollout_decode,
            "logprob": t.reference_forward + t.policy_forward + d["logprob_bubble"],
            "train": t.train + d["train_bubble"] + t.grad_sync, "sync": t.weight_sync, "total": t.total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="trainer steps per configuration (the first is warm-up)")
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all 12)")
    ap.add_argument("--profile-out", help="write the last configuration's measured profile here (JSON)")
    ap.add_argument("--json", help="write every measurement and prediction here")
    args = ap.parse_args()
    configs = [c for c in all_configs() if not args.only or c[0] in args.only]
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (one warm-up step, then the measured ones)")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        ranks = run_distributed(worker, 2, args=(d, configs, args.steps), timeout_s=3600)
    # the trainer's logging rank holds the phase history
    logging = [next(r for r in per_cfg if r["history"]) for per_cfg in zip(*ranks)]

    rows, errors, dump = [], [], []
    for res, first in zip(logging, ranks[0]):
        res["profile"] = first["profile"]    # rank 0's microbenchmarks (both ranks ran them at once)
        shapes = res["shapes"][1:]
        lens = {n for s in shapes for n in s["response_lens"]}
        if lens != {res["resp"]}:
            raise SystemExit(f"{res['name']}: response lengths {sorted(lens)} are not fixed at {res['resp']}")
        plan = predict(res, 1)
        pred, meas = predicted_phases(plan.time), phase_medians(res["history"], 1)
        err = abs(pred["total"] - meas["total"]) / meas["total"]
        errors.append(err)
        p = res["profile"]
        rows.append([res["name"], f"{pred['total']:.3f}", f"{meas['total']:.3f}", f"{100 * err:.0f}%"]
                    + [f"{pred[k]:.3f}/{meas[k]:.3f}" for k in ("rollout", "logprob", "train")]
                    + [f"{meas['reward']:.3f}", f"{p['bf16_flops'] / 1e9:.1f}", f"{p['hbm_bytes_s'] / 1e9:.1f}",
                       f"{p['op_overhead_s'] * 1e6:.1f}", f"{p['allreduce_latency_s'] * 1e6:.0f}",
                       f"{p['intra_node_bytes_s'] / 1e9:.2f}"])
        dump.append({"name": res["name"], "predicted": pred, "measured": meas, "profile": p,
                     "history": res["history"], "plan_detail": plan.time.detail})
    from agro_megatron.plan.report import render

    head = ["config", "pred s", "meas s", "err", "rollout p/m", "logprob p/m", "train p/m", "reward m",
            "peak GF/s", "copy GB/s", "op us", "ar lat us", "ar GB/s"]
    print(f"{PROMPTS} prompts x n={N} per step, fp32, 2 gloo processes x 1 thread; median of "
          f"{args.steps - 1} steps after 1 warm-up; responses fixed at max_new_tokens")
    print(render(head, rows, plain=True))
    if args.profile_out:
        from agro_megatron.plan.hardware import GPU, save_profile

        prof = {k: v for k, v in logging[-1]["profile"].items() if not k.startswith("_")}
        save_profile(GPU(**prof), args.profile_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    print(f"benchmark wall time {time.time() - t0:.0f} s")
    print(f"max_rel_error={max(errors):.3f} median_rel_error={statistics.median(errors):.3f}")


if __name__ == "__main__":
    main()
