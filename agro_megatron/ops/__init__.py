"""Fused numerical ops (vocab-parallel log-probs, entropy, KL; from logits or from hidden states)."""
from agro_megatron.ops.vocab_parallel import VocabParallelStats, vocab_parallel_logprobs
from agro_megatron.ops.fused_output import fused_output_logprobs
from agro_megatron.ops.output import HiddenStates, output_logprobs

__all__ = ["HiddenStates", "VocabParallelStats", "fused_output_logprobs", "output_logprobs",
           "vocab_parallel_logprobs"]
