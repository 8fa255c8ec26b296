"""Fused numerical ops (vocab-parallel log-probs, entropy, KL)."""
from agro_megatron.ops.vocab_parallel import VocabParallelStats, vocab_parallel_logprobs

__all__ = ["VocabParallelStats", "vocab_parallel_logprobs"]
