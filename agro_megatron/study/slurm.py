"""`agro-study run --slurm`: one job array per resource group, and a report job after them all.

For each group of cells with equal resources (spec.Resources.group_key) it writes, under
<study_dir>/slurm/:

    <group>_p<k>.cells     the cell ids of array part k, one per line (task i runs line i+1)
    <group>_p<k>.sbatch    --array=0-<n-1>%K, logs slurm/logs/%x_%A_%a.out, --requeue, --signal=B:USR1@T
    report.sbatch          `agro-study report`, submitted with --dependency=afterany:<every array id>

Arrays larger than the cluster's MaxArraySize (`scontrol show config`) are split into parts.
Each task runs `agro-study run-cell`, which heartbeats in the cell's status.json and starts the
trainer with srun (one task per rank). Requeue follows slurm/train.sbatch: the batch shell traps
USR1 (sent before the time limit, or by `scancel --batch --signal=USR1`), forwards it, the
trainer saves a checkpoint and exits 75, and the shell requeues this array task
(`scontrol requeue $SLURM_JOB_ID`: each task has its own job id); the requeued task resumes from
the cell's checkpoint.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from agro_megatron.study.cells import RUN, Cell, next_action, prepare_cell_dir, read_status, write_status
from agro_megatron.study.spec import Resources, StudySpec

DEFAULT_MAX_ARRAY_SIZE = 1001   # Slurm's default MaxArraySize


class SlurmError(RuntimeError):
    """sbatch/scontrol failed; the message carries Slurm's own words."""


@dataclass
class ArrayPart:
    """One sbatch job array: a resource group's cells (or a MaxArraySize-sized slice of them)."""
    name: str
    resources: Resources
    cell_ids: list[str]
    script: str = ""
    cells_file: str = ""
    job_id: str | None = None


@dataclass
class SlurmPlan:
    arrays: list[ArrayPart] = field(default_factory=list)
    report_script: str = ""
    report_job: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def max_array_size(run=None) -> int:
    """MaxArraySize from `scontrol show config` (Slurm's default 1001 when it cannot be read)."""
    run = run or subprocess.run
    try:
        p = run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", p.stdout or "", re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def time_seconds(limit: str) -> int:
    """A Slurm --time ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in seconds."""
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
        h, m, sec = ([int(x) for x in limit.split(":")] + [0, 0])[:3]
    else:
        parts = [int(x) for x in limit.split(":")]
        h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts[:2])}.get(len(parts), tuple(parts[:3]))
    return days * 86400 + h * 3600 + m * 60 + sec


