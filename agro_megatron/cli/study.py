"""agro-study: run a scaling study of AGRO (a grid of agro-train runs) locally or on Slurm, resume
it, and report it with intervals over seeds and fitted scaling curves.

    agro-study plan   STUDY.yaml                       list the cells and resources; validate every config
    agro-study run    STUDY.yaml --local [--parallel K]
    agro-study run    STUDY.yaml --slurm [--dry-run]   one job array per resource group + a report job
    agro-study status STUDY.yaml                       state, attempts, heartbeat, errors per cell
    agro-study report STUDY.yaml                       results.csv/json, report.md, PNGs in <study-dir>/report

The study directory defaults to runs/studies/<name> (--study-dir to change it). Running `run`
again resumes: DONE cells are skipped, stale RUNNING cells requeued, FAILED cells retried up to
max_attempts; each cell resumes from its own checkpoint. Exit status: 0 ok, 1 cells failed,
2 bad spec or config (nothing was started).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agro-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def spec_cmd(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("spec", help="the study spec YAML")
        s.add_argument("--study-dir", help="where cells live (default: runs/studies/<name>)")
        return s

    spec_cmd("plan", "list the cells and their resources; check every config with the trainer's validation")
    r = spec_cmd("run", "run the cells that are not done")
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="on this machine")
    mode.add_argument("--slurm", action="store_true", help="as Slurm job arrays, then a report job")
    r.add_argument("--parallel", type=int, default=1, help="--local: cells running at once")
    r.add_argument("--dry-run", action="store_true", help="--slurm: write and print the scripts, submit nothing")
    r.add_argument("--max-array-size", type=int, help="--slurm: split arrays above this (default: MaxArraySize)")
    r.add_argument("--sbatch-arg", action="append", default=[], help="--slurm: extra sbatch option (repeatable)")
    r.add_argument("--heartbeat-s", type=float, default=10.0, help="status heartbeat interval")
    r.add_argument("--trainer", help="replace `python -m agro_megatron.train` (a wrapper; the config path is "
                                      "appended)")
    spec_cmd("status", "per-cell state, attempts, last heartbeat and the error of failed cells")
    rep = spec_cmd("report", "aggregate what finished; list what is missing")
    rep.add_argument("--out", help="output directory (default: <study-dir>/report)")
    rep.add_argument("--no-plots", action="store_true")
    c = sub.add_parser("run-cell", help="(used by the Slurm tasks) run one prepared cell")
    c.add_argument("study_dir")
    c.add_argument("cell_id")
    c.add_argument("--launcher", choices=("local", "srun"), default="local")
    c.add_argument("--max-attempts", type=int, default=3)
    c.add_argument("--heartbeat-s", type=float, default=10.0)
    return p


def _study_dir(spec, given: str | None) -> str:
    return os.path.abspath(given or os.path.join("runs", "studies", spec.name))


def _load(args, *, require_paths: bool):
    from agro_megatron.study.cells import resolve_cells
    from agro_megatron.study.spec import load_spec

    spec = load_spec(args.spec)
    study_dir = _study_dir(spec, args.study_dir)
    cells = resolve_cells(spec, study_dir, require_paths=require_paths)
    return spec, study_dir, cells


def _write_study_json(spec, study_dir: str, cells) -> None:
    from agro_megatron.study.cells import atomic_write

    os.makedirs(study_dir, exist_ok=True)
    atomic_write(os.path.join(study_dir, "study.json"), json.dumps(
        {"spec": spec.path, "name": spec.name, "baseline": spec.baseline,
         "cells": [{"id": c.id, "group": c.request.group, "seed": c.request.seed} for c in cells]}, indent=1))


def cmd_plan(args) -> int:
    spec, study_dir, cells = _load(args, require_paths=False)
    from agro_megatron.study.cells import read_status

    print(f"study {spec.name}: {len(cells)} cells in {study_dir}")
    print(f"{'cell':16}  {'group':40}  {'seed':>5}  {'nodes x ranks':>13}  {'GPUs/node':>9}  {'time':>10}  "
          f"{'layout':>12}  state")
    groups = {}
    for c in cells:
        r, p = c.resources, c.config["parallel"]
        state = read_status(c.dir).state if os.path.exists(c.status_path) else "-"
        print(f"{c.id:16}  {c.request.group[:40]:40}  {str(c.request.seed):>5}  {r.nodes:>6} x {r.ranks_per_node:<4}  "
              f"{r.gpus_per_node:>9}  {r.time_limit:>10}  {'TP%d PP%d CP%d' % (p['tp'], p['pp'], p['cp']):>12}  {state}")
        for note in c.notes:
            print(f"{'':18}note: {note}")
        groups.setdefault(r.group_key(), 0)
        groups[r.group_key()] += 1
    gpu_hours = 0.0
    from agro_megatron.study.slurm import time_seconds

    for c in cells:
        gpu_hours += c.resources.nodes * c.resources.gpus_per_node * time_seconds(c.resources.time_limit) / 3600
    print(f"every cell's config passed the trainer's validation; {len(groups)} resource group(s) "
          f"(= Slurm job arrays); at most {gpu_hours:.0f} GPU-hours per attempt of every cell")
    return 0


def cmd_run(args) -> int:
    spec, study_dir, cells = _load(args, require_paths=True)
    _write_study_json(spec, study_dir, cells)
    if args.slurm:
        from agro_megatron.study.slurm import submit_study

        submit_study(spec, cells, study_dir, dry_run=args.dry_run, max_size=args.max_array_size,
                     sbatch_args=tuple(args.sbatch_arg))
        return 0
    from agro_megatron.study.launch import LaunchOptions
    from agro_megatron.study.local import run_local

    if args.parallel < 1:
        print("agro-study: error: --parallel must be >= 1", file=sys.stderr)
        return 2
    opts = LaunchOptions(launcher="local", heartbeat_s=args.heartbeat_s,
                         trainer=tuple(shlex.split(args.trainer)) if args.trainer else ())
    try:
        summary = run_local(spec, cells, parallel=args.parallel, opts=opts)
    except KeyboardInterrupt:
        return 130
    failed = [cid for cid, s in summary.ran.items() if s.state != "DONE"]
    print(f"agro-study: ran {len(summary.ran)} cell(s) in {summary.wall_s:.1f} s; "
          f"{len(summary.ran) - len(failed)} done, {len(failed)} not done"
          + (f" (see `agro-study status {args.spec}`)" if failed else ""))
    return 1 if failed else 0


def cmd_run_cell(args) -> int:
    from agro_megatron.study.cells import DONE, SKIP_EXHAUSTED, load_cell, next_action, read_status, write_status
    from agro_megatron.study.launch import CellLauncher, LaunchOptions, forward_signals

    cell = load_cell(os.path.join(args.study_dir, "cells", args.cell_id))
    status = read_status(cell.dir)
    # the array task owns its cell: a RUNNING status here is a previous attempt of this very task
    action = next_action(status, max_attempts=args.max_attempts, heartbeat_timeout_s=0.0)
    if status.state == DONE:
        print(f"agro-study: cell {cell.id} is already DONE")
        return 0
    if action == SKIP_EXHAUSTED:
        print(f"agro-study: cell {cell.id} failed {status.failures} times (max_attempts); not retried")
        return 1
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        status.slurm_job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
        write_status(cell.dir, status)
    launcher = CellLauncher(cell, LaunchOptions(launcher=args.launcher, heartbeat_s=args.heartbeat_s))
    forward_signals(launcher)
    result = launcher.run()
    print(f"agro-study: cell {cell.id}: {result.state} (exit {result.exit_code})")
    if result.state == DONE:
        return 0
    from agro_megatron.study.launch import STOPPED_EXIT_CODE

    return STOPPED_EXIT_CODE if result.state == "PENDING" else (result.exit_code or 1)


def _when(ts) -> str:
    if ts is None:
        return "-"
    age = time.time() - ts
    return f"{datetime.datetime.fromtimestamp(ts).strftime('%H:%M:%S')} ({age:.0f} s ago)"


def cmd_status(args) -> int:
    spec, study_dir, cells = _load(args, require_paths=False)
    from agro_megatron.study.cells import next_action, read_status

    counts = {}
    print(f"{'cell':16}  {'group':36}  {'seed':>5}  {'state':8}  {'tries':>5}  {'exit':>4}  {'host':12}  last heartbeat")
    failed = []
    for c in cells:
        st = read_status(c.dir)
        state = st.state if os.path.exists(c.status_path) else "NOT STARTED"
        if st.state == "RUNNING" and next_action(st, max_attempts=spec.max_attempts,
                                                 heartbeat_timeout_s=spec.heartbeat_timeout_s) == "run":
            state = "STALE"
        counts[state] = counts.get(state, 0) + 1
        print(f"{c.id:16}  {c.request.group[:36]:36}  {str(c.request.seed):>5}  {state:8}  {st.attempts:>5}  "
              f"{'-' if st.exit_code is None else st.exit_code:>4}  {(st.host or '-')[:12]:12}  {_when(st.heartbeat)}")
        if st.state == "FAILED" or (st.error and st.state != "DONE"):
            failed.append((c, st))
    for c, st in failed:
        print(f"\n--- {c.id} ({c.request.group} seed={c.request.seed}) {st.state}, "
              f"failures {st.failures}/{spec.max_attempts}:\n{st.error}")
    print("\n" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


def cmd_report(args) -> int:
    from agro_megatron.study.report import ReportInputs, write_report

    spec, study_dir, cells = _load(args, require_paths=False)
    expected = [{"id": c.id, "group": c.request.group, "seed": c.request.seed} for c in cells]
    report = write_report(ReportInputs(study_dir, spec.baseline, expected, args.out, plots=not args.no_plots))
    print(f"agro-study: {report['cells_done']}/{report['cells_total']} cells finished; "
          f"{len(report['missing'])} missing; wrote {report['out_dir']}/report.md, results.csv, results.json"
          f"{', ' + str(len(report['plots'])) + ' PNGs' if report['plots'] else ''} in {report['report_s']:.2f} s")
    for m in report["missing"][:20]:
        print(f"  missing: {m['id']} {m['group']} seed={m['seed']} ({m['state']})")
    if len(report["missing"]) > 20:
        print(f"  ... and {len(report['missing']) - 20} more (report.md lists all)")
    if report.get("not_in_spec"):
        print(f"  {len(report['not_in_spec'])} cell(s) on disk are not in the spec (an earlier version of it): "
              "listed in report.md, not aggregated")
    return 0


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "run-cell": cmd_run_cell, "status": cmd_status, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agro_megatron.config import ConfigError
    from agro_megatron.study.cells import CellConfigError, CellDirConflict
    from agro_megatron.study.slurm import SlurmError
    from agro_megatron.study.spec import SpecError

    try:
        return COMMANDS[args.command](args)
    except (SpecError, CellConfigError, CellDirConflict, ConfigError, SlurmError, FileNotFoundError) as e:
        print(f"agro-study: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
