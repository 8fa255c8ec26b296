"""agro-megatron: AGRO RL fine-tuning of Llama-3 on Megatron-core."""
__version__ = "0.1.0"
