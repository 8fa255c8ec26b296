"""Processes forked by a trainer die with it, however it dies.

megatron-core's checkpoint writer (dist_checkpointing's FileSystemWriterAsync, used for every
save, synchronous ones too) forks worker processes that write the files and report back through a
multiprocessing queue. When the trainer is killed (`kill -9`, the OOM killer, a node agent) in the
middle of a save, a worker whose result does not fit in the queue's pipe blocks forever on a
queue that nobody reads: a copy of the trainer's memory (hundreds of MB) stays alive, and so does
every process it holds a pipe to (the reward sandbox's zygote waits for EOF on its stdin).

Linux's parent-death signal fixes that at the source: `die_with_parent()` registers an at-fork
hook that has every child this process forks from Python (os.fork, multiprocessing's "fork"
context) ask the kernel for SIGKILL when its parent dies, prctl(PR_SET_PDEATHSIG). A child whose
parent is already gone by the time the hook runs exits at once. Children started with exec
(subprocess, multiprocessing "spawn") do not run the hook: they own their lifetime (the reward
sandbox's zygote watches its stdin for EOF).

The kernel sends the signal when the *thread* that forked the child exits, so only children
forked by the main thread (which lives as long as the process) get it; megatron's writers are
forked and joined by the saving thread, the main one.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_state = {"registered": False, "forking_pid": None, "prctl": None}


def _prctl():
    if _state["prctl"] is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _state["prctl"] = libc.prctl
    return _state["prctl"]


def _before_fork() -> None:
    main = threading.current_thread() is threading.main_thread()
    _state["forking_pid"] = os.getpid() if main else None


def _after_fork_in_child() -> None:
    parent = _state["forking_pid"]
    if parent is None:  # forked by another thread: its exit would kill the child
        return
    _prctl()(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def die_with_parent() -> bool:
    """From now on, every child this process forks gets SIGKILL when this process dies.

    Idempotent. Returns False (and does nothing) where the kernel has no parent-death signal
    (anything but Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    if not _state["registered"]:
        _prctl()  # resolve the symbol now, not in a freshly forked child
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["registered"] = True
    return True
