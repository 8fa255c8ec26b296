"""Model definitions: Llama-3 as a megatron-core GPTModel."""
from agro_megatron.models.llama import (  # noqa: F401
    LLAMA3_PRESETS, LlamaArch, build_model, layer_spec, padded_vocab_size, transformer_config,
)
