"""A model's last-stage output as the loss code sees it: logits, or hidden states and weight.

Why: the trainer has two ways to get per-token log-probs, entropy and KL out of the last
pipeline stage. The logits path runs megatron's output layer and hands the [b, s, V/TP] logits
shard to `vocab_parallel_logprobs`. The fused path (`train.fused_output`) stops at the final
hidden states and hands them, with this rank's vocab shard of the output weight, to
`fused_output_logprobs`, so those logits never exist. The losses and statistics in
losses/objective.py, train/loop.py and train/sft.py are written once, against `output_logprobs`:
the schedule (train/pipeline.py) decides which of the two kinds of output they receive.
"""
from __future__ import annotations

import dataclasses

import torch

from agro_megatron.ops.fused_output import fused_output_logprobs
from agro_megatron.ops.vocab_parallel import VocabParallelStats, vocab_parallel_logprobs


@dataclasses.dataclass(frozen=True, eq=False)
class HiddenStates:
    """Final (post-norm) hidden states [..., H] of a model's last stage and the output weight
    [V/TP, H] its output layer would have applied to them (this rank's vocab shard; the tied
    embedding weight when input and output embeddings are shared). Gradients reach both."""

    hidden: torch.Tensor
    weight: torch.Tensor

    @property
    def device(self) -> torch.device:
        """Where the outputs live (the loss code moves labels and masks there, as for logits)."""
        return self.hidden.device


def output_logprobs(output, labels, ref_output=None, *, temperature: float = 1.0,
                    compute_entropy: bool = True, vocab_size: int | None = None) -> VocabParallelStats:
    """log pi(labels), entropy and KL(pi || pi_ref) per token, from either kind of output.

    output: this rank's logits shard [..., V/TP], or HiddenStates. ref_output: the reference's
    output of the same kind, or None (no KL). labels [...]: global token ids, -100 ignored.
    The vocabulary shard is megatron's (rank r of the TP group holds ids [r*Vp, (r+1)*Vp));
    vocab_size excludes megatron's TP padding. Both kinds give the same VocabParallelStats, equal
    up to floating-point rounding (the fused op sums the logits in tiles).
    """
    opts = dict(temperature=temperature, compute_entropy=compute_entropy, vocab_size=vocab_size)
    if isinstance(output, HiddenStates):
        if ref_output is not None and not isinstance(ref_output, HiddenStates):
            raise TypeError(f"output is HiddenStates but ref_output is {type(ref_output).__name__}: "
                            "pass the reference's HiddenStates too (both models under the fused path)")
        ref_h = None if ref_output is None else ref_output.hidden
        ref_w = None if ref_output is None else ref_output.weight
        return fused_output_logprobs(output.hidden, output.weight, labels, ref_h, ref_w, **opts)
    if not torch.is_tensor(output):
        raise TypeError(f"output must be a logits tensor or HiddenStates, got {type(output).__name__}")
    if isinstance(ref_output, HiddenStates):
        raise TypeError("output is a logits tensor but ref_output is HiddenStates: pass the "
                        "reference's logits too (both models under the logits path)")
    return vocab_parallel_logprobs(output, labels, ref_logits=ref_output, **opts)
