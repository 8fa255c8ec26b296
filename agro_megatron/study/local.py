"""`agro-study run --local [--parallel K]`: the study's cells on this machine, K at a time.

Each cell is decided by `cells.next_action` (DONE skipped, stale RUNNING requeued, FAILED retried
up to max_attempts) and run by launch.CellLauncher in a worker thread. Ctrl-C asks the running
trainers to save and stop (exit 75); the next `run` resumes them from their checkpoints.
"""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agro_megatron.study.cells import DONE, RUN, Cell, CellConfigError, CellStatus, next_action, prepare_cell_dir
from agro_megatron.study.launch import CellLauncher, LaunchOptions
from agro_megatron.study.spec import StudySpec


@dataclass
class LocalRunSummary:
    """What one `run --local` did: cell id -> final status, and the cells it skipped and why."""
    ran: dict[str, CellStatus] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.state == DONE for s in self.ran.values())


def run_local(spec: StudySpec, cells: list[Cell], *, parallel: int = 1, opts: LaunchOptions | None = None,
              out=None) -> LocalRunSummary:
    opts = opts or LaunchOptions()
    out = out or sys.stdout
    multi = [c for c in cells if c.resources.nodes > 1]
    if multi:
        raise CellConfigError(f"{spec.path}: {len(multi)} cell(s) (e.g. {multi[0].request.group}) need "
                              f"{multi[0].resources.nodes} nodes: run them with `run --slurm`, or set "
                              "resources.nodes: 1 for a local run")
    summary = LocalRunSummary()
    todo = []
    for cell in cells:
        status = prepare_cell_dir(cell)
        action = next_action(status, max_attempts=spec.max_attempts, heartbeat_timeout_s=spec.heartbeat_timeout_s)
        if action == RUN:
            todo.append(cell)
        else:
            summary.skipped[cell.id] = action
    print(f"agro-study: {len(cells)} cells: {len(todo)} to run, "
          f"{sum(a == 'done' for a in summary.skipped.values())} done, "
          f"{sum(a == 'running' for a in summary.skipped.values())} running elsewhere, "
          f"{sum(a == 'exhausted' for a in summary.skipped.values())} failed {spec.max_attempts}x (not retried)",
          file=out, flush=True)
    lock, launchers, count = threading.Lock(), {}, [0]
    t0 = time.monotonic()

    def work(cell: Cell) -> CellStatus:
        launcher = CellLauncher(cell, opts)
        with lock:
            launchers[cell.id] = launcher
        started = time.monotonic()
        status = launcher.run()
        with lock:
            launchers.pop(cell.id, None)
            count[0] += 1
            print(f"[{count[0]}/{len(todo)}] {cell.id} {cell.request.group} seed={cell.request.seed}: "
                  f"{status.state} (exit {status.exit_code}, {time.monotonic() - started:.1f} s)"
                  + (f"\n    {status.error.splitlines()[-1]}" if status.state != DONE and status.error else ""),
                  file=out, flush=True)
        return status

    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    futures = {cell.id: pool.submit(work, cell) for cell in todo}
    try:
        for cid, fut in futures.items():
            summary.ran[cid] = fut.result()
    except KeyboardInterrupt:
        print("agro-study: interrupted: asking running cells to save and stop (rerun `run` to resume)",
              file=out, flush=True)
        for f in futures.values():
            f.cancel()
        with lock:
            for launcher in launchers.values():
                launcher.stop()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    summary.wall_s = time.monotonic() - t0
    return summary
