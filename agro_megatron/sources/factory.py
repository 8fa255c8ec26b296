"""The one place a regime name is read: the `algorithm` config -> a sample source."""
from __future__ import annotations

from typing import Callable

import torch

from agro_megatron.sources.base import PromptStream, RolloutGenerator, SampleSource
from agro_megatron.sources.offline import OfflineSource, generate_offline_data
from agro_megatron.sources.on_policy import OnPolicySource
from agro_megatron.sources.replay import ReplaySource
from agro_megatron.sources.stale import StaleSource


def make_sample_source(algorithm, *, prompts: PromptStream, rollouts: RolloutGenerator,
                       policy: torch.nn.Module, build_behaviour_model: Callable[[], torch.nn.Module],
                       progress: Callable) -> SampleSource:
    """`policy`: the bare policy module now (version 0); `build_behaviour_model()`: a fresh model of
    the policy's shape, for the stale regime's snapshots; `progress(total, desc=)`: a progress bar,
    for generating offline data."""
    regime = algorithm.regime
    fresh = OnPolicySource(prompts, rollouts)
    if regime == "on_policy" or (regime == "stale" and algorithm.staleness == 0):
        return fresh  # stale with k = 0 is on-policy by definition
    if regime == "replay":
        return ReplaySource(fresh, capacity=algorithm.replay_capacity, p=algorithm.replay_p, seed=prompts.seed)
    if regime == "stale":
        behaviour = build_behaviour_model()
        behaviour.load_state_dict(policy.state_dict(), strict=False)
        return StaleSource(fresh, engine=rollouts.engine, behaviour_model=behaviour, policy=policy,
                           staleness=algorithm.staleness)
    if regime == "offline":
        generate_offline_data(algorithm.offline_data, prompts.problems, prompts.encode, rollouts, progress)
        return OfflineSource(algorithm.offline_data, prompts_per_step=prompts.prompts_per_step, seed=prompts.seed,
                             dp_rank=prompts.dp_rank, dp_size=prompts.dp_size)
    raise ValueError(f"algorithm.regime={regime!r}: choose on_policy, replay, stale or offline")
