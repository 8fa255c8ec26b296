"""megatron-core's `torch_dist` checkpoint format, written and read without megatron or torchrun.

Layout (identical to what `GPTModel.sharded_state_dict()` + `dist_checkpointing.save` write with
megatron-core 0.16.1, checked against a real save at TP=2 x PP=2):
  * `.metadata` + `*.distcp`: one torch.distributed.checkpoint (DCP) checkpoint. Tensor keys are
    `mapping.Weight.ckpt_key`; layer weights are stacked along a leading layer axis of size
    num_layers (global layer index, whatever the PP stage); each TP rank's piece is one chunk
    (linear_fc1: two chunks per rank, gate and up). Replicated tensors are stored once.
    Per-layer `_extra_state` objects of the four linears are bytes entries
    `<key>/shard_<layer>_<num_layers>` holding `[None]`, as the local spec saves them.
  * `common.pt` (the non-sharded state, empty for a model) and `metadata.json`
    (`{"sharded_backend": "torch_dist", ...}`), as megatron-core 0.16 writes and reads them;
    0.19 keeps the common state inside the DCP files and the two do not interchange (the
    converter's metadata records the writer's version: see convert.read_metadata).

Why DCP directly and not `dist_checkpointing.save`: that call needs every rank's tensors in
memory at once (one process per rank, or all shards in one process). DCP's planner API lets one
process describe every chunk of every (virtual) rank up front - the global `.metadata` is exact -
while the storage writer below asks for each chunk's data only when it writes it, so one chunk is
in memory at a time. Resharding at load time is DCP's: any TP x PP reads the overlaps it needs.

Reading (export) does not go through DCP's loader, which copies every chunk twice (torch.load,
then into the destination): `DistCheckpointReader` maps each stored chunk's raw bytes, found by
parsing its torch.save record (a stored zip: `data.pkl` describes the tensor, `data/0` holds it),
and falls back to torch.load for any record that is not a plain contiguous tensor. Chunks are
written without the zip CRC32, which torch.load never checks and which costs as much as the write.

torch internals relied on (torch pinned to 2.13; the tests exercise each): `_StorageInfo` (DCP's
per-chunk file location), the torch.save zip record layout, `torch.utils.serialization.config`.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import struct
import time
import warnings
import zipfile
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.utils.serialization import config as serialization_config

from .errors import CorruptFileError
from .phases import NO_TIMER

_SINGLE_PROCESS_WARNING = ".*torch.distributed is disabled.*"
MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}


@dataclasses.dataclass
class Chunk:
    """One chunk of one global tensor (or one bytes object) and how to produce its data."""

    key: str
    file: str
    produce: Callable[[], torch.Tensor | io.BytesIO]
    offsets: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    global_shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None  # None: a bytes object

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return 0
        n = self.dtype.itemsize
        for s in self.sizes:
            n *= s
        return n

    def write_item(self) -> WriteItem:
        if self.dtype is None:
            return WriteItem(index=MetadataIndex(self.key), type=WriteItemType.BYTE_IO)
        offsets = torch.Size(self.offsets)
        return WriteItem(
            index=MetadataIndex(self.key, offsets), type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(self.sizes)),
                                        properties=TensorProperties(dtype=self.dtype),
                                        size=torch.Size(self.global_shape)))


class _LazyPlanner(DefaultSavePlanner):
    """A save plan made of Chunk descriptions; data is produced when the writer asks for it."""

    def __init__(self, chunks: Sequence[Chunk]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {c.write_item().index: c for c in chunks}
        self._items = [c.write_item() for c in chunks]

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        data = self._chunks[write_item.index].produce()
        if isinstance(data, torch.Tensor):
            expect = tuple(write_item.tensor_data.chunk.sizes)
            if tuple(data.shape) != expect or data.dtype != write_item.tensor_data.properties.dtype:
                raise RuntimeError(f"{write_item.index.fqn}: produced {tuple(data.shape)} {data.dtype}, "
                                   f"planned {expect} {write_item.tensor_data.properties.dtype}")
            if not data.is_contiguous():
                data = data.contiguous()
            if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes whole storages
                data = data.clone(memory_format=torch.contiguous_format)
        return data


class _WriteRecorder:
    """A file's `write` that keeps the OSError it raised: torch.save reports a failed write (a full
    disk) only as a RuntimeError about zip positions, which names no cause."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self._f.flush()


def _save_tensor(data: torch.Tensor, f) -> None:
    """torch.save `data` into open file `f`; a failed write raises its own OSError (ENOSPC...)."""
    out = _WriteRecorder(f)
    try:
        torch.save(data, out)
    except RuntimeError as e:
        if out.error is not None:
            raise out.error from e
        raise


