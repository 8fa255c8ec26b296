"""Stream HF-named full tensors out of a live TP x PP sharded Megatron model, bucket by bucket.

Why: an inference engine (vLLM) loads HF checkpoints; after every optimizer step it needs the
policy's new weights under HF names and layouts. Writing a checkpoint is too slow and gathering
the whole model on one rank does not fit, so each logical weight is assembled just in time:

* TP: the owning stage's TP ranks all-gather their shards and `checkpoint.mapping.unshard`
  rebuilds the full tensor; `mapping.megatron_to_hf` cuts it into HF tensors (QKV
  de-interleaved, gate/up split, vocabulary padding dropped). Nothing here knows those layouts.
* PP: the stage that owns a weight broadcasts each HF tensor over its PP group, so every rank
  of the model-parallel group receives every tensor (each vLLM rank loads full HF tensors and
  shards them itself).
* Buckets: consecutive weights are grouped into buckets of at most `bucket_bytes`; only the
  current bucket (plus one gathered weight) is alive on a rank at a time, never the model.
  A logical weight is never split across buckets: vLLM must see all tensors of a fused layer
  (q/k/v, gate/up) in one load call. The bucket plan depends only on the architecture and
  dtype, so every rank agrees on it without communicating.

Collective: every rank of the model-parallel group must iterate the same stream to the end
(DP replicas hold the same weights and stream independently). Tensors may alias the live
parameters when no gather or cast is needed: consume (copy) them, never modify them.
With megatron's distributed optimizer and `overlap_param_gather`, finish the parameter
all-gather before streaming (the trainer here does not overlap it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from agro_megatron.checkpoint import mapping
from agro_megatron.models import unwrap_model
from agro_megatron.models.llama import LlamaArch

DEFAULT_BUCKET_BYTES = 1 << 30  # 1 GiB: holds Llama-3-8B's 128256 x 4096 bf16 embedding (1.05 GB)
Bucket = list[tuple[str, torch.Tensor]]


def weight_nbytes(arch: LlamaArch, w: mapping.Weight, dtype: torch.dtype) -> int:
    """Bytes of all HF tensors of logical weight `w` in `dtype` (vocabulary unpadded)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in mapping.hf_shapes(arch, w).values():
        n = 1
        for s in shape:
            n *= s
        total += n * size
    return total


def plan_buckets(arch: LlamaArch, dtype: torch.dtype,
                 bucket_bytes: int | None = None) -> list[list[mapping.Weight]]:
    """Consecutive logical weights (HF checkpoint order) grouped into buckets of <= bucket_bytes.

    None: the default (1 GiB, raised to the largest weight when that is bigger). An explicit size
    smaller than the largest weight is an error, because a weight cannot be split.
    """
    ws = mapping.weights(arch)
    sizes = [weight_nbytes(arch, w, dtype) for w in ws]
    largest = max(sizes)
    if bucket_bytes is None:
        bucket_bytes = max(DEFAULT_BUCKET_BYTES, largest)
    elif bucket_bytes < largest:
        big = ws[sizes.index(largest)]
        raise ValueError(
            f"bucket_bytes={bucket_bytes} is smaller than the largest weight ({big.hf_names[0]}"
            f"{' + fused' if len(big.hf_names) > 1 else ''}: {largest} bytes in {dtype}); "
            f"use bucket_bytes >= {largest} (a weight is never split across buckets)")
    buckets: list[list[mapping.Weight]] = []
    used = bucket_bytes + 1
    for w, n in zip(ws, sizes):
        if used + n > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(w)
        used += n
    return buckets


@dataclasses.dataclass
class _Topology:
    tp: int
    tp_group: Any
    pp: int
    pp_rank: int
    pp_group: Any


def _topology() -> _Topology:
    from megatron.core import parallel_state as ps

    return _Topology(
        tp=ps.get_tensor_model_parallel_world_size(), tp_group=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group())


