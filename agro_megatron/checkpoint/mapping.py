"""THE one HF <-> Megatron-core table for Llama-3, with its layout transforms.

Every consumer (import, export, loading, weight streaming into vLLM) goes through this module;
nothing else knows how QKV or gate/up are laid out.

Vocabulary of this module:
  * a `Weight` is one logical tensor of the model: a layer's QKV projection, the embedding, ...
  * its *full* megatron tensor is the tensor a TP=1 model holds (vocabulary rows padded or not);
  * its TP *shard* for rank r is what `GPTModel` on TP rank r holds, described by `tp_pieces`.

Layouts (all transforms are row re-orderings along dim 0, recorded as `Block`s):
  * linear_qkv: rows interleaved per query group g = [q heads of g; k_g; v_g]; TP splits whole
    groups, so the shard of rank r is a contiguous row range of the full tensor.
  * linear_fc1: full = [gate; up]; TP rank r holds [gate_r; up_r] (two pieces).
  * embedding / output_layer: rows [0, V) are HF's; rows [V, Vp) are zero padding, Vp =
    padded_vocab_size(V, tp); rank r holds rows [r Vp/tp, (r+1) Vp/tp). Padding is stripped on export.
  * linear_proj / linear_fc2 (row-parallel): same as HF, TP splits dim 1.
  * layer norms: under the local spec `input_layernorm` / `pre_mlp_layernorm`; under the
    TransformerEngine spec fused as `layer_norm_weight` into linear_qkv / linear_fc1.
    megatron's dist-checkpoint keys use the TE names for both, so one checkpoint serves both.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping, Sequence

import torch

from agro_megatron.models.llama import LlamaArch, padded_vocab_size

VOCAB, QKV, GLU, ROW_PARALLEL, REPLICATED = "vocab", "qkv", "glu", "row_parallel", "replicated"

# kind: (local-spec name, TE-spec name, dist-checkpoint key, HF names, layout)
# "{i}" is the layer index; dist-checkpoint keys stack layers along a leading axis.
_TABLE: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "embedding": ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                  "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    "input_norm": ("decoder.layers.{i}.input_layernorm.weight",
                   "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
                   "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                   ("model.layers.{i}.input_layernorm.weight",), REPLICATED),
    "qkv": ("decoder.layers.{i}.self_attention.linear_qkv.weight",
            "decoder.layers.{i}.self_attention.linear_qkv.weight",
            "decoder.layers.self_attention.linear_qkv.weight",
            ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
             "model.layers.{i}.self_attn.v_proj.weight"), QKV),
    "proj": ("decoder.layers.{i}.self_attention.linear_proj.weight",
             "decoder.layers.{i}.self_attention.linear_proj.weight",
             "decoder.layers.self_attention.linear_proj.weight",
             ("model.layers.{i}.self_attn.o_proj.weight",), ROW_PARALLEL),
    "mlp_norm": ("decoder.layers.{i}.pre_mlp_layernorm.weight",
                 "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
                 "decoder.layers.mlp.linear_fc1.layer_norm_weight",
                 ("model.layers.{i}.post_attention_layernorm.weight",), REPLICATED),
    "fc1": ("decoder.layers.{i}.mlp.linear_fc1.weight", "decoder.layers.{i}.mlp.linear_fc1.weight",
            "decoder.layers.mlp.linear_fc1.weight",
            ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), GLU),
    "fc2": ("decoder.layers.{i}.mlp.linear_fc2.weight", "decoder.layers.{i}.mlp.linear_fc2.weight",
            "decoder.layers.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",),
            ROW_PARALLEL),
    "final_norm": ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                   "decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    "output": ("output_layer.weight", "output_layer.weight", "output_layer.weight",
               ("lm_head.weight",), VOCAB),
}
_LAYER_KINDS = ("input_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2")

# Linear modules whose `_extra_state` megatron stores per layer (None under the local spec).
EXTRA_STATE_KEYS = tuple(f"decoder.layers.{m}._extra_state" for m in (
    "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"))


@dataclasses.dataclass(frozen=True)
class Weight:
    """One logical weight; `layer` is the global layer index (None for non-layer weights)."""

    kind: str
    layer: int | None = None

    def _fmt(self, template: str) -> str:
        return template.replace("{i}", str(self.layer)) if self.layer is not None else template

    def megatron_name(self, te: bool = False, layer_offset: int = 0) -> str:
        """State-dict name in a live GPTModel whose first layer is global layer `layer_offset`."""
        local = dataclasses.replace(self, layer=None if self.layer is None else self.layer - layer_offset)
        return local._fmt(_TABLE[self.kind][1 if te else 0])

    @property
    def ckpt_key(self) -> str:
        return _TABLE[self.kind][2]

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(self._fmt(n) for n in _TABLE[self.kind][3])

    @property
    def layout(self) -> str:
        return _TABLE[self.kind][4]

    @property
    def tp_dim(self) -> int | None:
        """The dimension TP splits (None: replicated on every TP rank)."""
        return {VOCAB: 0, QKV: 0, GLU: 0, ROW_PARALLEL: 1, REPLICATED: None}[self.layout]


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows [row, row+rows) of the full megatron tensor are rows [hf_row, hf_row+rows) of `hf_name`."""

    hf_name: str
    hf_row: int
    row: int
    rows: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """Local rows [local, local+length) along `dim` of a TP shard = full rows [start, start+length)."""

    dim: int
    start: int
    local: int
    length: int


