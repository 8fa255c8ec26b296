"""Directories that appear whole or not at all: the one atomic-directory helper.

    with atomic_dir(out) as tmp:                      # one process (conversion)
        write(tmp)
    with atomic_dir(out, collective=True) as tmp:     # every rank calls it (sharded saves)
        dist_checkpointing.save(state, str(tmp))

Everything is written into a hidden sibling `.<name>.tmp-<token>` and renamed to `out` at the end,
so an interrupted job never leaves a directory that looks finished; an existing `out` is first
renamed aside (`.<name>.tmp-old-<token>`) and deleted only after the new one is in place (a
kill between the two renames leaves both copies under temp names, never a half-deleted `out`).

Collective mode (torch.distributed initialised with more than one rank): rank 0 picks the temp
name and broadcasts it, creates the directory, and after a barrier every rank writes into it;
after a second barrier rank 0 writes the `marker` file, renames, and a third barrier releases
everyone, so no rank returns before the directory is in place. The ranks must share the
filesystem. If the block raises, the temp directory is deleted in single-process mode; in
collective mode it is left (other ranks may still be writing into it) for `remove_stale` to clear
before the next save.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path, PurePath
from typing import Iterator

import torch.distributed as dist

TMP_TAG = ".tmp-"
"""Part of every temporary name made here (`remove_stale` and leftover checks look for it)."""


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
    """Rename `tmp` to `final`, moving an existing `final` aside first and deleting it after."""
    if os.path.lexists(final):
        aside = final.with_name(f".{final.name}{TMP_TAG}old-{token}")
        os.rename(final, aside)
        os.rename(tmp, final)
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
    else:
        os.rename(tmp, final)


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
            if marker:
                (tmp / marker).touch()
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


def remove_stale(parent: str | os.PathLike, name: str | None = None) -> list[str]:
    """Delete what interrupted `atomic_dir` blocks left in `parent` (only `name`'s, when given).

    Call it from one process while no `atomic_dir` into `parent` is in progress (e.g. rank 0
    before a collective save). Returns the removed paths.
    """
    if not os.path.isdir(parent):
        return []
    prefix = "." if name is None else f".{name}{TMP_TAG}"
    removed = []
    for entry in sorted(os.listdir(parent)):
        if is_temporary(entry) and entry.startswith(prefix):
            path = os.path.join(parent, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed
