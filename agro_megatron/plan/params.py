"""Exact per-rank parameter, gradient and optimizer-state sizes of the megatron-core policy.

This is the part of the plan that is not an estimate: it mirrors what megatron-core 0.16 allocates
and is checked against live objects on CPU (tests/test_plan_megatron.py).

- `rank_params` lists one rank's parameters in `named_parameters()` order, with the TP split of
  each weight and the vocabulary padded as `models.llama.padded_vocab_size` pads it.
- `ddp_buffers` reproduces `distributed.param_and_grad_buffer._ParamAndGradBuffer`: one buffer
  per (param dtype, grad dtype), parameters laid out in reverse order; with the distributed
  optimizer every parameter starts at a multiple of 64 elements and every bucket is padded to a
  multiple of lcm(DP*CP, 128) (lcm with 2**16 too when `pad_buckets_for_high_nccl_busbw`).
- `rank_state` turns that into bytes. Adam keeps two fp32 moments per element it updates; 16-bit
  parameters also get an fp32 master copy. With the distributed optimizer a DP rank updates only
  its 1/(DP*CP) slice of each bucket (the parameters' intersection with it; padding has no state)
  and the model's params live in the padded param buffer.
"""
from __future__ import annotations

import bisect
import dataclasses
import math

from agro_megatron.models.llama import LlamaArch, padded_vocab_size


@dataclasses.dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    nbytes_per: int                 # bytes per element of the parameter
    shared_embedding: bool = False  # tied embedding copy (PP > 1): megatron gives it its own bucket


