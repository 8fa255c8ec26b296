"""HF <-> Megatron-core checkpoint conversion for Llama-3, streaming, in one plain process.

import_hf:  HF safetensors (+ config, tokenizer) -> megatron torch_dist checkpoint for TP x PP
            (format: dist_format.py), + `agro_checkpoint.json` (source config, TP/PP, dtype,
            writer versions) + the HF side files under `hf_assets/` for the way back.
export_hf:  megatron checkpoint -> HF safetensors shards of bounded size + index + config.json +
            generation_config.json + tokenizer files.

Memory: import maps each TP chunk's rows of the shard files (zero-copy where the chunk is one
contiguous HF row range), writes the chunk and drops it before the next; row-parallel weights,
split along columns, are mapped once and cut for every TP rank. Export maps one logical weight's
stored chunks at a time and streams its HF tensors into the shard being written. Peak: about one
largest tensor, never the model.

Both write into a hidden temp directory beside the output and rename it into place at the end,
so an interrupted run never leaves a directory that looks like a finished checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from agro_megatron.models.llama import LlamaArch, padded_vocab_size, parse_dtype

from . import mapping
from .atomic import atomic_dir, remove_stale
from .dist_format import Chunk, DistCheckpointReader, none_object, write_chunks
from .errors import (BadArgumentError, CheckpointContentError, ConversionError, DtypeMismatchError,
                     IncompatibleCheckpointError, NotLlamaError, OutputExistsError, OutputWriteError,
                     ParallelLayoutError)
from .hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size, read_json
from .phases import NO_TIMER

META_NAME = "agro_checkpoint.json"
ASSETS_DIR = "hf_assets"
FORMAT = "agro-megatron/llama"
FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- validation -------------------------------------------------------------------------------
def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.exists():
        raise CheckpointContentError(f"{path} not found: --hf must be a Hugging Face checkpoint directory")
    config = read_json(path, "the model's config.json")
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise NotLlamaError(
            f"{hf_dir} holds a {config.get('model_type')!r} model ({archs}), not Llama: agro-megatron "
            "converts Llama-3.x checkpoints (model_type 'llama', LlamaForCausalLM) only")
    return config


_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size")


def parse_arch(config: dict, tp: int, pp: int) -> LlamaArch:
    for name, value in (("--tp", tp), ("--pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadArgumentError(f"{name} {value!r} is not a parallel size: use an integer >= 1")
    for key in _SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CheckpointContentError(f"config.json: {key} is {value!r}, not a positive integer: fix it or restore "
                                         "the checkpoint's original config.json")
    try:
        arch = LlamaArch.from_hf_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointContentError(f"config.json is not a valid Llama config ({type(e).__name__}: {e}): fix it "
                                     "or restore the checkpoint's original config.json") from None
    try:
        arch.check_parallel(tp, pp)
    except ValueError as e:
        raise ParallelLayoutError(str(e)) from None
    return arch


def _check_tensors(arch: LlamaArch, hf: HFCheckpoint) -> torch.dtype:
    """Every expected tensor present with its config shape; returns their (single) dtype."""
    dtypes = {}
    for w in mapping.weights(arch):
        for name, shape in mapping.hf_shapes(arch, w).items():
            if name not in hf:
                raise CheckpointContentError(f"tensor {name} is missing from {hf.path}: the weights do not "
                                             "match config.json (or a shard is incomplete)")
            if hf.shape(name) != shape:
                raise CheckpointContentError(f"{name} has shape {hf.shape(name)} but config.json implies {shape}: "
                                             "the config does not belong to these weights")
            dtypes.setdefault(hf.dtype(name), name)
    if len(dtypes) > 1:
        found = ", ".join(f"{d} (e.g. {n})" for d, n in dtypes.items())
        raise DtypeMismatchError(f"the checkpoint mixes dtypes: {found}; pass --dtype bf16 or --dtype fp32 "
                                 "to convert everything to one")
    return next(iter(dtypes))


def _declared_dtype(config: dict) -> torch.dtype | None:
    name = config.get("torch_dtype") or config.get("dtype")
    try:
        return parse_dtype(name) if name else None
    except ValueError:
        return None


# Written into every directory agro-convert creates: --overwrite replaces only directories holding
# it (or, from before it existed, an import's META_NAME), never anything else.
OUTPUT_MARKER = ".agro-convert-output"


def _is_our_output(out: Path) -> bool:
    return out.is_dir() and ((out / OUTPUT_MARKER).exists() or (out / META_NAME).exists())


def _check_output(out: Path, overwrite: bool, *sources: Path) -> None:
    o = out.resolve()
    for src in sources:
        s = src.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ConversionError(f"--out {out} contains, equals or lies inside the source {src} (with --overwrite "
                                  "replacing it would delete the source): choose a separate directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"output {out} already exists: choose another --out, or pass --overwrite "
                                    "to replace an earlier agro-convert output")
        if not _is_our_output(out):
            raise OutputExistsError(f"--overwrite replaces only an earlier agro-convert output (a directory holding "
                                    f"{OUTPUT_MARKER}), and {out} is not one; nothing was deleted: choose another "
                                    "--out, or remove it yourself")


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _check_writable(out: Path, need_bytes: int) -> None:
    """Before any work: `out`'s directory (its nearest existing ancestor, which atomic_dir's mkdir
    would write into) accepts a new entry, and its filesystem has room for `need_bytes`."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputWriteError(f"--out {out}: {parent} is not a directory; choose an --out under a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".agro-convert-probe-", dir=parent))
    except OSError as e:
        raise OutputWriteError(f"--out {out} cannot be written: creating an entry in {parent} failed "
                               f"({e.strerror or e}); choose a writable --out or fix the permissions") from None
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OutputWriteError(f"--out {out}: {os.strerror(errno.ENOSPC)}: the output needs {need_bytes / 2**20:.1f} "
                               f"MiB but {parent} has {free / 2**20:.1f} MiB free; free space or choose another --out")


