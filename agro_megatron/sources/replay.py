"""regime=replay: fresh on-policy samples, each swapped for a stored response to the same prompt
with probability p (the paper's replay experiment, docs/algorithm.md §6).

AGRO's leave-one-out baseline compares responses to the same prompt, so a sample is only ever
replaced by an earlier response to that prompt. Replayed samples are flagged off-policy.
"""
from __future__ import annotations

import dataclasses

import torch

from agro_megatron.data.replay import ReplayBuffer
from agro_megatron.sources.base import StepSamples, step_rng
from agro_megatron.sources.on_policy import OnPolicySource


class ReplaySource:
    samples_are_on_policy = False

    @staticmethod
    def check_config(algorithm) -> None:
        if not 0.0 <= algorithm.replay_p <= 1.0:
            raise ValueError(f"algorithm.replay_p={algorithm.replay_p} must be a probability in [0, 1]")
        if algorithm.replay_capacity < 1:
            raise ValueError(f"algorithm.replay_capacity={algorithm.replay_capacity} must be >= 1 (samples kept)")

    def __init__(self, fresh: OnPolicySource, *, capacity: int, p: float, seed: int):
        self.fresh, self.p, self.seed = fresh, p, seed
        self.buffer = ReplayBuffer(capacity)

    @classmethod
    def from_config(cls, algorithm, *, fresh: OnPolicySource, **parts) -> "ReplaySource":
        return cls(fresh, capacity=algorithm.replay_capacity, p=algorithm.replay_p, seed=fresh.prompts.seed)

    def next_batch(self, step: int, timings: dict) -> StepSamples:
        batch = self.fresh.next_batch(step, timings)
        rng = step_rng(self.seed, step, "replay")
        mixed, flags = [], []
        for pid, fresh in zip(batch.prompt_ids, batch.samples):
            out, is_fresh = self.buffer.mix(pid, fresh, self.p, rng)
            mixed.append(out)
            flags.append(is_fresh)
        for pid, fresh in zip(batch.prompt_ids, batch.samples):
            self.buffer.add(pid, fresh)
        return dataclasses.replace(batch, samples=mixed, on_policy=torch.tensor(flags, dtype=torch.bool))

    def after_step(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