def _layer_offset(gpt) -> int:
    """Global index of this model chunk's first transformer layer (its PP / VPP offset)."""
    layers = getattr(getattr(gpt, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1  # megatron's layer_number is global and 1-based


def local_weights(model, arch: LlamaArch) -> dict[mapping.Weight, torch.Tensor]:
    """This rank's parameter (its TP shard) of every logical weight its PP stage owns.

    `model`: a GPTModel, a wrapped one (DDP, Float16Module) or a list of virtual-PP chunks.
    The last stage's tied copy of the embedding is not a weight of its own (HF has none).
    """
    wanted = set(mapping.weights(arch))
    out: dict[mapping.Weight, torch.Tensor] = {}
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        gpt = unwrap_model(chunk)
        offset = _layer_offset(gpt)
        for name, param in gpt.named_parameters():
            w = mapping.parse_megatron_name(name, offset)
            if w is None:
                raise ValueError(f"parameter {name!r} is not in checkpoint/mapping.py's table: "
                                 "is this a Llama GPTModel built by models/llama.py?")
            if w in wanted:
                out[w] = param
    return out


def _owners(local: dict, arch: LlamaArch, topo: _Topology) -> dict[mapping.Weight, int]:
    """PP stage owning each logical weight (one small all-gather of names over the PP group)."""
    mine = sorted((w.kind, -1 if w.layer is None else w.layer) for w in local)
    if topo.pp > 1:
        stages: list = [None] * topo.pp
        dist.all_gather_object(stages, mine, group=topo.pp_group)
    else:
        stages = [mine]
    owner: dict[mapping.Weight, int] = {}
    for stage, keys in enumerate(stages):
        for kind, layer in keys:
            owner[mapping.Weight(kind, None if layer < 0 else layer)] = stage
    missing = [w for w in mapping.weights(arch) if w not in owner]
    if missing:
        raise ValueError(f"no pipeline stage holds {[w.hf_names[0] for w in missing[:4]]}: the model was not "
                         "built for this architecture (layers / tie_word_embeddings differ)")
    return owner


def _full(arch: LlamaArch, w: mapping.Weight, local: torch.Tensor, topo: _Topology) -> torch.Tensor:
    """The full megatron tensor of `w` on every TP rank of the owning stage."""
    local = local.detach()
    if topo.tp == 1 or w.layout == mapping.REPLICATED:
        return local
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(topo.tp)]
    dist.all_gather(shards, local, group=topo.tp_group)
    return mapping.unshard(arch, w, shards)


def iter_hf_buckets(model, arch: LlamaArch, *, bucket_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> Iterator[Bucket]:
    """Yield buckets [(hf_name, full tensor), ...] covering the whole model, on every rank.

    dtype: the tensors' dtype (default: the model's). Collective over the model-parallel group.
    """
    topo = _topology()
    local = local_weights(model, arch)
    if not local:
        raise ValueError("the model has no parameters mapping.py knows on this rank")
    some = next(iter(local.values()))
    dtype = dtype or some.dtype
    device = some.device
    owner = _owners(local, arch, topo)
    for weights in plan_buckets(arch, dtype, bucket_bytes):
        bucket: Bucket = []
        for w in weights:
            stage = owner[w]
            hf: dict[str, torch.Tensor] = {}
            if stage == topo.pp_rank:
                full = _full(arch, w, local[w], topo)
                hf = {n: t.to(dtype).contiguous() for n, t in mapping.megatron_to_hf(arch, w, full).items()}
                del full
            if topo.pp > 1:
                src = dist.get_global_rank(topo.pp_group, stage)
                for name, shape in mapping.hf_shapes(arch, w).items():
                    if name not in hf:
                        hf[name] = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(hf[name], src=src, group=topo.pp_group)
            bucket += [(n, hf[n]) for n in w.hf_names]
        yield bucket


def iter_hf_weights(model, arch: LlamaArch, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """The same stream, flattened to (hf_name, tensor) pairs."""
    for bucket in iter_hf_buckets(model, arch, **kwargs):
        yield from bucket


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Bytes held by one bucket's tensors."""
    return sum(t.numel() * t.element_size() for _, t in bucket)
