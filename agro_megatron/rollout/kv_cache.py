"""KV-cached forward of one pipeline stage of a megatron GPTModel, built from its own modules.

Why not megatron-core's `StaticInferenceContext`: it works on CPU, but in 0.16.1 its
non-flash-decode path caches keys *before* RoPE and re-rotates the whole key cache, then
repeat-interleaves K and V over the query heads, in every layer at every step; its cost per
token grows with the length and it ran at 0.58x transformers' `generate` here. It also gives all
rows of a batch the same positions, so left-padded prompts see shifted RoPE angles.

This module runs the same modules megatron's TransformerLayer runs (input norm, the attention's
own fused QKV projection and split, `linear_proj`, the layer's bias-dropout-add, pre-MLP norm,
MLP, final norm, output layer: TP communication included, TE-fused norms included) and replaces
only the attention core: keys are cached after RoPE, positions are per row (a padded prompt's
tokens keep positions 0, 1, ... as in the trainer), and attention is torch's
scaled_dot_product_attention with grouped-query heads (no K/V copies) and a boolean mask.
Context parallelism needs nothing here: the decoder runs whole sequences on each CP rank (CP ranks
hold identical weights; the trainer gives each a share of the prompts). Supported: Llama-style GPT stages (RoPE, rotate-half, no MLA / cross-attention / MoE-specific
paths); anything else raises NotImplementedError naming the feature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer keys (after RoPE) and values: [batch, local KV heads, slots, head_dim]."""

    def __init__(self, layers: int, batch: int, heads: int, slots: int, head_dim: int, dtype, device):
        shape = (batch, heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished sequences dropped)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StageDecoder:
    """Incremental forward of this rank's stage: embedding (first stage), layers, logits (last)."""

    def __init__(self, gpt):
        cfg = gpt.config
        unsupported = {
            "position_embedding_type != 'rope'": getattr(gpt, "position_embedding_type", None) != "rope",
            "rotary_interleaved": cfg.rotary_interleaved,
            "multi_latent_attention": cfg.multi_latent_attention,
            "fp32_residual_connection": cfg.fp32_residual_connection,
            "apply_residual_connection_post_layernorm": cfg.apply_residual_connection_post_layernorm,
            "sequence_parallel": cfg.sequence_parallel,
            "multi-token prediction": getattr(cfg, "mtp_num_layers", None),
        }
        bad = [name for name, flag in unsupported.items() if flag]
        if bad:
            raise NotImplementedError(f"the native rollout engine does not support {', '.join(bad)}: "
                                      "use a Llama-style model config or the vLLM engine")
        self.gpt, self.config = gpt, cfg
        self.layers = list(gpt.decoder.layers)
        self.inv_freq = gpt.rotary_pos_emb.inv_freq
        self.interp = getattr(gpt.rotary_pos_emb, "seq_len_interpolation_factor", None)
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else cfg.kv_channels ** -0.5
        attn = self.layers[0].self_attention if self.layers else None
        self.kv_heads = attn.num_query_groups_per_partition if attn is not None else 0
        self.gqa = attn is not None and attn.num_attention_heads_per_partition != self.kv_heads

    def new_cache(self, batch: int, slots: int, dtype, device) -> KVCache:
        return KVCache(len(self.layers), batch, self.kv_heads, slots, self.config.kv_channels, dtype, device)

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [s, b, 1, head_dim] for per-row positions [b, s] (megatron's arithmetic)."""
        pos = positions.to(self.inv_freq.dtype)
        if self.interp is not None:
            pos = pos * (1 / self.interp)
        freqs = pos[..., None] * self.inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1).transpose(0, 1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _attention(self, layer, x, i, cos, sin, cache: KVCache, start: int, mask):
        attn = layer.self_attention
        q, k, v = attn.get_query_key_value_tensors(x)  # [s, b, heads, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        s = q.shape[0]
        cache.k[i][:, :, start:start + s] = k.permute(1, 2, 0, 3)
        cache.v[i][:, :, start:start + s] = v.permute(1, 2, 0, 3)
        keys, values = cache.k[i][:, :, :start + s], cache.v[i][:, :, :start + s]
        causal = mask is None and s > 1
        ctx = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values, attn_mask=mask,
                                             is_causal=causal, scale=self.scale, enable_gqa=self.gqa)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, ctx.shape[0], -1)  # [s, b, heads * d]
        return attn.linear_proj(ctx)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None,
                cache: KVCache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Feed `tokens` [b, s] (first stage) or `hidden` [s, b, h] at cache slots start..start+s.

        `positions` [b, s]: RoPE positions per row. `mask` [b, 1, s, start+s] bool, True = may
        attend (None: causal when s > 1, everything when s == 1). Returns the stage output
        [s, b, h], or on the last stage the logits of the last position [b, V] (TP-gathered).
        """
        gpt, cfg = self.gpt, self.config
        h = gpt.embedding(input_ids=tokens, position_ids=positions) if gpt.pre_process else hidden
        cos, sin = self._rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            residual = h
            out = self._attention(layer, layer.input_layernorm(h), i, cos, sin, cache, start, mask)
            h = layer.self_attn_bda(False, cfg.bias_dropout_fusion)(out, residual, layer.hidden_dropout)
            residual = h
            out = layer.mlp(layer.pre_mlp_layernorm(h))
            h = layer.mlp_bda(False, cfg.bias_dropout_fusion)(out, residual, layer.hidden_dropout)
        if not gpt.post_process:
            return h
        h = h[-1:]
        if gpt.decoder.final_layernorm is not None:
            h = gpt.decoder.final_layernorm(h)
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(h, weight=weight, runtime_gather_output=True)
        return logits[0]