@contextlib.contextmanager
def _output_dir(out: Path, overwrite: bool):
    """atomic_dir for a conversion's output (one process), marked as ours, re-checking just before
    the rename that `out` may be replaced: another process may have created it while we converted.

    A disk (or file-size limit) that fills up mid-write becomes an OutputWriteError that says so,
    after atomic_dir has removed the partial output; the source is only ever read."""
    try:
        with atomic_dir(out) as tmp:
            (Path(tmp) / OUTPUT_MARKER).touch()
            yield tmp
            _check_output(out.absolute(), overwrite)
    except OSError as e:
        code = e.errno if e.errno is not None else getattr(e.__cause__, "errno", None)
        if isinstance(e, ConversionError) or code not in _FULL:
            raise
        raise OutputWriteError(f"writing {out} failed: {os.strerror(code)}; the partial output was removed and the "
                               "source is untouched: free space (or raise the file-size limit) on that filesystem, "
                               "or choose another --out") from None


@contextlib.contextmanager
def _one_thread():
    """Copies here are small and memory-bound; with cores shared, OpenMP threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


# --- import -----------------------------------------------------------------------------------
class _ChunkReader:
    """Produces each TP chunk of each weight from the HF shards (see the module docstring).

    A chunk that is one contiguous row range of one HF tensor (most of them) is returned as a
    zero-copy view of the shard file; QKV (interleaved), vocabulary padding and column splits are
    assembled in a new tensor.
    """

    def __init__(self, arch: LlamaArch, hf: HFCheckpoint, tp: int, dtype: torch.dtype, timer=NO_TIMER):
        self.arch, self.hf, self.tp, self.dtype, self.timer = arch, hf, tp, dtype, timer
        self._whole: tuple[str, torch.Tensor] | None = None

    def chunk(self, w: mapping.Weight, p: mapping.Piece) -> torch.Tensor:
        out = self._columns(w, p) if p.dim == 1 else self._rows(w, p)
        if out.dtype != self.dtype:
            with self.timer("reshard"):
                out = out.to(self.dtype)
        return out.unsqueeze(0) if w.layer is not None else out

    def _columns(self, w: mapping.Weight, p: mapping.Piece) -> torch.Tensor:
        # row-parallel weight: columns of one HF tensor, mapped once for all TP ranks
        name = w.hf_names[0]
        if self._whole is None or self._whole[0] != name:
            self._whole = None
            with self.timer("read"):
                self._whole = (name, self.hf.view(name))
        whole = self._whole[1]
        if p.length == whole.shape[1]:
            return whole
        with self.timer("reshard"):
            return whole.narrow(1, p.start, p.length).contiguous()

    def _rows(self, w: mapping.Weight, p: mapping.Piece) -> torch.Tensor:
        self._whole = None
        parts = []
        for b in mapping.blocks(self.arch, w):
            lo, hi = max(b.row, p.start), min(b.row + b.rows, p.start + p.length)
            if lo < hi:
                parts.append((lo - p.start, b.hf_name, b.hf_row + lo - b.row, hi - lo))
        if len(parts) == 1 and parts[0][3] == p.length:  # one contiguous HF row range: no copy
            _, name, row, rows = parts[0]
            with self.timer("read"):
                return self.hf.view(name, row, rows)
        shape = list(mapping.full_shape(self.arch, w, self.tp))
        shape[0] = p.length
        out = torch.empty(shape, dtype=self.dtype)
        covered = 0
        for at, name, row, rows in parts:
            with self.timer("read"):
                src = self.hf.view(name, row, rows)
            with self.timer("reshard"):
                out[at:at + rows].copy_(src.reshape(out[at:at + rows].shape))
            del src
            covered += rows
        if covered < p.length:  # vocabulary padding rows
            with self.timer("reshard"):
                out[max(0, self.arch.vocab_size - p.start):].zero_()
        return out


def plan_chunks(arch: LlamaArch, tp: int, pp: int, dtype: torch.dtype, reader: _ChunkReader | None) -> list[Chunk]:
    """Every chunk megatron's GPTModel at TP x PP would save, grouped in one file per PP stage."""
    L, per_stage = arch.num_layers, arch.num_layers // pp
    chunks: list[Chunk] = []
    for w in mapping.weights(arch):
        if w.layer is not None:
            stage = w.layer // per_stage
        else:
            stage = 0 if w.kind == "embedding" else pp - 1
        fname = f"__{stage}_0.distcp"
        shape = mapping.full_shape(arch, w, tp)
        gshape = (L,) + shape if w.layer is not None else shape
        ranks = [0] if w.layout == mapping.REPLICATED else range(tp)
        for r in ranks:
            for p in mapping.tp_pieces(arch, w, tp, r):
                offsets, sizes = [0] * len(shape), list(shape)
                offsets[p.dim], sizes[p.dim] = p.start, p.length
                if w.layer is not None:
                    offsets, sizes = [w.layer] + offsets, [1] + sizes
                produce = (lambda w=w, p=p: reader.chunk(w, p)) if reader else None
                chunks.append(Chunk(w.ckpt_key, fname, produce, tuple(offsets), tuple(sizes), gshape, dtype))
        if w.kind == "fc2":  # last weight of a layer: its linears' extra states
            for key in mapping.EXTRA_STATE_KEYS:
                chunks.append(Chunk(f"{key}/shard_{w.layer}_{L}", fname, none_object))
    return chunks


