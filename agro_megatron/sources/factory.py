"""The one place a regime name is read: the `algorithm` config -> a sample source.

Adding a regime: a class in its own module with `from_config` and the SampleSource methods
(sources/base.py), and one line in SOURCES.
"""
from __future__ import annotations

from typing import Callable

import torch

from agro_megatron.sources.base import PromptStream, RolloutGenerator, SampleSource
from agro_megatron.sources.offline import OfflineSource
from agro_megatron.sources.on_policy import OnPolicySource
from agro_megatron.sources.replay import ReplaySource
from agro_megatron.sources.stale import StaleSource

SOURCES = {"on_policy": OnPolicySource, "offline": OfflineSource, "replay": ReplaySource, "stale": StaleSource}


def source_class(algorithm):
    """The SampleSource class of `algorithm.regime` (ValueError naming the choices if unknown)."""
    if algorithm.regime not in SOURCES:
        raise ValueError(f"algorithm.regime={algorithm.regime!r} is not valid; choose one of {', '.join(SOURCES)}")
    return SOURCES[algorithm.regime]


def make_sample_source(algorithm, *, prompts: PromptStream, rollouts: RolloutGenerator,
                       policy: torch.nn.Module, build_behaviour_model: Callable[[], torch.nn.Module],
                       progress: Callable, total_steps: int = 0,
                       notice: Callable[[str], None] | None = None) -> SampleSource:
    """`policy`: the bare policy module now (version 0); `build_behaviour_model()`: a fresh model of
    the policy's shape (the stale regime's snapshots live in it); `progress(total, desc=)`: a
    progress bar (generating offline data); `total_steps`: the run's RL steps, and `notice(text)`:
    where a source reports, before step 1, that the run will not do what its config asks (e.g.
    replay that cannot happen)."""
    return source_class(algorithm).from_config(
        algorithm, fresh=OnPolicySource(prompts, rollouts), policy=policy,
        build_behaviour_model=build_behaviour_model, progress=progress, total_steps=total_steps, notice=notice)
