"""Spawn N CPU processes joined in a gloo process group and collect what each returns.

Why: megatron-core's TP/PP code paths only run inside a real torch.distributed job. Tests
and benchmarks use this harness to run them on CPU. Each launch costs a few seconds
(interpreter + megatron import), so group many checks into one function.

    results = run_distributed(check_fn, world_size=2, tp=2, args=(...,))

`fn` must be importable by name (a module-level function). With `tp`/`pp`/`cp` given, megatron's
parallel state is initialised (CPU platform layer applied) before `fn` runs; `fn`'s return
value (picklable) from every rank comes back as a list ordered by rank.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from agro_megatron.parallel import free_port  # noqa: F401  (its home is parallel.py; tests import it here)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_free_env() -> dict:
    """This process's environment without torchrun/srun rendezvous variables: for starting a
    fresh command as a plain shell would (a single-process CLI, or torchrun's own launch)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}


def _worker(rank, world_size, port, fn, args, kwargs, tp, pp, cp, seed, result_dir, backend="gloo"):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        if not os.environ.get("AGRO_WORKER_WARNINGS"):
            import warnings

            warnings.simplefilter("ignore")  # megatron's CUDA/apex notices, once per rank
        torch.set_num_threads(1)
        from agro_megatron import parallel

        parallel.init_distributed(backend=backend)
        if tp is not None or pp is not None or cp is not None:
            parallel.init_model_parallel(tp=tp or 1, pp=pp or 1, cp=cp or 1, seed=seed)
        out = fn(*args, **kwargs)
        torch.save({"ok": True, "result": out}, path)
    except BaseException:  # report every failure, including asserts, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        try:
            parallel.destroy()
        except Exception:
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    tp: int | None = None,
    pp: int | None = None,
    cp: int | None = None,
    seed: int = 1234,
    timeout_s: float = 600,
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return per-rank results.

    `backend`: the default group's backend string; "cpu:gloo,cuda:gloo" runs the per-device form
    that platform.distributed_backend uses with CUDA ("cpu:gloo,cuda:nccl"), on CPU.

    Raises RuntimeError carrying every failing rank's traceback.
    """
    with tempfile.TemporaryDirectory(prefix="agro_dist_") as result_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, tuple(args), dict(kwargs or {}), tp, pp, cp, seed, result_dir, backend),
            nprocs=world_size, join=False, start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed job did not finish within {timeout_s} s")
        except mp.ProcessRaisedException as e:  # pragma: no cover - worker catches everything
            raise RuntimeError(str(e)) from None
        except mp.ProcessExitedException as e:
            raise RuntimeError(f"a rank died: {e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: produced no result")
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {rank}:\n{rec['error']}")
        if errors:
            raise RuntimeError("distributed job failed\n" + "\n".join(errors))
        return results