def _copy_assets(hf_dir: Path, dest: Path) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight files of the top level."""
    dest.mkdir()
    copied = []
    for f in sorted(hf_dir.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
              dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = False,
              sync: bool = True, timer=None) -> Path:
    """Convert an HF Llama checkpoint into a megatron torch_dist checkpoint for TP x PP.

    dtype: weights' dtype in the checkpoint; default: the source's (which must agree with the
    config's torch_dtype). timer: a phases.PhaseTimer to fill with seconds per phase.
    Returns the output directory.
    """
    timer = timer or NO_TIMER
    start = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_hf_config(hf_dir)
    arch = parse_arch(config, tp, pp)
    _check_output(out_dir, overwrite, hf_dir)
    target = parse_dtype(dtype) if dtype is not None else None
    if target is not None and target not in _DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype} is not a floating weight dtype: use bf16 or fp32")
    with HFCheckpoint(hf_dir) as hf:
        src = _check_tensors(arch, hf)
        declared = _declared_dtype(config)
        if target is None:
            if declared is not None and declared != src:
                raise DtypeMismatchError(
                    f"config.json declares {declared} but the weights are {src}: pass --dtype "
                    f"{_DTYPE_NAMES.get(src, src)} to keep the weights as stored (or fix config.json)")
            if src not in _DTYPE_NAMES:
                raise DtypeMismatchError(f"weights are {src}: pass --dtype bf16 or fp32")
            target = src
        chunks = plan_chunks(arch, tp, pp, target, _ChunkReader(arch, hf, tp, target, timer))
        total = sum(c.nbytes for c in chunks)
        _check_writable(out_dir, total)
        timer.add("open", time.perf_counter() - start)
        with _output_dir(out_dir, overwrite) as tmp, _progress(total, "import", progress) as bar, _one_thread():
            write_chunks(tmp, chunks, sync=sync, on_chunk=bar.update, timer=timer)
            finish = time.perf_counter()
            assets = _copy_assets(hf_dir, tmp / ASSETS_DIR)
            write_metadata(tmp, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "tp": tp, "pp": pp,
                "dtype": _DTYPE_NAMES[target], "vocab_size": arch.vocab_size,
                "padded_vocab_size": padded_vocab_size(arch.vocab_size, tp),
                "hf_config": config, "arch": dataclasses.asdict(arch),
                "assets_dir": ASSETS_DIR, "assets": assets, "source": str(hf_dir.absolute()),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "writer": writer_info(),
            })
        timer.add("finish", time.perf_counter() - finish)
    return out_dir


# --- metadata ---------------------------------------------------------------------------------
def writer_info() -> dict:
    return {"megatron_core": _version("megatron-core"), "torch": torch.__version__,
            "agro_megatron": _version("agro-megatron"), "common_state": "common.pt"}


def write_metadata(ckpt_dir: Path, meta: dict) -> None:
    (Path(ckpt_dir) / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def read_metadata(ckpt_dir: str | os.PathLike) -> dict:
    """The checkpoint's metadata, after checking this installation can read the checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_NAME
    if not path.exists():
        raise CheckpointContentError(
            f"{ckpt_dir} has no {META_NAME}: not a checkpoint written by `agro-convert import` (or an "
            "interrupted one); convert the HF checkpoint with `agro-convert import --hf ... --out ...`")
    meta = read_json(path, f"the checkpoint's {META_NAME}")
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{ckpt_dir} has format {meta.get('format')} v{meta.get('format_version')}; this agro-megatron reads "
            f"{FORMAT} v<={FORMAT_VERSION}: upgrade agro-megatron")
    writer = (meta.get("writer") or {}).get("megatron_core")
    installed = _version("megatron-core")
    has_common = (ckpt_dir / "common.pt").exists()
    if (writer and installed and _minor(writer) > _minor(installed)) or not has_common:
        raise IncompatibleCheckpointError(
            f"{ckpt_dir} was written for megatron-core {writer or 'unknown'}"
            f"{'' if has_common else ' (no common.pt: megatron-core >= 0.19 keeps the common state inside the .distcp files)'}"
            f", which the installed megatron-core {installed} cannot read: re-import the HF checkpoint with "
            f"this installation (`agro-convert import`), or install megatron-core=={writer}")
    return meta


