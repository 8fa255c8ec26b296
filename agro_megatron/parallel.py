"""Process groups: torch.distributed from the launcher's environment + megatron parallel state.

torchrun, Slurm's srun and our test harness all export RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT (Slurm's SLURM_* names are mapped when torchrun's are absent). The backend is
nccl with CUDA, gloo without.
"""
from __future__ import annotations

import os
import random
import re
import socket
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from agro_megatron import platform


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list: `scontrol show hostnames`, else parsed here.

    The fallback handles the compressed forms Slurm writes (``gpu-[003-010,012],cpu1``,
    ``rack[1-2]-n[01-04]``) for the first host only, keeping zero padding.
    """
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    first, depth = "", 0
    for ch in nodelist:  # cut at the first comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        first += ch
    return re.sub(r"\[([^-,\]]+)[^\]]*\]", r"\1", first)


def _slurm_port(job_id: str, step_id: str) -> int:
    """A rendezvous port every task of a step derives alike: 20000-29999, below Linux's ephemeral
    range; distinct for jobs whose ids differ mod 1000 and for consecutive steps of one job."""
    step = int(step_id) if step_id.isdigit() else 0
    return 20000 + (int(job_id) % 1000) * 10 + step % 10


def free_port() -> int:
    """A TCP port that is free on localhost right now (a single-process job's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> bool:
    """Map srun's per-task variables to torch.distributed's when launched by srun without torchrun.

    Only inside a job step (SLURM_STEP_ID set): an sbatch script's own shell also has
    SLURM_PROCID=0 and the job's SLURM_NTASKS, and a plain `python` there is a world of one.
    MASTER_ADDR / MASTER_PORT, unless already set, are the step's first host (where task 0 runs
    with block or cyclic distribution) and a port derived from the job and step ids, so every
    task computes the same rendezvous without talking to the others. Returns True if it mapped.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_slurm_port(env.get("SLURM_JOB_ID", "0"), env["SLURM_STEP_ID"]))
    return True


class RendezvousError(RuntimeError):
    """The ranks did not all meet at MASTER_ADDR:MASTER_PORT within parallel.rendezvous_timeout_minutes."""


def _rendezvous(rank: int, world: int, timeout_minutes: float, pg_timeout: timedelta):
    """torch's env:// rendezvous (rank 0 hosts the TCPStore at MASTER_ADDR:MASTER_PORT and waits
    for every rank to connect; the others connect to it), bounded by its own timeout.

    Why not init_process_group's: torch bounds the rendezvous by the process-group timeout, which
    must cover the slowest collective (30 min by default), so a node that starts late or cannot
    reach the first node would hold every rank for that long. The store is handed over with the
    process-group timeout for its later use."""
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world,
                                           timeout=timedelta(minutes=timeout_minutes)))
    except (RuntimeError, OSError) as e:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
        role = ("waited for the other ranks to connect to its store there" if rank == 0
                else "could not connect to rank 0's store there")
        raise RendezvousError(
            f"rank {rank}/{world} on {socket.gethostname()}: rendezvous at {addr}:{port} failed after at most "
            f"{timeout_minutes:g} min (parallel.rendezvous_timeout_minutes): this rank {role}. Every rank must "
            f"start (a node may have started late or not at all) and reach {addr} on TCP port {port} (name "
            f"resolution, firewall, the right network interface); torch said: {str(e).splitlines()[0]}") from None
    store.set_timeout(pg_timeout)
    return store


def init_distributed(backend: str | None = None, timeout_minutes: float = 30,
                     rendezvous_timeout_minutes: float | None = None) -> None:
    """Initialise the default process group (a 1-process group when not launched distributed).

    timeout_minutes: how long any collective of the group may wait for the slowest rank before it
    fails (jobs: `parallel.timeout_minutes`). Work that only one rank does for longer (rank 0
    converting a 70B HF checkpoint) must not sit behind a collective: see `run_on_rank0`.
    rendezvous_timeout_minutes: how long the ranks wait for each other at start-up
    (`parallel.rendezvous_timeout_minutes`; None: timeout_minutes, torch's own behaviour); past
    it every rank raises RendezvousError.
    """
    if not (isinstance(timeout_minutes, (int, float)) and timeout_minutes > 0):
        raise ValueError(f"timeout_minutes={timeout_minutes!r}: the process-group timeout must be a number of "
                         "minutes > 0 (parallel.timeout_minutes)")
    if rendezvous_timeout_minutes is None:
        rendezvous_timeout_minutes = timeout_minutes
    if not (isinstance(rendezvous_timeout_minutes, (int, float)) and rendezvous_timeout_minutes > 0):
        raise ValueError(f"rendezvous_timeout_minutes={rendezvous_timeout_minutes!r}: must be a number of minutes "
                         "> 0 (parallel.rendezvous_timeout_minutes)")
    if dist.is_initialized():
        return
    from_slurm = _env_from_slurm()
    if "RANK" not in os.environ:  # plain `python ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"RANK={os.environ['RANK']} is set, but not {', '.join(missing)}: a partial "
                           "launcher environment (left over from another job?). Launch with torchrun or srun, "
                           "or unset RANK for a single-process run")
    backend = backend or platform.distributed_backend()
    if backend == "nccl":
        # modulo: a launcher that binds one GPU per task (srun --gpus-per-task) shows each task one device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    pg_timeout = timedelta(minutes=timeout_minutes)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _rendezvous(rank, world, rendezvous_timeout_minutes, pg_timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=pg_timeout)
    if from_slurm:  # one line per rank in the job log: what each task joined
        e = os.environ
        print(f"[rank {dist.get_rank()}/{dist.get_world_size()}] {backend} process group up: slurm task "
              f"{e['SLURM_PROCID']} (local {e['LOCAL_RANK']}) on {socket.gethostname()}, "
              f"master {e['MASTER_ADDR']}:{e['MASTER_PORT']}", flush=True)


class RankZeroWorkFailed(RuntimeError):
    """Rank 0's single-rank work (see run_on_rank0) failed; the ranks waiting for it stop with this."""


class RankZeroWorkTimeout(TimeoutError):
    """Rank 0's single-rank work did not finish within parallel.long_work_timeout_minutes."""


def run_on_rank0(work: Callable[[], object], *, done: str | os.PathLike, failed: str | os.PathLike, what: str,
                 limit_minutes: float, poll_s: float = 1.0, report_every_s: float = 60.0) -> None:
    """Run `work()` on rank 0 alone while the other ranks wait for it on the filesystem, not in a collective.

    A collective fails after the process-group timeout (parallel.timeout_minutes), which long
    single-rank work can exceed (rank 0 converting a 70B HF checkpoint at start-up). So: one short
    barrier (every rank is here; rank 0 has removed a `failed` marker left by an earlier launch);
    rank 0 runs `work`, which must leave the file `done` (also when it had nothing to do); the other
    ranks poll for `done` (a shared filesystem, as the run directory is), printing progress every
    `report_every_s`, for at most `limit_minutes` (parallel.long_work_timeout_minutes), then raise
    RankZeroWorkTimeout. If `work` raises, rank 0 writes the error into `failed` and re-raises; the
    waiting ranks then raise RankZeroWorkFailed at their next poll instead of waiting out the bound.
    Then one barrier. Every rank must call this, without deciding on its own that nothing is to be
    done: a file one node sees may not be visible on another yet. `what` reads after "rank 0", e.g.
    "to convert HF into OUT".
    """
    import time

    done, failed = os.fspath(done), os.fspath(failed)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        work()
        return
    me = dist.get_rank()
    if me == 0 and os.path.exists(failed):
        os.remove(failed)
    dist.barrier()
    if me == 0:
        try:
            work()
            if not os.path.exists(done):
                raise RankZeroWorkFailed(f"rank 0 returned from the work {what} without writing {done}")
        except BaseException as e:
            tmp = f"{failed}.tmp-{os.getpid()}"
            os.makedirs(os.path.dirname(os.path.abspath(failed)), exist_ok=True)
            with open(tmp, "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            os.replace(tmp, failed)  # whole, or not there: a waiting rank never reads half a message
            raise
    else:
        start = time.monotonic()
        deadline, next_report = start + limit_minutes * 60, start
        report = me == 1 or os.environ.get("LOCAL_RANK") == "0"  # one line per node, not per rank
        while not os.path.exists(done):
            if os.path.exists(failed):
                with open(failed) as f:
                    reason = f.read().strip()
                raise RankZeroWorkFailed(f"rank {me}: rank 0 failed {what}: {reason} (its traceback is in rank "
                                         f"0's log; marker {failed}); fix that and relaunch")
            now = time.monotonic()
            if now >= deadline:
                raise RankZeroWorkTimeout(
                    f"rank {me}: waited {limit_minutes:g} min for rank 0 {what} and {done} did not appear: if "
                    "rank 0 is still working (see its log), raise parallel.long_work_timeout_minutes; if it "
                    f"finished, {os.path.dirname(os.path.abspath(done))} is not on a filesystem every node shares")
            if report and now >= next_report:
                print(f"[rank {me}] waiting for rank 0 {what} ({(now - start) / 60:.1f} of at most "
                      f"{limit_minutes:g} min, parallel.long_work_timeout_minutes)", flush=True)
                next_report = now + report_every_s
            time.sleep(min(poll_s, deadline - now))
    dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, via megatron's tracker, the TP-aware CUDA/CPU RNG)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234,
                        virtual_pp: int | None = None, timeout_minutes: float = 30) -> None:
    """Initialise megatron-core's parallel state (TP x PP x CP x DP over the world).

    timeout_minutes: the collective timeout of megatron's groups (TP, PP, DP, CP, ...), like the
    default group's (parallel.timeout_minutes)."""
    platform.apply()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tp}x{pp}x{cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the parallel sizes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, virtual_pipeline_model_parallel_size=virtual_pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    # Same seed on every rank: with use_cpu_initialization megatron builds the full master
    # weight and slices it, so TP/PP layouts get identical weights to TP=1.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
