"""Llama-3 (3.0 - 3.3) in megatron-core: HF config.json -> TransformerConfig + layer spec -> GPTModel.

`LlamaArch` is the one parsed view of a Llama config: conversion, the trainer and the scaling
planner all read the architecture from it. Both config layouts are accepted: transformers 4.x /
Meta (`rope_theta` + `rope_scaling`) and transformers 5.x (`rope_parameters`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp32, fp16") from None


@dataclasses.dataclass(frozen=True)
class LlamaArch:
    """Architecture hyper-parameters of a Llama-3 model (what the weights' shapes depend on)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: Any = None

    # -- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | dict) -> "LlamaArch":
        """Parse an HF Llama config (a dict, a config.json path, or a checkpoint directory)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: point at an HF checkpoint directory with a config.json")
            with open(path) as f:
                config = json.load(f)
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(
                f"not a Llama checkpoint (model_type={model_type!r}, architectures={archs}); "
                "agro-megatron supports Llama-3.x (LlamaForCausalLM) only")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in config:
                raise ValueError(f"config.json lacks {key!r}: is this a complete HF Llama config?")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("Llama configs with attention_bias/mlp_bias are not supported (Llama-3 has no biases)")
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters")  # transformers 5.x layout
        if rope:
            theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
            scaling = rope if rope.get("rope_type", "default") != "default" else None
        else:
            theta = config.get("rope_theta", 10000.0)
            scaling = config.get("rope_scaling")
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype != "llama3":
                raise ValueError(f"rope scaling type {rtype!r} is not supported; Llama-3.1+ uses 'llama3'")
            scaling = {
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192)),
            }
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        )

    def to_hf_config(self) -> dict:
        """An HF config.json dict (transformers 4.x layout, which 5.x also reads)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": self.torch_dtype,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        return cfg

    # -- derived quantities --------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Exact parameter count of the HF model (unpadded vocabulary)."""
        h, v = self.hidden_size, self.vocab_size
        attn = h * self.head_dim * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * self.head_dim * h
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise a ValueError naming the fix if this model cannot be split TP x PP ways."""
        if tp < 1 or pp < 1:
            raise ValueError(f"TP and PP must be >= 1 (got TP={tp}, PP={pp})")
        if self.num_kv_heads % tp:
            raise ValueError(
                f"TP={tp} does not divide the {self.num_kv_heads} KV heads (query groups): choose TP from "
                f"{[d for d in range(1, self.num_kv_heads + 1) if self.num_kv_heads % d == 0]}")
        if self.intermediate_size % tp:
            raise ValueError(f"TP={tp} does not divide intermediate_size={self.intermediate_size}")
        if pp > self.num_layers:
            raise ValueError(f"PP={pp} is larger than the {self.num_layers} layers: use PP <= {self.num_layers}")
        if self.num_layers % pp:
            raise ValueError(f"PP={pp} does not divide the {self.num_layers} layers evenly: choose a divisor")


# Published Llama-3 configs (meta-llama/Meta-Llama-3.1-*), for the planner and examples.
_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
LLAMA3_PRESETS: dict[str, LlamaArch] = {
    "llama3-8b": LlamaArch(128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, _LLAMA31_ROPE, 131072),
    "llama3-70b": LlamaArch(128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0, _LLAMA31_ROPE, 131072),
    "llama3-405b": LlamaArch(128256, 16384, 53248, 126, 128, 8, 128, 1e-5, 500000.0, _LLAMA31_ROPE, 131072),
}


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so each TP rank holds an equal slice (multiple of divisible_by)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def llama3_inv_freq(arch: LlamaArch) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3.1 'llama3' scaling, every parameter honoured."""
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = arch.rope_scaling
    if s:
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(mid, (1 - smooth) * inv / s["factor"] + smooth * inv, scaled)
    return inv.to(torch.float32)


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def layer_spec(use_te: bool | None = None, attention: str = "sdpa"):
    """TransformerEngine layer spec when TE imports (GPU), megatron's local torch spec otherwise.

    Under TE the RMSNorm weights live inside linear_qkv / linear_fc1 (`layer_norm_weight`); under the
    local spec they are separate modules. checkpoint/mapping.py knows both names. The local spec's
    attention core is models/attention.py (`attention="sdpa"`: torch SDPA, context parallel) unless
    `attention="megatron"` asks for megatron's own DotProductAttention (CP=1 only; benchmarks).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = te_available() if use_te is None else use_te
    if use_te:
        # TE's spec takes no `normalization`: its fused norm+linear layers read RMSNorm from
        # TransformerConfig.normalization (set in transformer_config below).
        return specs.get_gpt_layer_with_transformer_engine_spec()
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        from agro_megatron.models.attention import CausalSDPAttention

        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = CausalSDPAttention
    elif attention != "megatron":
        raise ValueError(f"attention={attention!r}: use 'sdpa' or 'megatron'")
    return spec


def transformer_config(arch: LlamaArch, *, tp: int = 1, pp: int = 1, cp: int = 1,
                       dtype: str | torch.dtype = "fp32", recompute: bool = False, **overrides):
    """megatron-core TransformerConfig for a Llama architecture. Fusions off on CPU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_parallel(tp, pp)
    dtype = parse_dtype(dtype)
    gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        sequence_parallel=False, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, pipeline_dtype=dtype,
        use_cpu_initialization=not gpu, perform_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False, init_method_std=0.02,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(arch: LlamaArch, config=None, *, tp: int | None = None, pp: int | None = None,
                dtype: str | torch.dtype = "fp32", pre_process: bool | None = None,
                post_process: bool | None = None, use_te: bool | None = None, vp_stage: int | None = None,
                attention: str = "sdpa"):
    """A megatron-core GPTModel for this rank's pipeline stage (parallel state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = tp or ps.get_tensor_model_parallel_world_size()
    pp = pp or ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    if config is None:
        config = transformer_config(arch, tp=tp, pp=pp, cp=cp, dtype=dtype)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(use_te, attention=attention),
        vocab_size=padded_vocab_size(arch.vocab_size, tp), max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(arch.rope_theta), rotary_percent=1.0, parallel_output=True, vp_stage=vp_stage,
    )
    # The local spec builds its RMSNorm weights in fp32 whatever params_dtype says (under TE they
    # live inside the fused linears, in params_dtype). Megatron-LM's Float16Module would cast them;
    # we cast here, so that every parameter has one dtype: megatron's mixed-precision optimizer
    # only checkpoints the state of half-precision params (an fp32 one fails the save).
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != config.params_dtype:
                p.data = p.data.to(config.params_dtype)
    # One device for the whole model, as Megatron-LM's get_model does with .cuda(current_device):
    # with CUDA and without TE, megatron's local spec builds torch.nn.RMSNorm on the CPU while its
    # linear layers are on the GPU. A no-op on CPU.
    from agro_megatron import platform

    model.to(platform.device())
    # megatron's built-in llama3 scaling hard-codes low/high_freq_factor and the original context;
    # install the exact frequencies for this config instead.
    model.rotary_pos_emb.inv_freq = llama3_inv_freq(arch).to(platform.device())  # a plain attribute
    return model


def layer_spec_kind(model: torch.nn.Module) -> str:
    """Which layer spec built `model` (a GPTModel, or a wrapper around one): "<spec>/<attention core>".

    spec: "te" when TransformerEngine modules are present or a fused linear (linear_qkv / linear_fc1)
    holds the RMSNorm weight (`layer_norm_weight`), "local" otherwise. Attention core: "sdpa"
    (models/attention.py), "megatron" (DotProductAttention), "te" (TEDotProductAttention), else the
    class name; "none" without layers. Read from the modules themselves, not from what TE's presence
    would choose today; train/state.py records it in trainer checkpoints.
    """
    te_prefixes = ("transformer_engine", "megatron.core.extensions.transformer_engine")
    cores = {"CausalSDPAttention": "sdpa", "DotProductAttention": "megatron", "TEDotProductAttention": "te"}
    te, core = False, None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module).__module__.startswith(te_prefixes) or (
                leaf in ("linear_qkv", "linear_fc1") and "layer_norm_weight" in module._parameters):
            te = True
        if leaf == "core_attention" and core is None:
            core = cores.get(type(module).__name__, type(module).__name__)
    return f"{'te' if te else 'local'}/{core or 'none'}"
