"""Running one cell: the trainer as a subprocess, a heartbeat in status.json while it runs, and the
outcome recorded from its exit status.

    0    DONE     (the run wrote run/result.json)
    75   PENDING  stopped by SIGTERM/SIGUSR1 after saving a checkpoint: resumable, not a failure
    else FAILED   with the tail of the attempt's log; retried by a later `run` up to max_attempts

The same code serves `run --local` (threads, one per running cell) and each Slurm array task
(`agro-study run-cell`), so a cell behaves the same wherever it runs. SIGTERM/SIGUSR1 sent to this
process are forwarded to the trainer, which saves and exits 75.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from agro_megatron.study.cells import (DONE, FAILED, PENDING, RUNNING, Cell, CellStatus, host_name, read_status,
                                       write_status)

STOPPED_EXIT_CODE = 75  # agro-train's "stopped after saving a checkpoint; rerun resumes"
ERROR_TAIL_LINES = 25


@dataclass(frozen=True)
class LaunchOptions:
    """How the trainer process is started."""
    launcher: str = "local"          # local: python (1 rank) or torchrun; srun: one srun task per rank
    heartbeat_s: float = 10.0        # how often status.json's heartbeat is refreshed
    trainer: tuple[str, ...] = ()    # replaces `python -m agro_megatron.train` (tests: a fake trainer)


def trainer_command(cell: Cell, opts: LaunchOptions) -> list[str]:
    """The command that runs the cell's config: `python -m agro_megatron.train` is agro-train."""
    base = list(opts.trainer) or [sys.executable, "-m", "agro_megatron.train"]
    r = cell.resources
    if opts.launcher == "srun":
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")  # Slurm 22.05+ does not pass sbatch's on to srun
        return ["srun", f"--nodes={r.nodes}", f"--ntasks={r.world}", f"--ntasks-per-node={r.ranks_per_node}",
                "--kill-on-bad-exit=1", "--label", *([f"--cpus-per-task={cpus}"] if cpus else []), *base,
                cell.config_path]
    if r.world > 1:
        if r.nodes > 1:
            raise ValueError(f"cell {cell.id} needs {r.nodes} nodes: run it with --slurm, not --local")
        if opts.trainer:
            return [*base, cell.config_path]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={r.world}",
                "-m", "agro_megatron.train", cell.config_path]
    return [*base, cell.config_path]


class CellLauncher:
    """Runs one cell to its end; `stop()` (or SIGTERM/SIGUSR1 via `forward_signals`) asks it to save."""

    def __init__(self, cell: Cell, opts: LaunchOptions):
        self.cell, self.opts = cell, opts
        self.proc: subprocess.Popen | None = None
        self._stop_sent = False

    def run(self) -> CellStatus:
        cell, opts = self.cell, self.opts
        status = read_status(cell.dir)
        status.state, status.attempts = RUNNING, status.attempts + 1
        status.host, status.pid, status.start, status.end = host_name(), os.getpid(), time.time(), None
        status.exit_code, status.heartbeat, status.error = None, time.time(), None
        write_status(cell.dir, status)
        log_path = os.path.join(cell.dir, f"attempt_{status.attempts}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if opts.launcher == "local":
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)  # a stale launcher variable would make the trainer join another job
        try:
            cmd = trainer_command(cell, opts)
            with open(log_path, "ab") as log:
                log.write(f"[agro-study] {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=opts.launcher == "local")
                if self._stop_sent:
                    self._signal(signal.SIGUSR1)
                rc = self._wait_with_heartbeat(status)
        except OSError as e:
            rc, msg = 127, f"could not start the trainer: {e}"
            with open(log_path, "a") as log:
                log.write(msg + "\n")
        status = read_status(cell.dir)
        status.exit_code, status.end, status.heartbeat = rc, time.time(), time.time()
        finished = os.path.exists(os.path.join(cell.run_dir, "result.json"))
        if finished and (rc == 0 or self._stop_sent):
            # a stop signal that lands after the run's last write can kill the exiting trainer: the
            # run is complete all the same (result.json is written last)
            status.state, status.error = DONE, None
        elif rc == STOPPED_EXIT_CODE or self._stop_sent:
            # after our stop signal a trainer still in set-up (SFT, before the loop) dies of it: the
            # run is resumable all the same (its stored stages and checkpoints are complete)
            status.state, status.error = PENDING, f"stopped (exit {rc}) by a signal; resumable"
        else:
            status.state, status.failures = FAILED, status.failures + 1
            why = "" if rc != 0 else "exit 0 but no run/result.json\n"
            status.error = why + tail(log_path, ERROR_TAIL_LINES)
        write_status(cell.dir, status)
        return status

    def _wait_with_heartbeat(self, status: CellStatus) -> int:
        while True:
            try:
                return self.proc.wait(timeout=self.opts.heartbeat_s)
            except subprocess.TimeoutExpired:
                status = read_status(self.cell.dir)
                status.heartbeat = time.time()
                write_status(self.cell.dir, status)

    def stop(self, sig: int = signal.SIGUSR1) -> None:
        """Ask the trainer to save a checkpoint after its current step and exit 75."""
        self._stop_sent = True
        self._signal(sig)

    def _signal(self, sig: int) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            if self.opts.launcher == "local":
                os.killpg(p.pid, sig)  # torchrun and its ranks share the session started for them
            else:
                p.send_signal(sig)     # srun forwards it to every task
        except ProcessLookupError:
            pass


def forward_signals(launcher: CellLauncher) -> None:
    """SIGTERM and SIGUSR1 to this process: the trainer saves and stops (exit 75)."""
    def handler(signum, frame):
        launcher.stop(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, handler)


def tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
