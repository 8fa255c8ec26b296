"""regime=replay: fresh on-policy samples, each swapped for a stored response to the same prompt
with probability p (the paper's replay experiment, docs/algorithm.md §6).

AGRO's leave-one-out baseline compares responses to the same prompt, so a sample is only ever
replaced by an earlier response to that prompt. Replayed samples are flagged off-policy.
"""
from __future__ import annotations

import dataclasses

import torch

from agro_megatron.data.replay import ReplayBuffer
from agro_megatron.sources.base import StepSamples, prompt_indices, step_rng
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
    def from_config(cls, algorithm, *, fresh: OnPolicySource, total_steps: int = 0, notice=None,
                    **parts) -> "ReplaySource":
        source = cls(fresh, capacity=algorithm.replay_capacity, p=algorithm.replay_p, seed=fresh.prompts.seed)
        if notice is not None and total_steps > 0 and algorithm.replay_p > 0:
            prompts = fresh.prompts
            reach = replay_reach(len(prompts.problems), prompts.prompts_per_step, total_steps, prompts.seed,
                                 prompts.dp_size, fresh.rollouts.n, algorithm.replay_capacity)
            if reach < 0.5:
                notice(low_replay_message(algorithm.replay_p, reach, algorithm.replay_capacity, len(prompts.problems),
                                          prompts.dp_size))
        return source

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


MAX_SIMULATED_DRAWS = 200_000  # replay_reach simulates at most this many prompt draws (a second or so)


def replay_reach(num_problems: int, prompts_per_step: int, steps: int, seed: int, dp_size: int, n: int,
                 capacity: int, per_prompt: int = ReplayBuffer.DEFAULT_PER_PROMPT) -> float:
    """Share of DP rank 0's prompt draws over the run whose prompt still has stored responses in
    the buffer when it comes back: a fresh sample can only be swapped for an earlier response to
    its own prompt, so the replayed share of the run is ``replay_p`` times this.

    Exact for the run's prompt order (`prompt_indices`: epochs of seeded permutations, sliced by
    DP rank), run through a ReplayBuffer (its own eviction, oldest prompt first) on the first
    `MAX_SIMULATED_DRAWS` draws. It is small when a prompt comes back only after an epoch while the
    buffer holds a few steps' responses, and under DP a prompt returns to the same rank only 1 in
    ``dp_size`` times.
    """
    per_rank = max(1, prompts_per_step // max(1, dp_size))
    steps = min(steps, max(1, MAX_SIMULATED_DRAWS // per_rank))
    buffer = ReplayBuffer(capacity, per_prompt)  # the real eviction, fed placeholder responses
    responses = [None] * n
    hits = draws = 0
    for step in range(steps):
        idx = prompt_indices(num_problems, prompts_per_step, step, seed, 0, dp_size)
        hits += sum(i in buffer for i in idx)
        draws += len(idx)
        for i in idx:
            buffer.add(i, responses)
    return hits / max(1, draws)


def low_replay_message(p: float, reach: float, capacity: int, num_problems: int, dp_size: int) -> str:
    per_prompt = ReplayBuffer.DEFAULT_PER_PROMPT
    need = num_problems * per_prompt
    why = [f"the buffer holds {capacity} samples (up to {per_prompt} per prompt, oldest prompts evicted first) "
           f"while each of the {num_problems} training prompts comes back about once an epoch"]
    fixes = [f"algorithm.replay_capacity={need} (every prompt's last {per_prompt} responses)"]
    if dp_size > 1:
        why.append(f"with DP={dp_size} a prompt comes back to the same rank's buffer 1 time in {dp_size}")
        fixes.append("fewer data-parallel ranks")
    return (f"warning: algorithm.replay_p={p:g} will replay only about {p * reach:.1%} of the samples, not {p:.0%}: "
            f"a sample is swapped only for an earlier response to its own prompt, and {'; '.join(why)}. "
            f"For the replay the config asks for, set {' or '.join(fixes)}, or train on fewer prompts for more "
            f"epochs. data/replay_fraction in the logs shows the share actually replayed.")
