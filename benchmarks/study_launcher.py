"""What `agro-study run --local` adds to a cell: the same trainer runs, launched directly and by the study.

    python benchmarks/study_launcher.py [--reps 3] [--cells 3]

A study of --cells short cells (the README's tiny job cut to a few steps: the trainer's own work
is then small, so the launcher's share is visible) runs two ways, interleaved, --reps times:

* direct: `python -m agro_megatron.train <cell>/config.yaml logging.dir=<tmp>` for each cell, one
  after another, exactly the command the launcher runs;
* study: `agro-study run <spec> --local --parallel 1` on a fresh study directory, which prepares
  each cell's directory, validates every config with the trainer's checks, starts each trainer,
  keeps its heartbeat and status file, and records its exit.

The launcher's overhead per cell is (study wall - sum of direct walls) / cells: it includes the
`agro-study` process's own start (imports, spec, validation) spread over the cells. Also printed:
the wall of a second `run` that finds every cell DONE (what a resumed study pays before it gets to
work). Goal: under 5 s per cell. Last line: `cells=<n> launcher_overhead_s=<median per cell>`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.steps=2", "train.prompts_per_step=2", "rollout.n=4", "sft.steps=5", "eval.every=0",
         "eval.max_problems=4", "eval.n=2", "checkpoint.save_every=0", "logging.progress=false"]


def write_spec(root: Path, cells: int) -> Path:
    spec = root / "study.yaml"
    overrides = ", ".join(SHORT)
    spec.write_text(f"name: launcher_bench\nbase: {REPO / 'examples' / 'tiny_cpu.yaml'}\n"
                    f"overrides: [{overrides}]\nseeds: {list(range(1, cells + 1))}\n"
                    f"arms:\n  a: {{overrides: [algorithm.estimator=agro_off]}}\n")
    return spec


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cells", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    study = [sys.executable, "-m", "agro_megatron.cli.study"]
    per_cell, rerun = [], []
    root = Path(tempfile.mkdtemp(prefix="launcher-bench-"))
    try:
        spec = write_spec(root, args.cells)
        # a first study run (untimed: it warms the file cache) prepares the cells' resolved configs;
        # the direct runs use those very files, the command the launcher hands each trainer
        timed(study + ["run", str(spec), "--study-dir", str(root / "warmup"), "--local"], env)
        configs = sorted((root / "warmup" / "cells").glob("*/config.yaml"))
        if len(configs) != args.cells:
            sys.exit(f"benchmark: the warm-up study prepared {len(configs)} cells, expected {args.cells}")

        def direct(rep: int) -> float:
            return sum(timed([sys.executable, "-m", "agro_megatron.train", str(cfg),
                              f"logging.dir={root / f'direct{rep}_{i}'}"], env) for i, cfg in enumerate(configs))

        def via_study(rep: int) -> float:
            return timed(study + ["run", str(spec), "--study-dir", str(root / f"study{rep}"), "--local",
                                  "--parallel", "1"], env)

        for rep in range(args.reps):
            if rep % 2 == 0:  # alternate the order, so neither side always runs on a warmer machine
                d, w = direct(rep), via_study(rep)
            else:
                w, d = via_study(rep), direct(rep)
            per_cell.append((w - d) / len(configs))
            rerun.append(timed(study + ["run", str(spec), "--study-dir", str(root / f"study{rep}"), "--local"], env))
            print(f"rep {rep}: direct {d:.2f} s for {len(configs)} cells, study {w:.2f} s -> "
                  f"{per_cell[-1]:+.2f} s per cell; a second run (all DONE) {rerun[-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load_avg_1min={os.getloadavg()[0]:.1f} cpus={os.cpu_count()} all_done_rerun_s={statistics.median(rerun):.2f}")
    print(f"cells={args.cells} launcher_overhead_s={statistics.median(per_cell):.2f}")


if __name__ == "__main__":
    main()
