"""Fused numerical ops (vocab-parallel log-probs, entropy, KL)."""
from agro_megatron.ops.vocab_parallel import VocabParallelStats, vocab_parallel_logprobs
from agro_megatron.ops.fused_output import fused_output_logprobs

__all__ = ["VocabParallelStats", "fused_output_logprobs", "vocab_parallel_logprobs"]