def weights(arch: LlamaArch) -> list[Weight]:
    """Every logical weight of the model, in HF checkpoint order (no output layer when tied)."""
    out = [Weight("embedding")]
    for i in range(arch.num_layers):
        out += [Weight(k, i) for k in _LAYER_KINDS]
    out.append(Weight("final_norm"))
    if not arch.tie_word_embeddings:
        out.append(Weight("output"))
    return out


def hf_shapes(arch: LlamaArch, w: Weight) -> dict[str, tuple[int, ...]]:
    """Shape of each HF tensor that `w` is made of."""
    h, d = arch.hidden_size, arch.head_dim
    shapes = {
        "embedding": [(arch.vocab_size, h)], "output": [(arch.vocab_size, h)],
        "input_norm": [(h,)], "mlp_norm": [(h,)], "final_norm": [(h,)],
        "qkv": [(arch.num_heads * d, h), (arch.num_kv_heads * d, h), (arch.num_kv_heads * d, h)],
        "proj": [(h, arch.num_heads * d)],
        "fc1": [(arch.intermediate_size, h)] * 2, "fc2": [(h, arch.intermediate_size)],
    }[w.kind]
    return dict(zip(w.hf_names, shapes))


def full_shape(arch: LlamaArch, w: Weight, tp: int | None = 1) -> tuple[int, ...]:
    """Shape of the full megatron tensor; vocabulary rows padded for `tp` (None: unpadded)."""
    shapes = list(hf_shapes(arch, w).values())
    if w.layout == VOCAB:
        rows = arch.vocab_size if tp is None else padded_vocab_size(arch.vocab_size, tp)
        return (rows, arch.hidden_size)
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def blocks(arch: LlamaArch, w: Weight) -> list[Block]:
    """How the full megatron tensor's rows are assembled from HF rows, in megatron row order."""
    names = w.hf_names
    if w.layout == QKV:
        d, per_group = arch.head_dim, arch.heads_per_group
        q, k, v = names
        stride = (per_group + 2) * d
        out = []
        for g in range(arch.num_kv_heads):
            base = g * stride
            out += [Block(q, g * per_group * d, base, per_group * d),
                    Block(k, g * d, base + per_group * d, d),
                    Block(v, g * d, base + (per_group + 1) * d, d)]
        return out
    if w.layout == GLU:
        n = arch.intermediate_size
        return [Block(names[0], 0, 0, n), Block(names[1], 0, n, n)]
    rows = next(iter(hf_shapes(arch, w).values()))[0]
    return [Block(names[0], 0, 0, rows)]


