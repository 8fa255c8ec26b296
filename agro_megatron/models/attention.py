"""The attention core of the local (no TransformerEngine) layer spec: torch SDPA, context parallel.

Why not megatron-core's local `DotProductAttention`:
* it refuses context_parallel_size > 1 ("only supported by TEDotProductAttention");
* it materialises the [b, heads, s, s] scores in fp32 and repeats K/V over the query heads. At
  4096 tokens it took 5.8x the peak memory and 4.3x the time of this core on CPU
  (benchmarks/context_parallel.py: megatron_cp1 vs sdpa_cp1).
This core is a drop-in `core_attention`, with megatron's constructor and forward signatures and
no parameters, so checkpoints do not change. It runs torch's scaled_dot_product_attention with
grouped-query heads (no K/V copies). At CP=1 it is plain causal attention, which can use
flash/memory-efficient kernels. At CP > 1 queries stay local, keys and values are all-gathered
over the CP group (ops/context_parallel.py), and the causal mask comes from the global positions
of both. With TE present the TE spec is used instead, with TE's own CP attention.
"""
from __future__ import annotations

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
        s = query.shape[0]
        mask = None
        if self.cp_size > 1:
            key, k_pos = all_gather_rows(key, self.cp_group)
            value, _ = all_gather_rows(value, self.cp_group)
            q_pos = local_positions(s * self.cp_size, self.cp_size, self.cp_rank, device=query.device)
            mask = q_pos[:, None] >= k_pos[None, :].to(query.device)  # [s, S]: causal in global positions
        # fp32 softmax as configured: upcast on CPU; CUDA's flash / memory-efficient kernels keep
        # their softmax statistics in fp32 internally, and upcasting would rule them out.
        dtype = torch.float32 if self.config.attention_softmax_in_fp32 and query.device.type == "cpu" \
            else query.dtype
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3).to(dtype), key.permute(1, 2, 0, 3).to(dtype),
            value.permute(1, 2, 0, 3).to(dtype), attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.heads != self.kv_heads)
        return out.to(query.dtype).permute(2, 0, 1, 3).reshape(s, query.shape[1], self.heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters
