"""Streaming safetensors I/O for HF checkpoints: lazy reads across shards, bounded-size writes.

Why not `safetensors.safe_open`: it maps each whole shard for as long as the file is open, and
every page a conversion touches stays resident (and counted in RSS) until then - for a 400B
checkpoint, the whole model. The safetensors format is simple (8-byte header length, JSON header,
raw bytes), so `HFCheckpoint.view` maps exactly the rows asked for, as a zero-copy tensor whose
mapping dies with it: reading costs no copy (the page cache is used in place) and resident memory
is what the caller still holds. Shards are written sequentially from a header planned up front.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import BadArgumentError, CheckpointContentError, CorruptFileError, DtypeMismatchError, MissingShardError
from .phases import NO_TIMER

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor's memory, without a copy."""
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def map_file(path: str | os.PathLike, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` elements of `dtype` at byte `offset` of a file, as a 1-D zero-copy READ-ONLY tensor
    (writing into it faults). Read-only shared mapping, pre-faulted in one call (MAP_POPULATE, no
    copy-on-write); released when the tensor is.
    """
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), offset - aligned + count * dtype.itemsize,
                       flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ,
                       offset=aligned)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset - aligned)


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file, dtype, shape, begin, end):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from `path`, or a CorruptFileError that names the file and the fix (a config
    or index cut short by an interrupted download, or edited by hand)."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}): {what} is damaged or truncated; "
                               "re-download it or restore it from the original checkpoint") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(value).__name__}, not an object: it is not a valid "
                               f"{what}; re-download it or restore it from the original checkpoint")
    return value


def _truncated(path, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is truncated or damaged ({why}): an interrupted download or copy? "
                            "Re-download this shard (e.g. `huggingface-cli download` again) and retry")


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(offset of the data section, header dict) of one safetensors file, after checking that
    every tensor it lists lies inside the file (a truncated shard fails here, before any work)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise _truncated(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise _truncated(path, f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _truncated(path, f"its header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _truncated(path, "its header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in info["data_offsets"])
            numel = _numel(int(d) for d in info["shape"])
            itemsize = _DTYPES[info["dtype"]].itemsize if info["dtype"] in _DTYPES else None
        except (KeyError, TypeError, ValueError):
            raise _truncated(path, f"tensor {name!r} has a malformed header entry {info!r}") from None
        if not 0 <= b <= e <= data_size or (itemsize is not None and e - b != numel * itemsize):
            raise _truncated(path, f"tensor {name!r} needs bytes [{b}, {e}) of a {data_size}-byte data section")
    return 8 + n, header


class HFCheckpoint:
    """Lazy, read-only view of an HF safetensors checkpoint (single file or index + shards).

    All headers are parsed on open, so a missing shard fails before any work is done.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CorruptFileError(f"{index} has no valid weight_map: the shard index is damaged; "
                                       "re-download it with the checkpoint")
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).exists():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise MissingShardError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {self.path}: point --hf at a Hugging Face "
                "checkpoint directory with safetensors weights (convert .bin/.pth weights first)")
        missing = [f for f in files if not (self.path / f).exists()]
        if missing:
            raise MissingShardError(
                f"{len(missing)} shard file(s) named in {index.name} are missing from {self.path}: "
                f"{missing[:5]}; re-download the checkpoint (e.g. `huggingface-cli download` "
                "again) so that every shard is present")
        self._entries: dict[str, _Entry] = {}
        for fname in files:
            data_start, header = read_header(self.path / fname)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise CheckpointContentError(f"{fname}: tensor {name} has unsupported dtype {info['dtype']}")
                b, e = info["data_offsets"]
                self._entries[name] = _Entry(self.path / fname, _DTYPES[info["dtype"]],
                                             tuple(info["shape"]), data_start + b, data_start + e)
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self._entries]
            if absent:
                raise MissingShardError(
                    f"tensors {absent[:5]} are listed in {index.name} but not found in their shard "
                    "files: the shards are incomplete or from another checkpoint; re-download them")

    # -- metadata ------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        e = self._entry(name)
        return e.end - e.begin

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointContentError(
                f"tensor {name!r} is not in the checkpoint at {self.path}; is this a complete "
                "Llama checkpoint matching its config.json?") from None

    # -- reads ---------------------------------------------------------------------------------
    def view(self, name: str, row: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows [row, row + rows) of tensor `name` as a zero-copy, read-only tensor over a memory
        map of exactly those bytes (never write into it; `read` gives a copy). The mapping lives as
        long as the tensor, so resident pages are released with it."""
        e = self._entry(name)
        shape = e.shape or (1,)
        row_numel = _numel(shape[1:])
        rows = shape[0] - row if rows is None else rows
        if row < 0 or rows < 0 or row + rows > shape[0]:
            raise ValueError(f"rows [{row}, {row + rows}) out of range for {name} of shape {e.shape}")
        count = rows * row_numel
        if count == 0:
            return torch.empty((rows,) + tuple(shape[1:]), dtype=e.dtype)
        t = map_file(e.file, e.begin + row * row_numel * e.dtype.itemsize, count, e.dtype)
        return t.view(e.shape) if not e.shape else t.view((rows,) + tuple(shape[1:]))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, as an ordinary (copied) tensor of `dtype` (default: stored dtype)."""
        v = self.view(name)
        return v.clone() if dtype in (None, v.dtype) else v.to(dtype)

    def read_rows_into(self, name: str, row: int, out: torch.Tensor) -> None:
        """Copy rows [row, row + out.shape[0]) of tensor `name` into `out` (casting if needed)."""
        out.copy_(self.view(name, row, out.shape[0]).reshape(out.shape))

    def close(self) -> None:
        """Nothing stays open between reads (kept for the context-manager protocol)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '20KB' / int -> bytes (decimal units, as transformers uses); anything
    else, zero or negative is a BadArgumentError naming the option and valid forms."""
    bad = BadArgumentError(f"--max-shard-size {size!r} is not a positive size: use a number of bytes or one "
                           "with a unit, e.g. 5GB, 500MB, 2GiB")
    if isinstance(size, bool):
        raise bad
    if isinstance(size, int):
        if size <= 0:
            raise bad
        return size
    if not isinstance(size, str):
        raise bad
    s = size.strip().upper()
    mult = 1
    for unit, m in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                    ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            s, mult = s[: -len(unit)].strip(), m
            break
    try:
        value = float(s)
    except ValueError:
        raise bad from None
    if not value > 0 or value == float("inf") or int(value * mult) < 1:
        raise bad
    return int(value * mult)


class ShardedSafetensorsWriter:
    """Writes tensors, in a planned order, into safetensors shards of bounded size + the index.

    The header of each shard is written before its data, so tensors stream to disk one at a time
    (a tensor larger than the bound gets a shard of its own, as transformers does).
    """

    def __init__(self, out_dir: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str = "5GB", sync: bool = True, timer=NO_TIMER):
        self.out_dir = Path(out_dir)
        self.sync = sync
        self.timer = timer  # phases: "write", "fsync" (and "reshard" for non-contiguous parts)
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = _numel(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        n = len(shards)
        self._plan = [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", s) for k, s in enumerate(shards)]
        self._order = [(fname, name, shape, dtype) for fname, s in self._plan for name, shape, dtype in s]
        self._pos = 0
        self._file = None
        self._fname = None
        self.total_size = sum(_numel(s) * d.itemsize for _, _, s, d in self._order)

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write tensor `name` (the next one in the planned order) as the concatenation of `parts`."""
        if self._pos >= len(self._order) or self._order[self._pos][1] != name:
            expected = self._order[self._pos][1] if self._pos < len(self._order) else None
            raise RuntimeError(f"writer expected tensor {expected!r} next, got {name!r}")
        fname, _, shape, dtype = self._order[self._pos]
        if fname != self._fname:
            self._open(fname)
        want = _numel(shape) * dtype.itemsize
        got = 0
        for p in parts:
            if p.dtype != dtype:
                raise DtypeMismatchError(f"{name}: part has dtype {p.dtype}, planned {dtype}")
            if not p.is_contiguous():
                with self.timer("reshard"):
                    p = p.contiguous()
            with self.timer("write"):
                self._file.write(_as_bytes(p))
            got += p.numel() * p.element_size()
        if got != want:
            raise RuntimeError(f"{name}: wrote {got} bytes, planned {want} for shape {shape}")
        self._pos += 1

    def _open(self, fname: str) -> None:
        self._close_file()
        entries = next(s for f, s in self._plan if f == fname)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in entries:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with self.timer("write"):
            self._file = open(self.out_dir / fname, "wb")
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._fname = fname

    def _close_file(self) -> None:
        if self._file is not None:
            with self.timer("write"):
                self._file.flush()
            if self.sync:
                with self.timer("fsync"):
                    os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write model.safetensors.index.json."""
        if self._pos != len(self._order):
            raise RuntimeError(f"only {self._pos} of {len(self._order)} planned tensors were written")
        self._close_file()
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {name: fname for fname, name, _, _ in self._order}}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