def tp_pieces(arch: LlamaArch, w: Weight, tp: int, rank: int) -> list[Piece]:
    """Which parts of the full tensor (vocabulary padded for `tp`) TP rank `rank` holds."""
    if not 0 <= rank < tp:
        raise ValueError(f"TP rank {rank} out of range for TP={tp}")
    shape = full_shape(arch, w, tp)
    if w.layout == REPLICATED:
        return [Piece(0, 0, 0, shape[0])]
    if w.layout == GLU:
        n = arch.intermediate_size // tp
        return [Piece(0, rank * n, 0, n), Piece(0, arch.intermediate_size + rank * n, n, n)]
    if w.layout == QKV and arch.num_kv_heads % tp:
        raise ValueError(f"TP={tp} does not divide the {arch.num_kv_heads} query groups")
    dim = w.tp_dim
    n = shape[dim] // tp
    return [Piece(dim, rank * n, 0, n)]


# --- full tensors <-> HF tensors --------------------------------------------------------------
def hf_to_megatron(arch: LlamaArch, w: Weight, hf: Mapping[str, torch.Tensor], tp: int = 1) -> torch.Tensor:
    """The full megatron tensor of `w` from its HF tensors (vocabulary zero-padded for `tp`)."""
    first = hf[w.hf_names[0]]
    out = torch.zeros(full_shape(arch, w, tp), dtype=first.dtype, device=first.device)
    for b in blocks(arch, w):
        out[b.row:b.row + b.rows].copy_(hf[b.hf_name][b.hf_row:b.hf_row + b.rows])
    return out


def megatron_to_hf_parts(arch: LlamaArch, w: Weight, full: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Each HF tensor of `w` as a list of row views of `full`, to be concatenated (no copies).

    `full` may carry any vocabulary padding (rows >= V are ignored).
    """
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in w.hf_names}
    for b in blocks(arch, w):
        parts[b.hf_name].append(full[b.row:b.row + b.rows])
    return parts


def megatron_to_hf(arch: LlamaArch, w: Weight, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF tensors (name -> tensor) from the full megatron tensor of `w` (padding stripped)."""
    return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in megatron_to_hf_parts(arch, w, full).items()}


# --- TP shards ------------------------------------------------------------------------------
def shard(arch: LlamaArch, w: Weight, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The tensor TP rank `rank` holds, cut from the full tensor (padded for `tp` if vocab)."""
    if w.layout == VOCAB and full.shape[0] != padded_vocab_size(arch.vocab_size, tp):
        full = _repad(arch, full, tp)
    ps = tp_pieces(arch, w, tp, rank)
    return torch.cat([full.narrow(p.dim, p.start, p.length) for p in ps], dim=ps[0].dim)


def unshard(arch: LlamaArch, w: Weight, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the shards of all TP ranks, in rank order (inverse of `shard`)."""
    tp = len(shards)
    if w.layout == REPLICATED:
        return shards[0]
    out = torch.empty(full_shape(arch, w, tp), dtype=shards[0].dtype, device=shards[0].device)
    for rank, local in enumerate(shards):
        for p in tp_pieces(arch, w, tp, rank):
            out.narrow(p.dim, p.start, p.length).copy_(local.narrow(p.dim, p.local, p.length))
    return out


def _repad(arch: LlamaArch, full: torch.Tensor, tp: int) -> torch.Tensor:
    out = full.new_zeros((padded_vocab_size(arch.vocab_size, tp),) + tuple(full.shape[1:]))
    out[:arch.vocab_size] = full[:arch.vocab_size]
    return out


# --- names of a live model -------------------------------------------------------------------
def _name_patterns() -> list[tuple[re.Pattern, str]]:
    pats = []
    for kind, (local, te, *_rest) in _TABLE.items():
        for template in {local, te}:
            rx = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
            pats.append((re.compile(rf"^(?:module\.)*{rx}$"), kind))
    return pats


_PATTERNS = _name_patterns()


def parse_megatron_name(name: str, layer_offset: int = 0) -> Weight | None:
    """The Weight a live model's state-dict/parameter name refers to (local or TE spec), or None
    for entries that are not weights (`_extra_state`, buffers). `layer_offset` is the global index
    of the model's first layer (PP stage offset)."""
    for rx, kind in _PATTERNS:
        m = rx.match(name)
        if m:
            layer = int(m.group(1)) + layer_offset if m.groups() else None
            return Weight(kind, layer)
    return None


def iter_hf_names(arch: LlamaArch) -> Iterator[str]:
    """Every HF tensor name the model has, in checkpoint order."""
    for w in weights(arch):
        yield from w.hf_names
