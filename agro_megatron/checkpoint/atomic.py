"""Directories that appear whole or not at all: the one atomic-directory helper.

    with atomic_dir(out) as tmp:                      # one process (conversion)
        write(tmp)
    with atomic_dir(out, collective=True) as tmp:     # every rank calls it (sharded saves)
        dist_checkpointing.save(state, str(tmp))

Everything is written into a hidden sibling `.<name>.tmp-<token>` and renamed to `out` at the end,
so an interrupted job never leaves a directory that looks finished; an existing `out` is first
renamed aside (`.<name>.tmp-old-<token>`) and deleted only after the new one is in place. A
kill between the two renames leaves both complete copies under temp names and no `out`:
`recover_interrupted` (called by `remove_stale`, and before a resume) renames the new one into
place, so a complete directory is never lost. A temp directory that holds its `marker` is complete
too, and is recovered when `out` does not exist.

Collective mode (torch.distributed initialised with more than one rank): rank 0 picks the temp
name and broadcasts it, creates the directory, and after a barrier every rank writes into it;
after a second barrier rank 0 writes the `marker` file, renames, and a third barrier releases
everyone, so no rank returns before the directory is in place. The ranks must share the
filesystem. If the block raises, the temp directory is deleted in single-process mode; in
collective mode it is left (other ranks may still be writing into it) for `remove_stale` to clear
before the next save.

`fault_point(phase, name)` marks the steps between which a process can die; the fault tests
(tests/test_faults.py) SIGKILL a run there through the AGRO_FAULT_KILL_AT environment variable.
Without it set, a fault point does nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import uuid
from pathlib import Path, PurePath
from typing import Iterator

import torch.distributed as dist

TMP_TAG = ".tmp-"
"""Part of every temporary name made here (`remove_stale` and leftover checks look for it)."""
_OLD = "old-"  # `.<name>.tmp-old-<token>`: the previous `<name>`, moved aside by `_swap_in`

FAULT_ENV = "AGRO_FAULT_KILL_AT"
"""`PHASE[@NAME][#K]`: `fault_point` kills this process (SIGKILL, or the signal named by
AGRO_FAULT_SIGNAL) at the K-th (default first) time it reaches PHASE for the directory NAME (any,
by default). For tests that need a process to die at a chosen point; inert when unset."""
_fault_hits: dict[str, int] = {}


def fault_point(phase: str, name: str = "") -> None:
    """A named point where the process may die (see FAULT_ENV); a no-op unless the variable is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, nth = spec.partition("#")
    want_phase, _, want_name = want.partition("@")
    if want_phase != phase or (want_name and want_name != name):
        return
    _fault_hits[spec] = _fault_hits.get(spec, 0) + 1
    if _fault_hits[spec] == int(nth or 1):
        sig = getattr(signal, os.environ.get("AGRO_FAULT_SIGNAL", "SIGKILL"))
        os.kill(os.getpid(), sig)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _token(collective: bool) -> str:
    token = uuid.uuid4().hex[:10]
    if collective:
        box = [token]
        dist.broadcast_object_list(box, src=0)  # every rank writes into rank 0's directory
        token = box[0]
    return token


def _swap_in(tmp: Path, final: Path, token: str) -> None:
    """Rename the complete `tmp` to `final`, moving an existing `final` aside first and deleting it
    after. Between the two renames `final` does not exist; `recover_interrupted` completes the swap."""
    if os.path.lexists(final):
        aside = final.with_name(f".{final.name}{TMP_TAG}{_OLD}{token}")
        os.rename(final, aside)
        fault_point("moved-aside", final.name)
        os.rename(tmp, final)
        fault_point("swapped", final.name)
        _delete(aside)
    else:
        os.rename(tmp, final)
        fault_point("swapped", final.name)


