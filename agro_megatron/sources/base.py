"""What every sample source shares: the batch it returns, the data order, and rollout generation.

A sample source answers one question for the trainer: which samples does step `s` train on?
Every regime returns the same `StepSamples`: P prompts x n responses with rewards, behaviour
log-probs and an `on_policy` flag per sample (False for replayed, stale or offline samples, which
the objective treats as off-policy, docs/algorithm.md §6). All randomness is derived from
(seed, step), so a resumed run draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Callable, Protocol

import torch

from agro_megatron.data.replay import Sample


@dataclasses.dataclass
class StepSamples:
    prompt_ids: list[str]              # P problem ids
    prompts: list[list[int]]           # P prompt token ids
    answers: list[str]                 # P ground truths
    samples: list[list[Sample]]        # P x n
    on_policy: torch.Tensor            # [P, n] bool: drawn from the current policy

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([[s.reward for s in row] for row in self.samples], dtype=torch.float64)

    @property
    def responses(self) -> list[list[list[int]]]:
        return [[s.token_ids for s in row] for row in self.samples]

    def after_update(self) -> "StepSamples":
        """The same samples once the policy has been updated on them: none is on-policy any more."""
        return dataclasses.replace(self, on_policy=torch.zeros_like(self.on_policy))


class SampleSource(Protocol):
    """One object per regime (sources/factory.py builds it from the config).

    Class-level facts the config's validation reads: `samples_are_on_policy` (every sample drawn
    from the current policy: the token-level estimators need it) and `check_config(algorithm)`
    (raises ValueError naming the key and the fix).
    """

    samples_are_on_policy: bool

    def next_batch(self, step: int, timings: dict) -> StepSamples:
        """This rank's samples for `step`; `timings["reward_s"]` gets the seconds spent rewarding."""
        ...

    def after_step(self, policy: torch.nn.Module) -> None:
        """Called with the updated policy after every optimizer step."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class StatelessSource:
    """Base of the sources whose batches depend only on the step and fixed data: nothing to do
    after a step, nothing to checkpoint."""

    def after_step(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def step_rng(seed: int, step: int, salt: str) -> random.Random:
    return random.Random(f"{seed}:{step}:{salt}")


def prompt_indices(num_problems: int, prompts_per_step: int, step: int, seed: int,
                   dp_rank: int, dp_size: int) -> list[int]:
    """This DP rank's problems for `step`: epochs of seeded permutations, sliced by DP rank."""
    per_rank = prompts_per_step // dp_size
    start = step * prompts_per_step + dp_rank * per_rank
    out = []
    for k in range(start, start + per_rank):
        epoch, pos = divmod(k, num_problems)
        perm = list(range(num_problems))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(perm)
        out.append(perm[pos])
    return out


def generate_samples(engine, prompts, answers, n, params, reward_fn, tokenizer, version: int,
                     timings: dict | None = None) -> list[list[Sample]]:
    """Sample n responses per prompt with `engine` and reward them.

    `timings`, when given, gets the seconds spent rewarding ("reward_s"): the caller's rollout time
    is its own wall time less that.
    """
    if not prompts:  # a context-parallel rank whose share of a small batch is empty
        return []
    completions = engine.generate(prompts, n, params)
    t0 = time.perf_counter()
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for row in completions for c in row]
    golds = [a for a in answers for _ in range(n)]
    rewards = reward_fn(texts, golds)
    if timings is not None:
        timings["reward_s"] = timings.get("reward_s", 0.0) + time.perf_counter() - t0
    out, k = [], 0
    for row in completions:
        group = []
        for c in row:
            group.append(Sample(list(c.token_ids), [float(x) for x in c.logprobs], float(rewards[k]),
                                version, c.finish_reason))
            k += 1
        out.append(group)
    return out


@dataclasses.dataclass
class RolloutGenerator:
    """Fresh samples from the run's engine: n responses per prompt, rewarded.

    Context-parallel ranks hold the same weights and share a data-parallel rank's prompts: each
    samples every cp-th prompt, then all of them get the whole batch. `sampling_params(seed)`
    builds the run's SamplingParams; each (step, DP rank, CP rank) gets its own seed.
    """

    engine: Any
    reward_fn: Callable
    tokenizer: Any
    sampling_params: Callable[[int], Any]
    n: int
    seed: int
    dp_rank: int = 0
    cp_rank: int = 0
    cp_size: int = 1

    def generate(self, prompts: list[list[int]], answers: list[str], *, step: int, version: int,
                 timings: dict | None = None) -> list[list[Sample]]:
        rank_key = (self.seed, step, self.dp_rank) + ((self.cp_rank,) if self.cp_size > 1 else ())
        params = self.sampling_params(hash(rank_key) % (2 ** 31))
        share = slice(self.cp_rank, None, self.cp_size)
        samples = generate_samples(self.engine, prompts[share], answers[share], self.n, params, self.reward_fn,
                                   self.tokenizer, version=version, timings=timings)
        if self.cp_size > 1:
            from megatron.core import parallel_state as ps

            from agro_megatron.ops.context_parallel import gather_strided_objects

            samples = gather_strided_objects(samples, ps.get_context_parallel_group())
        return samples


@dataclasses.dataclass
class PromptStream:
    """The data order: which problems this data-parallel rank trains on at each step (stateless:
    a function of the seed and the step)."""

    problems: list
    encode: Callable[[Any], list[int]]
    prompts_per_step: int
    seed: int
    dp_rank: int = 0
    dp_size: int = 1

    def for_step(self, step: int) -> tuple[list[str], list[list[int]], list[str]]:
        idx = prompt_indices(len(self.problems), self.prompts_per_step, step, self.seed, self.dp_rank, self.dp_size)
        probs = [self.problems[i] for i in idx]
        return [p.id for p in probs], [self.encode(p) for p in probs], [p.answer for p in probs]