def rank_params(arch: LlamaArch, tp: int, pp: int, pp_rank: int, *, dtype_bytes: int = 2,
                spec: str = "te") -> list[ParamTensor]:
    """This rank's parameters in megatron's order (all TP ranks of a stage hold the same sizes).

    spec="local": megatron's local layer spec as built on CPU here: separate `torch.nn.RMSNorm`
    modules; megatron creates them in fp32, and models/llama.py:build_model casts them to
    params_dtype (as Megatron-LM's Float16Module does), so the sizes equal TE's.
    spec="te": TransformerEngine (the GPU default): the RMSNorm weights are fused into linear_qkv /
    linear_fc1 as `layer_norm_weight`, in params_dtype. Their position in the order is assumed
    (it only moves the distributed optimizer's 64-element alignment padding; unvalidated on CPU).
    """
    if spec not in ("te", "local"):
        raise ValueError(f"spec={spec!r}: use 'te' (TransformerEngine, GPU) or 'local' (megatron's torch spec)")
    arch.check_parallel(tp, pp)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} is outside 0..{pp - 1}")
    h, hd = arch.hidden_size, arch.head_dim
    vp = padded_vocab_size(arch.vocab_size, tp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = arch.tie_word_embeddings
    out: list[ParamTensor] = []

    def add(name, numel, nbytes=dtype_bytes, shared=False):
        out.append(ParamTensor(name, int(numel), nbytes, shared))

    if first:
        add("embedding.word_embeddings.weight", vp // tp * h, shared=tied and pp > 1)
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * hd // tp * h
    proj = h * arch.num_heads * hd // tp
    ffn = arch.intermediate_size // tp
    for i in range(arch.num_layers // pp):
        p = f"decoder.layers.{i}."
        if spec == "local":
            add(p + "input_layernorm.weight", h)
            add(p + "self_attention.linear_proj.weight", proj)
            add(p + "self_attention.linear_qkv.weight", qkv)
            add(p + "pre_mlp_layernorm.weight", h)
        else:
            add(p + "self_attention.linear_proj.weight", proj)
            add(p + "self_attention.linear_qkv.layer_norm_weight", h)
            add(p + "self_attention.linear_qkv.weight", qkv)
            add(p + "mlp.linear_fc1.layer_norm_weight", h)
        add(p + "mlp.linear_fc1.weight", 2 * ffn * h)
        add(p + "mlp.linear_fc2.weight", h * ffn)
    if last:
        add("decoder.final_layernorm.weight", h)
        if not tied:
            add("output_layer.weight", vp // tp * h)
        elif pp > 1:  # the last stage keeps its own copy of the tied embedding
            add("output_layer.weight", vp // tp * h, shared=True)
    return out


def total_params_over_ranks(arch: LlamaArch, tp: int, pp: int, spec: str = "te") -> int:
    """Sum of every model-parallel rank's parameter elements (one DP replica)."""
    return sum(p.numel for r in range(pp) for p in rank_params(arch, tp, pp, r, spec=spec)) * tp


def padding_overhead(arch: LlamaArch, tp: int, pp: int) -> int:
    """Elements a TP x PP replica holds beyond the HF model: padded vocabulary rows, the tied copy,
    and the final-norm / norm weights that TP replicates on every rank."""
    h, L = arch.hidden_size, arch.num_layers
    extra_vocab = (padded_vocab_size(arch.vocab_size, tp) - arch.vocab_size) * h
    mats = 1 if arch.tie_word_embeddings else 2
    tied_copy = padded_vocab_size(arch.vocab_size, tp) * h if (arch.tie_word_embeddings and pp > 1) else 0
    norms = (2 * L + 1) * h * (tp - 1)
    return extra_vocab * mats + tied_copy + norms


# ------------------------------------------------------------------------------------------------
# DDP grad buffers (distributed/param_and_grad_buffer.py) and distributed-optimizer shards
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Buffer:
    param_bytes: int
    grad_bytes: int
    spans: list            # (ParamTensor, start, end) in buffer order
    buckets: list          # (start, end), padded
    numel: int
    numel_unpadded: int

    def owned_numel(self, dp_rank: int, dp: int) -> int:
        """Parameter elements in DP rank `dp_rank`'s 1/dp slice of every bucket (dist. optimizer)."""
        starts = [s for _, s, _ in self.spans]  # increasing
        cum = [0]
        for _, s, e in self.spans:
            cum.append(cum[-1] + e - s)
        total = 0
        for b0, b1 in self.buckets:
            size = (b1 - b0) // dp
            total += _covered(self.spans, starts, cum, b0 + dp_rank * size, b0 + (dp_rank + 1) * size)
        return total


def _covered(spans, starts, cum, a: int, b: int) -> int:
    """Elements of [a, b) that lie inside a parameter (spans are disjoint and sorted)."""
    if b <= a:
        return 0

    def upto(x):  # parameter elements below position x
        i = bisect.bisect_right(starts, x) - 1
        if i < 0:
            return 0
        _, s, e = spans[i]
        return cum[i] + min(x, e) - s

    return upto(b) - upto(a)


def ddp_buffers(params: list[ParamTensor], dp: int, *, distributed_optimizer: bool,
                grad_reduce_in_fp32: bool, bucket_size: int | None = None,
                pad_for_high_nccl_busbw: bool = False) -> list[Buffer]:
    """megatron's buffers for these params. `dp` is the DP x CP group the buffer is reduced over.

    bucket_size: None = one bucket (megatron's choice when overlap_grad_reduce is off, and on PP
    stages > 0); with overlap it is max(40M, 1M * dp) unless configured.
    """
    groups: dict[tuple[int, int], list[ParamTensor]] = {}
    for p in params:
        gbytes = 4 if grad_reduce_in_fp32 else p.nbytes_per
        groups.setdefault((p.nbytes_per, gbytes), []).append(p)
    divisor = math.lcm(dp, 128, 2 ** 16) if pad_for_high_nccl_busbw else math.lcm(dp, 128)

    def pad(x, d):
        return -(-x // d) * d

    out = []
    for (pbytes, gbytes), plist in groups.items():
        spans, buckets, unpadded = [], [], 0
        start = bucket_start = 0
        in_bucket = 0
        end = 0

        def close(end_index):
            nonlocal bucket_start, in_bucket, unpadded
            unpadded += end_index - bucket_start
            padded = pad(end_index, divisor) if distributed_optimizer else end_index
            buckets.append((bucket_start, padded))
            bucket_start, in_bucket = padded, 0
            return padded

        for p in reversed(plist):
            if distributed_optimizer:
                start = pad(start, 64)
            new_bucket = p.shared_embedding and distributed_optimizer
            if new_bucket and in_bucket:
                start = close(start)
            end = start + p.numel
            spans.append((p, start, end))
            in_bucket += 1
            if (bucket_size is not None and end - bucket_start >= bucket_size) or new_bucket:
                start = close(end)
            else:
                start = end
        if in_bucket:
            close(end)
        numel = buckets[-1][1] if buckets else 0
        out.append(Buffer(pbytes, gbytes, spans, buckets, numel, unpadded))
    return out


@dataclasses.dataclass(frozen=True)
class RankState:
    """Bytes one GPU holds for the trainable policy (what megatron allocates)."""

    params_numel: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int       # fp32 master copies + Adam exp_avg + exp_avg_sq
    optimizer_numel: int       # elements this rank's optimizer updates

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rank_state(params: list[ParamTensor], dp: int, dp_rank: int = 0, *, distributed_optimizer: bool,
               grad_reduce_in_fp32: bool, bucket_size: int | None = None,
               pad_for_high_nccl_busbw: bool = False) -> RankState:
    """Parameter / gradient / optimizer bytes on DP rank `dp_rank` of a DP (x CP) group of size `dp`.

    Adam (megatron's Float16OptimizerWithFloat16Params / DistributedOptimizer / FP32Optimizer):
    per updated element 4 B exp_avg + 4 B exp_avg_sq, + 4 B fp32 master copy if the model param is
    16-bit (an fp32 model param is updated in place, no copy).
    """
    bufs = ddp_buffers(params, dp, distributed_optimizer=distributed_optimizer,
                       grad_reduce_in_fp32=grad_reduce_in_fp32, bucket_size=bucket_size,
                       pad_for_high_nccl_busbw=pad_for_high_nccl_busbw)
    grad_bytes = sum(b.numel * b.grad_bytes for b in bufs)
    if distributed_optimizer:
        param_bytes = sum(b.numel * b.param_bytes for b in bufs)  # params become views of this buffer
        owned = [(b.owned_numel(dp_rank, dp), b.param_bytes) for b in bufs]
    else:
        param_bytes = sum(p.numel * p.nbytes_per for p in params)
        owned = [(p.numel, p.nbytes_per) for p in params]
    opt = sum(n * (8 + (4 if nb < 4 else 0)) for n, nb in owned)
    return RankState(sum(p.numel for p in params), param_bytes, grad_bytes, opt, sum(n for n, _ in owned))


def default_bucket_size(dp: int, pp_rank: int, overlap_grad_reduce: bool) -> int | None:
    """megatron's DDP default: one bucket without overlap or on PP stages > 0, else max(40M, 1M*dp)."""
    if not overlap_grad_reduce or pp_rank > 0:
        return None
    return max(40_000_000, 1_000_000 * dp)
