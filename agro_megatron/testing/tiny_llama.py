"""Write tiny Llama-3-shaped HF checkpoints with transformers (the independent reference).

The checkpoint is what `LlamaForCausalLM.save_pretrained` writes (config.json in transformers'
own layout, generation_config.json, safetensors shards + index), plus a small byte-level
tokenizer with Llama-3's special tokens. Every weight is random and distinct: RMSNorm weights
are drawn around 1 instead of being all ones, so a mapping that swaps two norms changes logits.

    path = write_tiny_llama(tmp / "hf", vocab_size=300, layers=2, kv_heads=2, tie=False)
    logits = hf_logits(path, input_ids)          # transformers' fp32 reference

`write_random_llama` writes checkpoints of any LlamaArch without transformers (random N(0, std)
weights, one shard in memory at a time) for memory tests and benchmarks.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>")

# rope scaling with a short original context, so all three llama3 regimes (kept, smoothed,
# divided by `factor`) occur among a tiny head_dim's frequencies.
TINY_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_llama_config(*, vocab_size: int = 300, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, intermediate: int | None = None, head_dim: int | None = None,
                      tie: bool = False, rope_theta: float = 500000.0,
                      rope_scaling: dict | None | bool = True, max_position_embeddings: int = 256,
                      rms_norm_eps: float = 1e-5):
    """A transformers LlamaConfig for a tiny Llama-3-shaped model (GQA, llama3 RoPE scaling)."""
    from transformers import LlamaConfig

    if rope_scaling is True:
        rope_scaling = dict(TINY_ROPE_SCALING)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie, rope_parameters=rope,
        bos_token_id=0, eos_token_id=1, attention_bias=False, mlp_bias=False,
    )


def build_tiny_llama(config, *, seed: int = 0, dtype: torch.dtype | str = torch.float32):
    """A LlamaForCausalLM with seeded random weights (norm weights around 1, not all ones)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # std large enough that logits are O(1): relative errors are meaningful
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))
    if isinstance(dtype, str):
        from agro_megatron.models.llama import parse_dtype

        dtype = parse_dtype(dtype)
    return model.to(dtype).eval()


def write_tiny_tokenizer(out_dir: str | os.PathLike) -> None:
    """Byte-level tokenizer (256 byte tokens + Llama-3 special tokens); needs vocab >= 261."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_SPECIAL_TOKENS[1])
    fast.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIAL_TOKENS[2:])})
    fast.save_pretrained(out_dir)


def write_tiny_llama(out_dir: str | os.PathLike, *, vocab_size: int = 300, hidden: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                     head_dim: int | None = None, tie: bool = False, dtype: torch.dtype | str = torch.float32,
                     seed: int = 0, max_shard_size: int | str | None = None, rope_scaling: dict | None | bool = True,
                     rope_theta: float = 500000.0, tokenizer: bool | None = None,
                     config_layout: str = "transformers") -> Path:
    """Write a tiny Llama-3-shaped HF checkpoint to `out_dir`; returns the directory.

    max_shard_size: passed to save_pretrained (e.g. "20KB" forces several shards + an index).
    tokenizer: write the byte-level tokenizer (default: when vocab_size leaves room for it).
    config_layout: "transformers" (what this transformers version writes; 5.x: `rope_parameters`)
    or "v4" (transformers 4.x / Meta layout: `rope_theta` + `rope_scaling`, `torch_dtype`).
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                               kv_heads=kv_heads, intermediate=intermediate, head_dim=head_dim, tie=tie,
                               rope_theta=rope_theta, rope_scaling=rope_scaling)
    model = build_tiny_llama(config, seed=seed, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out, **kwargs)
    if tokenizer is None:
        tokenizer = vocab_size >= 256 + len(LLAMA3_SPECIAL_TOKENS)
    if tokenizer:
        write_tiny_tokenizer(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    dtype_name = str(model.dtype).replace("torch.", "")
    if config_layout == "v4":
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.pop("rope_theta", rope_theta)
        cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = dtype_name
    elif config_layout == "transformers":
        cfg.setdefault("dtype", dtype_name)
    else:
        raise ValueError(f"config_layout must be 'transformers' or 'v4', not {config_layout!r}")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def write_random_llama(out_dir: str | os.PathLike, arch, *, dtype: torch.dtype | str = torch.bfloat16,
                       seed: int = 0, max_shard_bytes: int = 500 << 20, std: float = 0.02) -> Path:
    """A random HF checkpoint of LlamaArch `arch` written without transformers, one shard in memory
    at a time (for sizes where building a LlamaForCausalLM is slow: memory tests, benchmarks).
    Weights are plain N(0, std); only shapes, names and files are Llama's."""
    import json

    from safetensors.torch import save_file

    from agro_megatron.checkpoint import mapping
    from agro_megatron.models.llama import parse_dtype

    dtype = parse_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = arch.to_hf_config()
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, size, total = {}, {}, 0, 0
    names = []

    def flush():
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for w in mapping.weights(arch):
        for name, shape in mapping.hf_shapes(arch, w).items():
            t = torch.randn(shape, generator=gen).mul_(std).to(dtype)
            if shard and size + t.nbytes > max_shard_bytes:
                flush()
            shard[name], size, total = t, size + t.nbytes, total + t.nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


def hf_logits(hf_dir: str | os.PathLike, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab] of transformers' LlamaForCausalLM loaded from `hf_dir`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
