"""The attention core of the local (no TransformerEngine) layer spec: torch SDPA, context parallel.

Why not megatron-core's local `DotProductAttention`:
* it refuses context_parallel_size > 1 ("only supported by TEDotProductAttention");
* it materialises the [b, heads, s, s] scores in fp32 and repeats K/V over the query heads. At
  4096 tokens it took 8.8x the peak memory and 6.4x the time of this core on CPU
  (benchmarks/context_parallel.py: megatron_cp1 vs sdpa_cp1).
This core is a drop-in `core_attention`, with megatron's constructor and forward signatures and
no parameters, so checkpoints do not change. It runs torch's scaled_dot_product_attention with
grouped-query heads (no K/V copies). At CP=1 it is plain causal attention, which can use
flash/memory-efficient kernels. At CP > 1 queries stay local, keys and values are all-gathered
over the CP group (ops/context_parallel.py), and each local chunk of queries attends to the key
prefix that ends at that chunk, with a causal mask from global positions that all layers share.
With TE present the TE spec is used instead, with TE's own CP attention.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from agro_megatron.ops.context_parallel import all_gather_rows, local_positions


class CausalSDPAttention(torch.nn.Module):
    """Causal grouped-query attention of this rank's queries against the whole sequence."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        unsupported = {f"attn_mask_type={attn_mask_type}": attn_mask_type != AttnMaskType.causal,
                       "window_size": config.window_size is not None,
                       "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
                       f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"the SDPA attention core (local spec) supports Llama-style causal "
                                      f"attention only, not {', '.join(bad)}: install transformer-engine")
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group() if self.cp_size > 1 else None
        self.cp_rank = ps.get_context_parallel_rank()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, kv_heads, d] (this rank's rows) -> [s, b, heads*d]."""
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("the SDPA attention core takes no explicit mask, bias or packed "
                                      "sequences: pass right-padded sequences with attention_mask=None")
        s, b = query.shape[0], query.shape[1]
        # fp32 softmax as configured: upcast on CPU; CUDA's flash / memory-efficient kernels keep
        # their softmax statistics in fp32 internally, and upcasting would rule them out.
        dtype = torch.float32 if self.config.attention_softmax_in_fp32 and query.device.type == "cpu" \
            else query.dtype
        q = query.permute(1, 2, 0, 3).to(dtype)  # [b, heads, s, d]
        k = key.permute(1, 2, 0, 3).to(dtype)
        v = value.permute(1, 2, 0, 3).to(dtype)
        if self.cp_size == 1:
            out = self._sdpa(q, k, v, None)
        else:
            out = self._context_parallel(q, k, v)
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale, enable_gqa=self.heads != self.kv_heads)

    def _context_parallel(self, q, k, v):
        """This rank holds two chunks of queries; each attends to the keys up to its own end.

        Keys and values are all-gathered and put in global order; chunk j of global chunk index i
        runs one SDPA over keys [0, (i+1)c) with a mask on its diagonal block. Slicing the key
        prefix (rather than masking the whole sequence) skips the work a mask would only hide:
        half the attention time of one masked call here. At 4096 tokens a CP=2 rank peaks at 0.56x
        the memory of CP=1 (benchmarks/context_parallel.py); per-layer masks made it 0.69x.
        """
        s = q.shape[2]
        keys, k_pos = all_gather_rows(k.permute(2, 0, 1, 3), self.cp_group)  # rows = sequence
        values, _ = all_gather_rows(v.permute(2, 0, 1, 3), self.cp_group)
        order = torch.argsort(k_pos.to(keys.device))
        keys = keys.index_select(0, order).permute(1, 2, 0, 3)       # [b, kv_heads, S, d], global order
        values = values.index_select(0, order).permute(1, 2, 0, 3)
        c = s // 2
        masks = _chunk_masks(s * self.cp_size, self.cp_size, self.cp_rank, q.dtype, q.device)
        outs = []
        for j, mask in enumerate(masks):
            end = mask.shape[1]
            outs.append(self._sdpa(q[:, :, j * c:(j + 1) * c], keys[:, :, :end], values[:, :, :end], mask))
        return torch.cat(outs, dim=2)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters


@functools.lru_cache(maxsize=2)
def _chunk_masks(seq_len: int, cp_size: int, cp_rank: int, dtype: torch.dtype, device: torch.device):
    """Additive causal masks (0 / -inf) of this rank's two query chunks over their key prefixes.

    Shared by every layer: autograd saves a mask for the backward pass, and one shared tensor costs
    its size once, where a mask built per layer (or SDPA's own float copy of a boolean mask) costs
    it once per layer.
    """
    pos = local_positions(seq_len, cp_size, cp_rank, device=device)
    c = pos.numel() // 2
    masks = []
    for j in range(2):
        chunk = pos[j * c:(j + 1) * c]
        allowed = chunk[:, None] >= torch.arange(int(chunk[-1]) + 1, device=device)[None, :]
        masks.append(torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf")))
    return tuple(masks)
