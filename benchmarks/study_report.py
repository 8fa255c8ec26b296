"""`agro-study report` over a large study: 1,000 synthetic cells, the whole report (read, statistics,
compute fits with bootstrap, size fits, CSV/JSON/Markdown, PNGs).

    python benchmarks/study_report.py [--cells 1000] [--seeds 5] [--steps 60] [--keep DIR]

The cells are synthetic run directories shaped like real ones (cells/<id>/cell.json, status.json,
run/metrics.jsonl with every per-step key the trainer logs, an evaluation every 10 steps,
eval_problems/ with 64 problems x 16 samples, final_model/agro_checkpoint.json), grouped as
arms x model sizes x 3 seeds (--seeds), with accuracy following a sigmoid in compute plus noise. Timed: from
importing the report module to the last file written (wall), and the CPU seconds of this process
and its fit workers. Goal: under 10 s. Last line: `cells=<n> report_s=<wall seconds>`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time

STEP_KEYS = ["train/reward_mean", "train/accuracy", "train/reward_std", "train/entropy", "train/advantage_mean",
             "train/advantage_rms", "train/pg_term_norm", "train/ratio_term_norm", "time/rollout_s", "time/reward_s",
             "time/logprob_s", "time/train_s", "time/sync_s", "perf/tokens_per_s", "data/replay_fraction",
             "train/loss", "train/grad_norm", "train/skipped", "train/lr", "train/kl"]
SIZES = [dict(vocab_size=497, hidden_size=32 * 2 ** i, intermediate_size=96 * 2 ** i, num_layers=1 + i, num_heads=2,
              num_kv_heads=1, head_dim=16 * 2 ** i) for i in range(4)]


# what the trainer records with each evaluation (the planner's count of these shapes)
PARAMS = [45152, 164160, 721792, 3410176]


def write_cell(root: str, cid: str, arm: str, size: int, seed: int, steps: int, rng: random.Random) -> None:
    d = os.path.join(root, "cells", cid)
    run = os.path.join(d, "run")
    os.makedirs(os.path.join(run, "eval_problems"))
    os.makedirs(os.path.join(run, "final_model"))
    point = f"size={size}"
    with open(os.path.join(d, "cell.json"), "w") as f:
        json.dump({"id": cid, "arm": arm, "point": point, "group": f"{arm}[{point}]", "seed": seed,
                   "overrides": [], "resources": {}}, f)
    with open(os.path.join(d, "status.json"), "w") as f:
        json.dump({"state": "DONE", "attempts": 1, "exit_code": 0}, f)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"train": {"prompts_per_step": 8, "steps": steps}, "rollout": {"n": 8},
                   "algorithm": {"epochs_per_batch": 1}, "model": {}}, f)
    with open(os.path.join(run, "final_model", "agro_checkpoint.json"), "w") as f:
        json.dump({"arch": SIZES[size]}, f)
    a, mid = 0.3 + 0.1 * size + 0.02 * (hash(arm) % 5), steps / 3
    acc = lambda s: 0.1 + (a - 0.1) / (1 + (mid / max(s, 1e-9)) ** 1.5) + rng.gauss(0, 0.01)  # noqa: E731
    lines = [json.dumps({"step": 0, "eval/accuracy": 0.1})]
    for s in range(1, steps + 1):
        rec = {"step": s, **{k: rng.random() for k in STEP_KEYS}, "train/response_length": 12 + rng.random(),
               "train/kl_full_vocab": 0.01 * s}
        lines.append(json.dumps(rec))
        if s % 10 == 0:
            lines.append(json.dumps({"step": s, "eval/accuracy": acc(s)}))
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    final = acc(steps)
    with open(os.path.join(run, "eval_problems", f"step_{steps:06d}.json"), "w") as f:
        json.dump({"step": steps, "n": 16, "prompt_tokens_mean": 18.0, "params": PARAMS[size],
                   "problems": [{"id": f"p{i}", "n": 16, "correct": sum(rng.random() < final for _ in range(16))}
                                for i in range(64)]}, f)
    with open(os.path.join(run, "result.json"), "w") as f:
        json.dump({"steps": steps}, f)


def _cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--keep", help="write the study here and keep it (default: a temp dir, removed)")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="study-bench-")
    rng = random.Random(0)
    groups = math.ceil(args.cells / args.seeds)
    n = 0
    for g in range(groups):
        arm, size = f"arm{g // len(SIZES)}", g % len(SIZES)
        for seed in range(args.seeds):
            if n == args.cells:
                break
            write_cell(root, f"{n:016x}", arm, size, seed, args.steps, rng)
            n += 1
    try:
        t0, c0 = time.perf_counter(), _cpu()
        from agro_megatron.study.report import ReportInputs, write_report

        rep = write_report(ReportInputs(root, baseline="arm0"))
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        assert rep["cells_done"] == n, rep["cells_done"]
        fits = sum("A" in (r.get("compute_fit") or {}) for r in rep["groups"])
        print(f"groups={len(rep['groups'])} compute_fits={fits} size_fits={len(rep['size_fits'])} "
              f"pngs={len(rep['plots'])} build_s={rep['report_s']:.2f}")
        # CPU seconds (this process + the fit workers): what the wall time is on an idle machine, at
        # most, with one core; on a loaded machine the wall time says more about the load
        print(f"cpu_s={cpu:.2f} cpus={os.cpu_count()} load_avg_1min={os.getloadavg()[0]:.1f}")
        print(f"cells={n} report_s={dt:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
