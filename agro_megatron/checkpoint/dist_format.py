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
    (`{"sharded_backend": "torch_dist", ...}`): megatron-core <= 0.18 reads these; 0.19 keeps the
    common state inside the DCP files, so checkpoints of the two families do not interchange.

Why DCP directly and not `dist_checkpointing.save`: that call needs every rank's tensors in
memory at once (one process per rank, or all shards in one process). DCP's planner API lets one
process describe every chunk of every (virtual) rank up front - the global `.metadata` is exact -
while the storage writer below asks for each chunk's data only when it writes it, so one chunk is
in memory at a time. Resharding at load time is DCP's: any TP x PP reads the overlaps it needs.

The two torch internals used are `_StorageInfo` (DCP's per-chunk file location record) and the
plain `torch.save` serialization of each chunk that `FileSystemReader` expects.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

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
            if not data.is_contiguous() or data.untyped_storage().nbytes() != data.nbytes:
                data = data.clone()  # torch.save writes whole storages: keep only this chunk's bytes
        return data


class _StreamingWriter(FileSystemWriter):
    """Writes each planned chunk to its file as soon as its data is produced (one in memory)."""

    def __init__(self, path, file_of: dict, on_chunk: Callable[[int], None] | None = None, sync: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=sync, thread_count=1, overwrite=True)
        self._file_of = file_of
        self._on_chunk = on_chunk

    def write_data(self, plan: SavePlan, planner) -> Future:
        by_file: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            by_file.setdefault(self._file_of[item.index], []).append(item)
        results = []
        for fname, items in by_file.items():
            with open(os.path.join(self.path, fname), "wb") as f:
                for item in items:
                    data = planner.resolve_data(item)
                    offset = f.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        f.write(data.getbuffer())
                        nbytes = 0
                    else:
                        torch.save(data, f)
                        nbytes = data.nbytes
                    length = f.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(fname, offset, length)))
                    del data
                    if self._on_chunk:
                        self._on_chunk(nbytes)
                f.flush()
                if self.sync_files:
                    os.fsync(f.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


def write_chunks(path: str | os.PathLike, chunks: Sequence[Chunk], *, sync: bool = True,
                 on_chunk: Callable[[int], None] | None = None) -> None:
    """Write one DCP checkpoint made of `chunks` (in order, one file per distinct `Chunk.file`),
    plus megatron's common.pt and metadata.json."""
    import json

    file_of = {c.write_item().index: c.file for c in chunks}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save({}, storage_writer=_StreamingWriter(path, file_of, on_chunk, sync),
                 planner=_LazyPlanner(chunks), no_dist=True)
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
class _RegionPlanner(LoadPlanner):
    """Loads rectangular regions of global tensors into caller-provided tensors."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.regions.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(key)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise RuntimeError(f"unexpected bytes entry {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        t = self.regions[read_item.dest_index.fqn][1]
        for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, off, n)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # read in place into the region tensor


class _CachedReader(FileSystemReader):
    def __init__(self, path):
        super().__init__(path)
        self._md = None

    def read_metadata(self, *args, **kwargs):
        if self._md is None:
            self._md = super().read_metadata(*args, **kwargs)
        return self._md


class DistCheckpointReader:
    """Reads regions of the global tensors of a torch_dist checkpoint in one process."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = _CachedReader(self.path)
        self.metadata = self._reader.read_metadata()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def keys(self) -> Iterable[str]:
        return self.metadata.state_dict_metadata.keys()

    def read(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{key: (offsets, sizes)} -> {key: tensor of that region} in one pass over the files."""
        dests = {k: (tuple(off), torch.empty(tuple(size), dtype=dtype or self.dtype(k)))
                 for k, (off, size) in regions.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.load({}, storage_reader=self._reader, planner=_RegionPlanner(dests), no_dist=True)
        return {k: t for k, (_, t) in dests.items()}