def checkpoint_arch(ckpt_dir: str | os.PathLike, meta: dict | None = None) -> LlamaArch:
    meta = meta or read_metadata(ckpt_dir)
    return LlamaArch.from_hf_config(meta["hf_config"])


# --- export -----------------------------------------------------------------------------------
def _check_stored(arch: LlamaArch, reader: DistCheckpointReader, w: mapping.Weight) -> None:
    shape = mapping.full_shape(arch, w, None)
    stored = reader.shape(w.ckpt_key)
    want = ((arch.num_layers,) if w.layer is not None else ()) + shape
    ok = len(stored) == len(want) and (tuple(stored) == want or (
        w.layout == mapping.VOCAB and stored[0] >= want[0] and tuple(stored[1:]) == want[1:]))
    if not ok:
        raise CheckpointContentError(f"{w.ckpt_key} has shape {stored} in the checkpoint; its config implies {want}")


def hf_parts(arch: LlamaArch, reader: DistCheckpointReader, w: mapping.Weight) -> dict[str, list[torch.Tensor]]:
    """HF tensors of `w`, each as row pieces (mostly zero-copy views of the checkpoint files)."""
    lead = (w.layer,) if w.layer is not None else ()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in w.hf_names}
    for b in mapping.blocks(arch, w):
        parts[b.hf_name] += reader.rows(w.ckpt_key, lead, b.row, b.rows)
    return parts


