"""Process-parallel map for the report's independent pieces of work (reading cells, bootstrap fits,
figures).

A report over a large study is CPU-bound in three places that do not depend on each other within
their phase: parsing each cell's metrics, refitting each group's compute curve, and drawing each
figure. `parallel_map` spreads one such phase over the CPUs with forked workers, which inherit the
already-imported numpy/scipy/matplotlib instead of importing them again; small inputs stay in
this process, where a pool would cost more than it saves.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], jobs: Sequence[T], workers: int | None, min_jobs: int = 8) -> list[R]:
    """``[fn(j) for j in jobs]``, in up to ``workers`` processes (None: one per CPU; 1: here).

    Runs in this process when there are fewer than ``min_jobs`` jobs. ``fn`` must be a module-level
    function and jobs and results picklable. Order is kept.
    """
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < max(2, min_jobs):
        return [fn(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    workers = min(workers, len(jobs))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
