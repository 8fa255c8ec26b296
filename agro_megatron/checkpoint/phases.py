"""Where a conversion's time goes: wall seconds per phase, so a slow machine explains itself.

    timer = PhaseTimer()
    import_hf(src, out, timer=timer)
    timer.seconds  # {"open": .., "read": .., "reshard": .., "plan": .., "write": .., "fsync": .., "finish": ..}

Phases (import and export alike):
  open     headers, metadata and consistency checks, before any data is touched;
  read     mapping the source bytes (memory maps pre-faulted with MAP_POPULATE: what the kernel
           reads then is counted here; pages it has not read yet are faulted in by the first copy
           or write that touches them, and counted in that phase);
  reshard  copies that cut or assemble TP pieces (QKV interleaving, column splits, vocab padding);
  plan     torch.distributed.checkpoint's planning and metadata (import only);
  write    bytes into the output files (the page cache, and the disk when it throttles writers);
  fsync    waiting for the output to reach the disk;
  finish   side files, metadata and the atomic rename.
Timing costs two clock reads per chunk; without a timer the phases are not measured at all.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

PHASES = ("open", "read", "reshard", "plan", "write", "fsync", "finish")


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (nested phases are the caller's to avoid)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def total(self) -> float:
        return sum(self.seconds.values())


class _NoTimer:
    """The timer used when nobody asked for phases: nothing is measured."""

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        yield

    def add(self, phase: str, seconds: float) -> None:
        pass


NO_TIMER = _NoTimer()