def signal_lead_s(limit: str) -> int:
    """How long before the time limit USR1 comes: a tenth of the limit, between 60 s and 600 s."""
    return max(60, min(600, time_seconds(limit) // 10))


def plan_arrays(cells: list[Cell], max_size: int) -> list[ArrayPart]:
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.resources.group_key(), []).append(c)
    out = []
    for gi, members in enumerate(groups.values()):
        res = members[0].resources
        for k in range(0, len(members), max_size):
            part = members[k:k + max_size]
            out.append(ArrayPart(f"g{gi}_{res.label()}_p{k // max_size}", res, [c.id for c in part]))
    return out


def array_script(spec: StudySpec, part: ArrayPart, study_dir: str, workdir: str, python: str) -> str:
    r, s = part.resources, spec.slurm
    logs = os.path.join(study_dir, "slurm", "logs")
    lines = ["#!/bin/bash",
             f"# agro-study {spec.name}: {len(part.cell_ids)} cell(s), one per array task (generated; edit the spec)",
             f"#SBATCH --job-name={spec.name}-{part.name}",
             f"#SBATCH --array=0-{len(part.cell_ids) - 1}%{s.max_parallel}",
             f"#SBATCH --nodes={r.nodes}",
             f"#SBATCH --ntasks-per-node={r.ranks_per_node}",
             f"#SBATCH --cpus-per-task={r.cpus_per_task}"]
    if r.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={r.gpus_per_node}")
    if r.partition:
        lines.append(f"#SBATCH --partition={r.partition}")
    lines += [f"#SBATCH --time={r.time_limit}",
              f"#SBATCH --output={logs}/%x_%A_%a.out",
              "#SBATCH --open-mode=append",
              "#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{signal_lead_s(r.time_limit)}"]
    lines += [f"#SBATCH {a}" for a in s.extra_args]
    cells_file = os.path.join(study_dir, "slurm", f"{part.name}.cells")
    lines += [
        "",
        "STOPPED=75  # agro-train / run-cell: stopped after saving a checkpoint; rerunning resumes",
        'log() { echo "[agro-study $(date \'+%F %T\')] $*"; }',
        "got_usr1=0; pid=''",
        "on_signal() { got_usr1=1; log \"$1: asking the cell to save a checkpoint and stop\"; "
        "[ -n \"$pid\" ] && kill -\"$1\" \"$pid\" 2>/dev/null; }",
        "trap 'on_signal USR1' USR1  # TERM is not trapped: Slurm sends it when the requeue ends this run",
        f"cd {shlex.quote(workdir)} || exit 1",
        *( [s.setup] if s.setup else [] ),
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
        "export PYTHONUNBUFFERED=1",
        f"cell=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(cells_file)})",
        "[ -n \"$cell\" ] || { log \"no cell for task $SLURM_ARRAY_TASK_ID\"; exit 1; }",
        "log \"task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}): "
        "cell $cell on ${SLURM_JOB_NODELIST:-?}\"",
        f"{shlex.quote(python)} -m agro_megatron.cli.study run-cell {shlex.quote(study_dir)} \"$cell\" "
        f"--launcher srun --max-attempts {spec.max_attempts} &",
        "pid=$!",
        "while :; do wait \"$pid\"; rc=$?; kill -0 \"$pid\" 2>/dev/null || break; done",
        "wait \"$pid\" 2>/dev/null; r=$?; [ \"$r\" != 127 ] && rc=$r",
        "if [ \"$rc\" = 0 ]; then log \"cell $cell done\"; exit 0; fi",
        "if [ \"$rc\" = \"$STOPPED\" ] || [ \"$got_usr1\" = 1 ]; then",
        "    log \"cell $cell stopped (exit $rc); requeueing job $SLURM_JOB_ID to resume\"",
        "    scontrol requeue \"$SLURM_JOB_ID\" && exit 0",
        "    log \"scontrol requeue failed: run agro-study run --slurm again to resume\"",
        "fi",
        "log \"cell $cell failed (exit $rc)\"",
        "exit \"$rc\"",
    ]
    part.cells_file = cells_file
    return "\n".join(lines) + "\n"


def report_script(spec: StudySpec, study_dir: str, workdir: str, python: str) -> str:
    logs = os.path.join(study_dir, "slurm", "logs")
    lines = ["#!/bin/bash", f"# agro-study {spec.name}: the report, after every array has ended (generated)",
             f"#SBATCH --job-name={spec.name}-report", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             "#SBATCH --cpus-per-task=1", f"#SBATCH --time={spec.slurm.report_time_limit}",
             f"#SBATCH --output={logs}/%x_%j.out"]
    lines += [f"#SBATCH {a}" for a in spec.slurm.extra_args if "gpu" not in a]
    lines += ["", f"cd {shlex.quote(workdir)} || exit 1", *([spec.slurm.setup] if spec.slurm.setup else []),
              f"exec {shlex.quote(python)} -m agro_megatron.cli.study report {shlex.quote(spec.path)} "
              f"--study-dir {shlex.quote(study_dir)}"]
    return "\n".join(lines) + "\n"


def _queued_tasks(run=None) -> set[str] | None:
    """<array>_<task> of every job Slurm still holds (pending or running), or None if squeue fails."""
    run = run or subprocess.run
    try:
        p = run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return {line.strip() for line in p.stdout.splitlines() if line.strip()}


def submit_study(spec: StudySpec, cells: list[Cell], study_dir: str, *, dry_run: bool = False,
                 max_size: int | None = None, python: str | None = None, workdir: str | None = None,
                 sbatch_args: tuple[str, ...] = (), out=None) -> SlurmPlan:
    """Write the scripts; unless dry_run, submit the arrays and the report job (SlurmError on failure)."""
    out = out or sys.stdout
    study_dir = os.path.abspath(study_dir)
    python = python or sys.executable
    workdir = os.path.abspath(workdir or os.getcwd())
    plan = SlurmPlan()
    queued = None if dry_run else _queued_tasks()
    todo = []
    for cell in cells:
        status = prepare_cell_dir(cell)
        action = next_action(status, max_attempts=spec.max_attempts, heartbeat_timeout_s=spec.heartbeat_timeout_s)
        if action == RUN and queued and status.slurm_job in queued:
            action = "queued"
        if action == RUN:
            todo.append(cell)
        else:
            plan.skipped[cell.id] = action
    size = max_size or (DEFAULT_MAX_ARRAY_SIZE if dry_run else max_array_size())
    plan.arrays = plan_arrays(todo, size)
    sdir = os.path.join(study_dir, "slurm")
    os.makedirs(os.path.join(sdir, "logs"), exist_ok=True)
    for part in plan.arrays:
        part.script = array_script(spec, part, study_dir, workdir, python)
        with open(part.cells_file, "w") as f:
            f.write("\n".join(part.cell_ids) + "\n")
        path = os.path.join(sdir, f"{part.name}.sbatch")
        with open(path, "w") as f:
            f.write(part.script)
    plan.report_script = report_script(spec, study_dir, workdir, python)
    report_path = os.path.join(sdir, "report.sbatch")
    with open(report_path, "w") as f:
        f.write(plan.report_script)
    print(f"agro-study: {len(cells)} cells: {len(todo)} to submit in {len(plan.arrays)} array(s) "
          f"(MaxArraySize {size}); skipped: {_count(plan.skipped)}", file=out, flush=True)
    if dry_run:
        for part in plan.arrays:
            print(f"# ---- {os.path.join(sdir, part.name + '.sbatch')} ({len(part.cell_ids)} cells)\n{part.script}",
                  file=out)
        print(f"# ---- {report_path} (sbatch --dependency=afterany:<array ids>)\n{plan.report_script}", file=out)
        return plan
    by_id = {c.id: c for c in todo}
    for part in plan.arrays:
        part.job_id = _sbatch([*sbatch_args, os.path.join(sdir, f"{part.name}.sbatch")])
        for i, cid in enumerate(part.cell_ids):
            st = read_status(by_id[cid].dir)
            st.slurm_job = f"{part.job_id}_{i}"
            write_status(by_id[cid].dir, st)
        print(f"submitted array {part.job_id}: {part.name} ({len(part.cell_ids)} cells)", file=out, flush=True)
    deps = [p.job_id for p in plan.arrays]
    args = [f"--dependency=afterany:{':'.join(deps)}"] if deps else []
    plan.report_job = _sbatch([*args, report_path])
    print(f"submitted report job {plan.report_job}" + (f" after {', '.join(deps)}" if deps else ""), file=out,
          flush=True)
    return plan


def _sbatch(args: list[str]) -> str:
    try:
        p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise SlurmError(f"sbatch could not run ({e}); is Slurm installed here? Use --dry-run to see the scripts")
    if p.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip().split(";")[0]


def _count(skipped: dict) -> str:
    counts: dict[str, int] = {}
    for v in skipped.values():
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
