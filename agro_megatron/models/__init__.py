"""Model definitions: Llama-3 as a megatron-core GPTModel, and `unwrap_model` (wrapping.py)."""
from agro_megatron.models.llama import (  # noqa: F401
    LLAMA3_PRESETS, LlamaArch, build_model, layer_spec, padded_vocab_size, transformer_config,
)
from agro_megatron.models.wrapping import unwrap_model  # noqa: F401