class _StreamingWriter(FileSystemWriter):
    """Writes each planned chunk to its file as soon as its data is produced (one in memory)."""

    def __init__(self, path, file_of: dict, on_chunk: Callable[[int], None] | None = None, sync: bool = True,
                 timer=NO_TIMER):
        super().__init__(path, single_file_per_rank=True, sync_files=sync, thread_count=1, overwrite=True)
        self._file_of = file_of
        self._on_chunk = on_chunk
        self._timer = timer
        self.write_data_s = 0.0  # wall time inside write_data: the rest of dcp.save is planning

    def write_data(self, plan: SavePlan, planner) -> Future:
        start = time.perf_counter()
        try:
            return self._write_data(plan, planner)
        finally:
            self.write_data_s += time.perf_counter() - start

    def _write_data(self, plan: SavePlan, planner) -> Future:
        timer = self._timer
        by_file: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            by_file.setdefault(self._file_of[item.index], []).append(item)
        results = []
        for fname, items in by_file.items():
            with open(os.path.join(self.path, fname), "wb") as f:
                for item in items:
                    data = planner.resolve_data(item)  # the chunk's producer times its read / reshard
                    offset = f.tell()
                    with timer("write"):
                        if item.type == WriteItemType.BYTE_IO:
                            f.write(data.getbuffer())
                            nbytes = 0
                        else:
                            _save_tensor(data, f)
                            nbytes = data.nbytes
                    length = f.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(fname, offset, length)))
                    del data
                    if self._on_chunk:
                        self._on_chunk(nbytes)
                with timer("write"):
                    f.flush()
                if self.sync_files:
                    with timer("fsync"):
                        os.fsync(f.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


def write_chunks(path: str | os.PathLike, chunks: Sequence[Chunk], *, sync: bool = True,
                 on_chunk: Callable[[int], None] | None = None, timer=NO_TIMER) -> None:
    """Write one DCP checkpoint made of `chunks` (in order, one file per distinct `Chunk.file`),
    plus megatron's common.pt and metadata.json. `timer` (phases.PhaseTimer) gets the write,
    fsync, plan (DCP's own work around the writes) and finish phases."""
    start = time.perf_counter()
    file_of = {c.write_item().index: c.file for c in chunks}
    writer = _StreamingWriter(path, file_of, on_chunk, sync, timer)
    # torch.load never checks the zip CRC32 of a record; computing it costs as much as the write.
    try:
        with warnings.catch_warnings(), serialization_config.patch({"save.compute_crc32": False}):
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.save({}, storage_writer=writer, planner=_LazyPlanner(chunks), no_dist=True)
    except CheckpointException as e:  # DCP wraps every error; raise the original (e.g. a ConversionError)
        original = next(iter(e.failures.values()), (None,))[0]
        if isinstance(original, BaseException):
            raise original from None
        raise
    timer.add("plan", time.perf_counter() - start - writer.write_data_s)
    with timer("finish"):
        torch.save({}, os.path.join(path, "common.pt"))
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump(MEGATRON_CONFIG, f)


def none_object() -> io.BytesIO:
    """The bytes megatron stores for a ShardedObject holding None (local-spec `_extra_state`)."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


# ---------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of an open file, seekable on its own."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(0, base + pos), self._len)
        return self._pos

    def readinto(self, buf):
        n = min(len(buf), self._len - self._pos)
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n]) or 0
        self._pos += got
        return got


class _TensorMeta(pickle.Unpickler):
    """Reads the tensor description out of a torch.save'd `data.pkl` without loading any data."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("torch", "Size"):
            return tuple
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid  # ('storage', storage type, key, location, numel)


def _member_offset(f, start: int, info: zipfile.ZipInfo) -> int:
    """File offset of a stored zip member's data (from its local header)."""
    f.seek(start + info.header_offset)
    header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _raw_tensor_location(f, start: int, length: int, dtype: torch.dtype, sizes: tuple) -> int | None:
    """Byte offset in the file of the raw data of a torch.save'd contiguous tensor record, or None
    if the record is anything else (the caller then falls back to torch.load). Member bytes are
    read directly: records are written without CRC32 (see write_chunks), which zipfile would check."""
    try:
        zf = zipfile.ZipFile(_Slice(f, start, length))
        pkl = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
        if pkl.compress_type != zipfile.ZIP_STORED:
            return None
        f.seek(_member_offset(f, start, pkl))
        storage, offset, size, stride = _TensorMeta(io.BytesIO(f.read(pkl.file_size))).load()
        _, storage_type, key, _, numel = storage
        contiguous = tuple(torch.empty(sizes, device="meta").stride())
        if (_STORAGE_DTYPES.get(storage_type) != dtype or offset != 0 or size != tuple(sizes)
                or (stride != contiguous and math.prod(sizes) > 1) or numel != math.prod(sizes)):
            return None
        info = zf.getinfo(pkl.filename[: -len("data.pkl")] + f"data/{key}")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * dtype.itemsize:
            return None
        return _member_offset(f, start, info)
    except (zipfile.BadZipFile, pickle.UnpicklingError, StopIteration, KeyError, ValueError, TypeError,
            struct.error):
        return None


class DistCheckpointReader:
    """Reads stored chunks of a torch_dist checkpoint in one process.

    Chunks are returned as zero-copy views of the .distcp files when the record is a plain
    contiguous tensor (what DCP writes), else loaded with torch.load. Regions that cut across
    chunks along anything but rows are assembled by copying.
    """

    def __init__(self, path: str | os.PathLike, timer=NO_TIMER):
        self.path = os.fspath(path)
        self.timer = timer  # phases: "read" for stored chunks, "reshard" for assembling copies
        try:
            self.metadata = FileSystemReader(self.path).read_metadata()
        except FileNotFoundError:
            raise CorruptFileError(f"{self.path} has no .metadata: not a complete torch_dist checkpoint; re-import "
                                   "it with `agro-convert import`") from None
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
            raise CorruptFileError(f"{os.path.join(self.path, '.metadata')} is truncated or damaged ({type(e).__name__}: "
                                   f"{e}); re-import the checkpoint with `agro-convert import`") from None
        self._check_files()
        self._cache: dict = {}  # chunks of the tensor (and layer) read last

    def _check_files(self) -> None:
        """Every chunk the metadata lists lies inside its file: a truncated .distcp fails here,
        before any output is written, instead of as an mmap or unpickling error halfway."""
        end: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            end[info.relative_path] = max(end.get(info.relative_path, 0), info.offset + info.length)
        for name, need in sorted(end.items()):
            path = os.path.join(self.path, name)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise CorruptFileError(f"{path} is missing: the checkpoint is incomplete; re-import it with "
                                       "`agro-convert import`") from None
            if size < need:
                raise CorruptFileError(f"{path} is truncated ({size} bytes, the checkpoint's metadata needs {need}): "
                                       "an interrupted copy? copy it again or re-import with `agro-convert import`")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def keys(self) -> Iterable[str]:
        return self.metadata.state_dict_metadata.keys()

    def chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        """One stored chunk (shape chunk.sizes)."""
        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))]
        path = os.path.join(self.path, info.relative_path)
        dtype, sizes = self.dtype(key), tuple(chunk.sizes)
        with open(path, "rb") as f:
            at = None if info.transform_descriptors else _raw_tensor_location(f, info.offset, info.length, dtype, sizes)
            if at is None:
                f.seek(info.offset)
                return torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        from .hf_io import map_file

        return map_file(path, at, math.prod(sizes), dtype).view(sizes)

    def rows(self, key: str, lead: tuple[int, ...], row: int, rows: int) -> list[torch.Tensor]:
        """Rows [row, row + rows) of global tensor `key` at leading indices `lead` (e.g. the layer),
        as a list of tensors to concatenate along dim 0 (views of the stored chunks if the chunks
        split only rows, else one assembled tensor)."""
        md = self.metadata.state_dict_metadata[key]
        if self._cache.get("at") != (key, lead):
            self._cache = {"at": (key, lead)}
        d = len(lead)
        rest = tuple(md.size[d + 1:])
        hits = []
        for c in md.chunks:
            if any(not c.offsets[i] <= lead[i] < c.offsets[i] + c.sizes[i] for i in range(d)):
                continue
            lo, hi = max(c.offsets[d], row), min(c.offsets[d] + c.sizes[d], row + rows)
            if lo < hi:
                hits.append((lo, hi, c))
        hits.sort(key=lambda h: (h[0], tuple(h[2].offsets)))
        volume = sum((hi - lo) * math.prod(c.sizes[d + 1:]) for lo, hi, c in hits)
        if volume != rows * math.prod(rest):
            raise KeyError(f"{key}: rows [{row}, {row + rows}) at {lead} are not fully stored")
        def pick(lo, hi, c):
            if tuple(c.offsets) not in self._cache:
                with self.timer("read"):
                    self._cache[tuple(c.offsets)] = self.chunk(key, c)
            t = self._cache[tuple(c.offsets)][tuple(x - o for x, o in zip(lead, c.offsets))]
            return t.narrow(0, lo - c.offsets[d], hi - lo)

        if all(tuple(c.sizes[d + 1:]) == rest for _, _, c in hits):
            return [pick(lo, hi, c) for lo, hi, c in hits]
        out = torch.empty((rows,) + rest, dtype=self.dtype(key))
        for lo, hi, c in hits:
            dst = out.narrow(0, lo - row, hi - lo)
            for k in range(len(rest)):
                dst = dst.narrow(k + 1, c.offsets[d + 1 + k], c.sizes[d + 1 + k])
            src = pick(lo, hi, c)
            with self.timer("reshard"):
                dst.copy_(src)
        return [out]
