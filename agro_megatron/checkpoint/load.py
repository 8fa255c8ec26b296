"""Load an imported checkpoint into a live GPTModel at any TP x PP (resharding on the fly).

The model's own `sharded_state_dict()` says which global chunks this rank needs; megatron's
`dist_checkpointing.load` reads exactly those overlaps from the DCP files, so a checkpoint
written for TP=2 x PP=1 loads at TP=1 x PP=2 or any other split.

Vocabulary padding differs between TP sizes (Vp = multiple of 128 x TP). megatron marks the
embedding / output ShardedTensors `allow_shape_mismatch`, zero-fills them, and reads the rows
the checkpoint has; rows the checkpoint lacks stay zero. After loading we zero every row >= V
explicitly, so padding is zero at any TP whatever the checkpoint's own padding held.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from agro_megatron.models import unwrap_model
from agro_megatron.models.llama import LlamaArch, parse_dtype

from .convert import checkpoint_arch, read_metadata
from .dist_format import DistCheckpointReader
from .errors import CheckpointContentError, DtypeMismatchError


def _check_model(model, arch: LlamaArch, meta: dict, allow_cast: bool) -> None:
    cfg = model.config
    pairs = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
             "ffn_hidden_size": arch.intermediate_size, "num_attention_heads": arch.num_heads,
             "num_query_groups": arch.num_kv_heads, "kv_channels": arch.head_dim}
    bad = {k: (getattr(cfg, k, None), v) for k, v in pairs.items() if getattr(cfg, k, None) != v}
    if bad:
        raise CheckpointContentError(
            "the model does not have the checkpoint's architecture (model, checkpoint): "
            f"{bad}; build it from the checkpoint's config (load.checkpoint_arch(dir))")
    if getattr(model, "share_embeddings_and_output_weights", arch.tie_word_embeddings) != arch.tie_word_embeddings:
        raise CheckpointContentError(f"tie_word_embeddings differs: checkpoint has {arch.tie_word_embeddings}")
    stored = parse_dtype(meta["dtype"])
    params = list(model.parameters())
    if params and params[0].dtype != stored and not allow_cast:
        raise DtypeMismatchError(
            f"the checkpoint holds {stored} weights but the model was built with {params[0].dtype}: build the "
            f"model with dtype={meta['dtype']!r}, or pass allow_cast=True to cast while loading")


def _drop_absent_objects(sd, present: set[str]):
    """Remove ShardedObjects (e.g. TE's attention `_extra_state`) that the checkpoint lacks."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if isinstance(sd, dict):
        return {k: _drop_absent_objects(v, present) for k, v in sd.items()
                if not (isinstance(v, ShardedObject) and v.unique_key not in present)}
    return sd


@torch.no_grad()
def _zero_vocab_padding(model, arch: LlamaArch) -> None:
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    for module_name in ("embedding", "output_layer"):
        mod = getattr(model, module_name, None)
        weight = getattr(getattr(mod, "word_embeddings", mod), "weight", None)
        if weight is None:
            continue
        rows = weight.shape[0]
        start = rank * rows
        first_pad = max(0, arch.vocab_size - start)
        if first_pad < rows:
            weight[first_pad:].zero_()


def load_converted_checkpoint(ckpt_dir: str | os.PathLike, model, *, allow_cast: bool = False) -> dict:
    """Load `ckpt_dir` into `model` (this rank's GPTModel, parallel state initialised).

    Returns the checkpoint's metadata. Raises IncompatibleCheckpointError for checkpoints of
    another megatron-core format family, DtypeMismatchError when the model's dtype differs
    (unless allow_cast), CheckpointContentError for a different architecture.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    arch = checkpoint_arch(ckpt_dir, meta)
    model = unwrap_model(model)  # DDP / Float16Module share the GPTModel's parameters
    _check_model(model, arch, meta, allow_cast)
    present = set(DistCheckpointReader(ckpt_dir).keys())
    sharded = _drop_absent_objects(model.sharded_state_dict(), present)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointContentError(f"loading left missing={missing[:5]} unexpected={list(unexpected)[:5]}")
    _zero_vocab_padding(model, arch)
    return meta


def build_and_load(ckpt_dir: str | os.PathLike, *, dtype: str | torch.dtype | None = None, **build_kwargs):
    """Build this rank's GPTModel for the checkpoint's architecture and load it; returns (model, arch).

    dtype: defaults to the checkpoint's; another dtype casts while loading.
    """
    from agro_megatron.models.llama import build_model

    meta = read_metadata(ckpt_dir)
    arch = checkpoint_arch(ckpt_dir, meta)
    model = build_model(arch, dtype=dtype or meta["dtype"], **build_kwargs)
    load_converted_checkpoint(ckpt_dir, model, allow_cast=dtype is not None)
    return model, arch