def export_hf(megatron_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
              overwrite: bool = False, progress: bool = False, sync: bool = True, timer=None) -> Path:
    """Convert a checkpoint written by `import_hf` (or saved from its models) back to HF format.

    timer: a phases.PhaseTimer to fill with seconds per phase."""
    timer = timer or NO_TIMER
    start = time.perf_counter()
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    parse_size(max_shard_size)  # a bad --max-shard-size fails before any work
    meta = read_metadata(megatron_dir)
    _check_output(out_dir, overwrite, megatron_dir)
    arch = checkpoint_arch(megatron_dir, meta)
    reader = DistCheckpointReader(megatron_dir, timer)
    ws = mapping.weights(arch)
    missing = [w.ckpt_key for w in ws if w.ckpt_key not in reader.metadata.state_dict_metadata]
    if missing:
        raise CheckpointContentError(f"{megatron_dir} lacks {sorted(set(missing))}: incomplete checkpoint")
    dtype = reader.dtype(ws[0].ckpt_key)
    entries = [(n, s, dtype) for w in ws for n, s in mapping.hf_shapes(arch, w).items()]
    for w in ws:
        _check_stored(arch, reader, w)
    _check_writable(out_dir, sum(math.prod(s) * d.itemsize for _, s, d in entries))
    with _output_dir(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, entries, max_shard_size, sync=sync, timer=timer)
        timer.add("open", time.perf_counter() - start)
        with _progress(writer.total_size, "export", progress) as bar, _one_thread():
            for w in ws:
                by_name = hf_parts(arch, reader, w)
                for name in w.hf_names:
                    parts = by_name.pop(name)  # drop each tensor's maps once written
                    writer.write(name, parts)
                    bar.update(sum(p.nbytes for p in parts))
        writer.close()  # its last fsync is timed as "fsync"
        finish = time.perf_counter()
        _write_hf_side_files(megatron_dir, meta, tmp, dtype)
    timer.add("finish", time.perf_counter() - finish)
    return out_dir


def _write_hf_side_files(megatron_dir: Path, meta: dict, dest: Path, dtype: torch.dtype) -> None:
    assets = megatron_dir / meta.get("assets_dir", ASSETS_DIR)
    for name in meta.get("assets", []):
        if name != "config.json" and (assets / name).exists():
            shutil.copy2(assets / name, dest / name)
    config = dict(meta["hf_config"])
    dtype_name = str(dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = dtype_name
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (dest / "generation_config.json").exists():
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# --- trained policies -------------------------------------------------------------------------
def save_trained_model(model, out_dir: str | os.PathLike, *, arch: LlamaArch, tp: int, pp: int, dtype: str,
                       assets_from: str | os.PathLike | None, source_meta: dict | None = None) -> Path:
    """Save a live (sharded) policy as a checkpoint in this module's format, so that
    `agro-convert export` turns it into an HF folder and `load_converted_checkpoint` reloads it at any TP x PP.

    Collective over all ranks (megatron's dist_checkpointing.save); rank 0 writes the metadata and
    copies the tokenizer/side files from `assets_from`. Written to a temp dir and renamed
    (atomic_dir, collectively).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        remove_stale(out_dir.absolute().parent, out_dir.name)  # an interrupted earlier save's
    with atomic_dir(out_dir, collective=True) as tmp:
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        if rank0:
            assets: list[str] = []
            if assets_from and Path(assets_from).is_dir():
                assets = _copy_assets(Path(assets_from), tmp / ASSETS_DIR)
            config = dict((source_meta or {}).get("hf_config") or arch.to_hf_config())
            config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
            write_metadata(tmp, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "tp": tp, "pp": pp,
                "dtype": _DTYPE_NAMES[parse_dtype(dtype)], "vocab_size": arch.vocab_size,
                "padded_vocab_size": padded_vocab_size(arch.vocab_size, tp), "hf_config": config,
                "arch": dataclasses.asdict(arch), "assets_dir": ASSETS_DIR, "assets": assets,
                "source": (source_meta or {}).get("source", "trained by agro-train"),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "writer": writer_info(),
            })
    return out_dir
