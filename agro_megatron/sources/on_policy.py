"""regime=on_policy: every step samples fresh responses from the current policy."""
from __future__ import annotations

import torch

from agro_megatron.sources.base import PromptStream, RolloutGenerator, StatelessSource, StepSamples


class OnPolicySource(StatelessSource):
    samples_are_on_policy = True

    @staticmethod
    def check_config(algorithm) -> None:
        pass

    def __init__(self, prompts: PromptStream, rollouts: RolloutGenerator):
        self.prompts, self.rollouts = prompts, rollouts

    @classmethod
    def from_config(cls, algorithm, *, fresh: "OnPolicySource", **parts) -> "OnPolicySource":
        return fresh

    def next_batch(self, step: int, timings: dict) -> StepSamples:
        return self.sample(step, version=step, timings=timings)

    def sample(self, step: int, *, version: int, timings: dict | None = None) -> StepSamples:
        """Step `step`'s prompts, sampled from whatever the engine holds (policy version `version`)."""
        ids, prompts, answers = self.prompts.for_step(step)
        samples = self.rollouts.generate(prompts, answers, step=step, version=version, timings=timings)
        on_policy = torch.full((len(prompts), self.rollouts.n), version == step, dtype=torch.bool)
        return StepSamples(ids, prompts, answers, samples, on_policy)
