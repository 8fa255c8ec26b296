"""Replay buffer of past rollouts, grouped by prompt (docs/algorithm.md §7, the paper's Fig. 4).

AGRO's leave-one-out baseline compares responses to the SAME prompt, so a fresh sample may only be
swapped for a stored response to that prompt. Each fresh sample is replaced with probability p by
a uniformly drawn stored one (when the prompt has any). Replayed samples are off-policy: the
trainer gives them agro_off's advantage (no likelihood-ratio term).
"""
from __future__ import annotations

import collections
import dataclasses
import random


@dataclasses.dataclass
class Sample:
    """One response to one prompt, with what training needs to reuse it later."""
    token_ids: list[int]
    logprobs: list[float]          # behaviour log-probs (policy that generated it)
    reward: float
    policy_version: int            # optimizer step of the policy that generated it
    finish_reason: str = "length"


class ReplayBuffer:
    """At most `capacity` samples in total, at most `per_prompt` per prompt; oldest prompts evicted."""

    DEFAULT_PER_PROMPT = 16

    def __init__(self, capacity: int, per_prompt: int = DEFAULT_PER_PROMPT):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.per_prompt = per_prompt
        self._store: "collections.OrderedDict[str, list[Sample]]" = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, prompt_id: str) -> bool:
        """Whether responses to this prompt are stored (what `mix` can swap in)."""
        return prompt_id in self._store

    def add(self, prompt_id: str, samples: list[Sample]) -> None:
        bucket = self._store.pop(prompt_id, [])
        self._size -= len(bucket)
        bucket = (bucket + list(samples))[-self.per_prompt:]
        self._store[prompt_id] = bucket
        self._size += len(bucket)
        while self._size > self.capacity and self._store:
            _, old = self._store.popitem(last=False)
            self._size -= len(old)

    def mix(self, prompt_id: str, fresh: list[Sample], p: float, rng: random.Random) -> tuple[list[Sample], list[bool]]:
        """Replace each fresh sample with a stored one with probability p; flag which are fresh."""
        stored = self._store.get(prompt_id, [])
        out, is_fresh = [], []
        for s in fresh:
            if stored and rng.random() < p:
                out.append(stored[rng.randrange(len(stored))])
                is_fresh.append(False)
            else:
                out.append(s)
                is_fresh.append(True)
        return out, is_fresh

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "per_prompt": self.per_prompt,
                "store": [(k, [dataclasses.asdict(s) for s in v]) for k, v in self._store.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.per_prompt = state["capacity"], state["per_prompt"]
        self._store = collections.OrderedDict((k, [Sample(**s) for s in v]) for k, v in state["store"])
        self._size = sum(len(v) for v in self._store.values())
