"""Where each step's samples come from: on-policy, stale, replay and offline regimes.

Every regime returns the same `StepSamples`: P prompts x n responses with rewards, behaviour
log-probs and an `on_policy` flag per sample (False for replayed, stale or offline samples: AGRO
gives those agro_off's advantage, AGRO.md sec. 2). All randomness is derived from (seed, step), so a
resumed run draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time

import torch

from agro_megatron.data.replay import ReplayBuffer, Sample


@dataclasses.dataclass
class StepSamples:
    prompt_ids: list[str]              # P problem ids
    prompts: list[list[int]]           # P prompt token ids
    answers: list[str]                 # P ground truths
    samples: list[list[Sample]]        # P x n
    on_policy: torch.Tensor            # [P, n] bool

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([[s.reward for s in row] for row in self.samples], dtype=torch.float64)


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
    """Sample n responses per prompt with `engine` and score them.

    `timings`, when given, gets the seconds spent scoring ("reward_s"): the caller's rollout time
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


class OfflineDataset:
    """Responses generated once from pi_ref, with behaviour log-probs, stored as JSONL (Fig. 5)."""

    def __init__(self, path: str):
        self.path = path
        with open(path) as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        if not self.records:
            raise ValueError(f"{path}: offline dataset is empty; regenerate it")

    @staticmethod
    def write(path: str, records: list[dict]) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)

    def batch(self, step: int, prompts_per_step: int, seed: int, dp_rank: int, dp_size: int) -> StepSamples:
        idx = prompt_indices(len(self.records), prompts_per_step, step, seed, dp_rank, dp_size)
        recs = [self.records[i] for i in idx]
        samples = [[Sample(**s) for s in r["samples"]] for r in recs]
        n = len(samples[0])
        return StepSamples([r["prompt_id"] for r in recs], [r["prompt"] for r in recs],
                           [r["answer"] for r in recs], samples, torch.zeros(len(recs), n, dtype=torch.bool))


class ReplayMixer:
    """Fresh on-policy samples, each swapped for a stored response to the same prompt w.p. p."""

    def __init__(self, capacity: int, p: float):
        self.buffer = ReplayBuffer(capacity)
        self.p = p

    def mix(self, batch: StepSamples, seed: int, step: int) -> StepSamples:
        rng = step_rng(seed, step, "replay")
        mixed, flags = [], []
        for pid, fresh in zip(batch.prompt_ids, batch.samples):
            out, is_fresh = self.buffer.mix(pid, fresh, self.p, rng)
            mixed.append(out)
            flags.append(is_fresh)
        for pid, fresh in zip(batch.prompt_ids, batch.samples):
            self.buffer.add(pid, fresh)
        return dataclasses.replace(batch, samples=mixed, on_policy=torch.tensor(flags, dtype=torch.bool))