def _delete(path: str | os.PathLike) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, collective: bool = False,
               marker: str | None = None) -> Iterator[str | Path]:
    """Yield a fresh temp directory beside `final`; when the block succeeds it becomes `final`.

    collective: every rank of the (initialised, multi-rank) default process group enters the
    block and writes into the same directory; ignored in a single-process job. Leave it False for
    work that one rank does alone while the others are elsewhere (a collective would hang).
    marker: the name of an empty file written last, just before the rename (e.g. "COMPLETE").
    Yields a `Path` when `final` is a `PurePath`, else a `str`.
    """
    collective = collective and _distributed()
    rank0 = not collective or dist.get_rank() == 0
    final_path = Path(final).absolute()
    token = _token(collective)
    tmp = final_path.with_name(f".{final_path.name}{TMP_TAG}{token}")
    if rank0:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    if collective:
        dist.barrier()
    try:
        yield tmp if isinstance(final, PurePath) else str(tmp)
        if collective:
            dist.barrier()
        if rank0:
            fault_point("written", final_path.name)
            if marker:
                (tmp / marker).touch()
                fault_point("marked", final_path.name)
            _swap_in(tmp, final_path, token)
    except BaseException:
        if not collective:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if collective:
        dist.barrier()


def is_temporary(name: str) -> bool:
    """Whether a directory entry's name is one of atomic_dir's temp names."""
    return name.startswith(".") and TMP_TAG in name


def recover_interrupted(parent: str | os.PathLike, name: str | None = None,
                        marker: str | None = None) -> list[str]:
    """Put back complete directories that an interrupted `atomic_dir` left under temp names.

    For each `<name>` (only `name`, when given) that does not exist in `parent`:
    * a kill between `_swap_in`'s renames left `.<name>.tmp-old-<token>` (the previous, complete
      `<name>`) and `.<name>.tmp-<token>` (its complete replacement): the replacement is renamed
      to `<name>` and the previous one deleted, finishing the swap (the previous one is renamed
      back, when the replacement is gone);
    * else a `.<name>.tmp-<token>` holding `marker` (written after everything else) is complete:
      the newest such is renamed to `<name>`.
    Call it from one process while no `atomic_dir` into `parent` is in progress. Returns the
    recovered final paths. What is left under temp names afterwards is for `remove_stale`.
    """
    if not os.path.isdir(parent):
        return []
    entries = set(os.listdir(parent))
    swaps: dict[str, list[str]] = {}     # base -> what a swap left: the replacement, else the previous
    marked: dict[str, list[str]] = {}    # base -> temp directories holding the marker
    for entry in sorted(entries):
        if not is_temporary(entry):
            continue
        base, _, token = entry[1:].rpartition(TMP_TAG)
        if name is not None and base != name:
            continue
        if token.startswith(_OLD):
            new = f".{base}{TMP_TAG}{token[len(_OLD):]}"
            swaps.setdefault(base, []).append(new if new in entries else entry)
        elif marker and os.path.exists(os.path.join(parent, entry, marker)):
            marked.setdefault(base, []).append(entry)
    recovered = []
    for base in sorted(set(swaps) | set(marked)):
        final = os.path.join(parent, base)
        if os.path.lexists(final):
            continue
        found = swaps.get(base) or marked[base]
        pick = max(found, key=lambda e: os.path.getmtime(os.path.join(parent, e)))
        os.rename(os.path.join(parent, pick), final)
        recovered.append(final)
        previous = f".{base}{TMP_TAG}{_OLD}{pick[len(base) + 1 + len(TMP_TAG):]}"
        if pick in swaps.get(base, ()) and _OLD not in pick and previous in entries:
            _delete(os.path.join(parent, previous))  # what the interrupted swap had left to do
    return recovered


def remove_stale(parent: str | os.PathLike, name: str | None = None, marker: str | None = None) -> list[str]:
    """Recover what an interrupted `atomic_dir` left complete (`recover_interrupted`), then delete
    the rest of its temp directories in `parent` (only `name`'s, when given).

    Call it from one process while no `atomic_dir` into `parent` is in progress (e.g. rank 0
    before a collective save). Returns the removed paths.
    """
    if not os.path.isdir(parent):
        return []
    recover_interrupted(parent, name, marker)
    prefix = "." if name is None else f".{name}{TMP_TAG}"
    removed = []
    for entry in sorted(os.listdir(parent)):
        if is_temporary(entry) and entry.startswith(prefix):
            path = os.path.join(parent, entry)
            _delete(path)
            removed.append(path)
    return removed
