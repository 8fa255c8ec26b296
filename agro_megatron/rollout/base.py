"""The rollout-engine protocol: what the trainer asks of any sampler (native Megatron or vLLM).

Semantics every engine must keep, because AGRO compares them with the trainer's recomputation:

* `Completion.logprobs[i]` is log softmax(logits / T)[token_ids[i]] over the whole vocabulary of
  the policy that sampled it (the trainer's semantics; vLLM calls it "processed" log-probs). It is
  NOT the log-prob under the top-k / top-p truncated distribution the token was drawn from. With
  T = 0 (greedy) it is taken at T = 1.
* `token_ids` holds the generated tokens only (no prompt). A stop token that ended the sequence is
  included (the policy must learn to emit it), with its log-prob; `finish_reason` is then "stop".
  A sequence that reached `max_new_tokens` without one ends with "length".
* `generate` is collective: every rank of a model-parallel (TP x PP) group calls it with the same
  prompts and parameters, and every rank gets the same result. Data-parallel replicas are
  independent and pass their own prompts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. top_k <= 0 and top_p = 1 disable those filters; temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: a fresh random draw each call

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if int(self.top_k) != self.top_k:
            raise ValueError(f"top_k must be an integer (<= 0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # accept any iterable of ints (a list from YAML) but store a hashable tuple
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]
    logprobs: list[float]  # per token: log softmax(logits / T)[token] (see the module docstring)
    finish_reason: FinishReason

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@runtime_checkable
class RolloutEngine(Protocol):
    """A sampler the trainer drives between optimizer steps."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """`n` completions per prompt: result[i][j] is the j-th sample for prompts[i]."""
        ...

    def update_weights(self, model: Any) -> None:
        """Make the engine sample from the current weights of the training `model`."""
        ...

    def sleep(self) -> None:
        """Release what the engine holds between rollouts (no-op where meaningless)."""
        ...

    def wake(self) -> None:
        """Re-acquire what `sleep` released, before `update_weights` / `generate`."""
        ...

    def close(self) -> None:
        """Release the engine for good (the end of a job)."""
        ...


def validate_prompts(prompts: Sequence[Sequence[int]], n: int, vocab_size: int | None) -> list[list[int]]:
    """Check the batch the protocol accepts and return it as lists of Python ints."""
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): "
                             "was it tokenized with another tokenizer?")
        out.append(p)
    return out
