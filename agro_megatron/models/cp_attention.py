"""Causal attention core for context parallelism without TransformerEngine.

megatron-core's local `DotProductAttention` refuses context_parallel_size > 1 ("only supported by
TEDotProductAttention"), so on CPU (and on GPUs without TE) the local layer spec gets this core
instead. It is a drop-in `core_attention` (same constructor and forward as megatron's): queries
stay local, keys and values are all-gathered over the CP group (ops/context_parallel.py), and
the causal mask is built from the global positions of both. With TE present, TE's own CP
attention is used and this module is not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agro_megatron.ops.context_parallel import all_gather_rows, local_positions


class AllGatherCPAttention(torch.nn.Module):
    """Causal grouped-query attention of local queries against the whole sequence's keys/values."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"context-parallel attention supports causal masks only, got {attn_mask_type}")
        unsupported = {"window_size": config.window_size is not None,
                       "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
                       f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"context-parallel attention without TransformerEngine does not support "
                                      f"{', '.join(bad)}: install transformer-engine or set parallel.cp=1")
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = ps.get_context_parallel_group()
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, kv_heads, d] (this rank's rows) -> [s, b, heads*d]."""
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("context-parallel attention takes no explicit mask, bias or packed "
                                      "sequences: pass right-padded sequences with attention_mask=None")
        s = query.shape[0]
        keys, k_pos = all_gather_rows(key, self.cp_group)
        values, _ = all_gather_rows(value, self.cp_group)
        q_pos = local_positions(s * self.cp_size, self.cp_size, self.cp_rank, device=query.device)
        allowed = q_pos[:, None] >= k_pos[None, :].to(query.device)  # [s, S]
        dtype = torch.float32 if self.config.attention_softmax_in_fp32 else query.dtype
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3).to(dtype), keys.permute(1, 2, 0, 3).to(dtype),
            values.permute(1, 2, 0, 3).to(dtype), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.heads != self.kv_heads)
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(s, query.shape[1], self.heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters
