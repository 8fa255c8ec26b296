"""Context parallelism (CP): the sequence layout across CP ranks and the collectives over it.

Layout (megatron-core's, so that its RoPE slicing `get_pos_emb_on_this_cp_rank` and TE's CP
attention agree with ours): a sequence of length L is cut into 2*cp equal chunks and CP rank r
holds chunks r and 2*cp-1-r. Under causal attention the late chunks cost more than the early
ones; pairing an early with a late chunk gives every rank the same amount of attention work.

What crosses the CP group, and why it stays small:
* attention (models/attention.py, when TransformerEngine is absent): each rank all-gathers
  the keys and values of its layer: [L, b, kv_heads/tp, head_dim], small under Llama-3's
  grouped-query attention (8 KV heads). This is the all-gather CP of the Llama-3 paper. Its
  backward sums the key/value gradients over the group and keeps this rank's rows.
* per-position statistics (log-probs, KL, entropy: [b, L] floats, never the vocabulary) are
  gathered so the trainer sees whole sequences (per-sequence log-ratio sums and advantages);
* the loss is a sum over tokens, so CP ranks' partial losses simply add up, and megatron's
  schedule and DDP already scale and reduce gradients over the DP x CP group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def cp_size_and_rank() -> tuple[int, int]:
    """(CP world size, this rank's CP rank); (1, 0) without megatron's parallel state."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return 1, 0
    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()


def check_divisible(length: int, cp_size: int) -> None:
    if length % (2 * cp_size):
        raise ValueError(f"context parallelism cuts sequences into 2*cp={2 * cp_size} chunks; length {length} "
                         f"is not a multiple: pad to a multiple of {2 * cp_size}")


def local_positions(length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions [length/cp] of the rows CP rank `cp_rank` holds of a length-`length` sequence."""
    check_divisible(length, cp_size)
    c = length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def split_sequence(t: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's rows of `t` along the sequence dimension `dim`."""
    if cp_size == 1:
        return t
    idx = local_positions(t.shape[dim], cp_size, cp_rank, device=t.device)
    return t.index_select(dim, idx)


def gather_sequence(local: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Inverse of `split_sequence` (no autograd): every CP rank's rows, in global order."""
    world = dist.get_world_size(group)
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    length = local.shape[dim] * world
    out = torch.empty(*local.shape[:dim], length, *local.shape[dim + 1:], dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out.index_copy_(dim, local_positions(length, world, r, device=local.device), part)
    return out


def _reduce_scatter_rows(full: torch.Tensor, world: int, rank: int, group) -> torch.Tensor:
    """Sum `full` [world * s, ...] (rank-ordered blocks) over the group; return this rank's block."""
    s = full.shape[0] // world
    if full.is_cuda:  # NCCL serves CUDA tensors (platform.distributed_backend) and has reduce-scatter
        out = torch.empty_like(full[:s])
        dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
        return out
    full = full.contiguous()
    dist.all_reduce(full, group=group)  # gloo has no reduce-scatter
    return full[rank * s:(rank + 1) * s].clone()


class _AllGatherRows(torch.autograd.Function):
    """[s, ...] per rank -> [world * s, ...] in rank order; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        return _reduce_scatter_rows(grad, dist.get_world_size(group), dist.get_rank(group), group), None


def all_gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Every CP rank's rows of `x` ([s_local, ...], sequence first) concatenated in rank order,
    differentiably, and the global position of each gathered row."""
    world = dist.get_world_size(group)
    length = x.shape[0] * world
    positions = torch.cat([local_positions(length, world, r, device=x.device) for r in range(world)])
    return _AllGatherRows.apply(x, group), positions


def gather_strided_objects(mine: list, group) -> list:
    """Rank r of `group` holds items r, r+W, r+2W, ... of a list; every rank gets the whole list.

    Used to share rollouts: CP ranks hold the same weights, so each samples a 1/cp share of its
    data-parallel rank's prompts and the shares are exchanged (a few KB of token ids)."""
    world = dist.get_world_size(group)
    if world == 1:
        return list(mine)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(mine), group=group)
    out = []
    for k in range(max(len(p) for p in parts)):
        out.extend(p[k] for p in parts if k < len(p))
    return out
