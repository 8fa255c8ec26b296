"""regime=offline: responses generated once from the reference policy, stored as JSONL, reused
for every step (the paper's offline experiment, docs/algorithm.md §6).

The file is generated at start-up when it does not exist (`generate_offline_data`), with the run's
engine before any update, i.e. from pi_ref, and then only read. All its samples are off-policy.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from agro_megatron import parallel
from agro_megatron.data.replay import Sample
from agro_megatron.sources.base import (RolloutGenerator, StatelessSource, StepSamples, generate_samples,
                                        prompt_indices)

GENERATION_BATCH = 32  # prompts per engine call while generating the file


class OfflineSource(StatelessSource):
    samples_are_on_policy = False

    @staticmethod
    def check_config(algorithm) -> None:
        if not algorithm.offline_data:
            raise ValueError("algorithm.regime=offline needs algorithm.offline_data: a JSONL path; when the file "
                             "does not exist yet it is generated once from pi_ref and reused")

    def __init__(self, path: str, *, prompts_per_step: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        with open(path) as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        if not self.records:
            raise ValueError(f"{path}: offline dataset is empty; delete it to regenerate it")
        self.path, self.prompts_per_step, self.seed = path, prompts_per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @classmethod
    def from_config(cls, algorithm, *, fresh, progress, **parts) -> "OfflineSource":
        """Generates the file first when it does not exist (from the engine's starting weights)."""
        prompts = fresh.prompts
        generate_offline_data(algorithm.offline_data, prompts.problems, prompts.encode, fresh.rollouts, progress)
        return cls(algorithm.offline_data, prompts_per_step=prompts.prompts_per_step, seed=prompts.seed,
                   dp_rank=prompts.dp_rank, dp_size=prompts.dp_size)

    def next_batch(self, step: int, timings: dict) -> StepSamples:
        idx = prompt_indices(len(self.records), self.prompts_per_step, step, self.seed, self.dp_rank, self.dp_size)
        recs = [self.records[i] for i in idx]
        samples = [[Sample(**s) for s in r["samples"]] for r in recs]
        n = len(samples[0])
        return StepSamples([r["prompt_id"] for r in recs], [r["prompt"] for r in recs],
                           [r["answer"] for r in recs], samples, torch.zeros(len(recs), n, dtype=torch.bool))


def write_records(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def generate_offline_data(path: str, problems: list, encode, rollouts: RolloutGenerator, progress) -> None:
    """n responses per training problem from the engine's current weights (pi_ref at start-up),
    with their rewards and behaviour log-probs, written once by rank 0 to `path`."""
    if os.path.exists(path):
        return
    records = []
    bar = progress(len(problems), desc="offline data from pi_ref")
    for start in range(0, len(problems), GENERATION_BATCH):
        chunk = problems[start:start + GENERATION_BATCH]
        prompts = [encode(p) for p in chunk]
        params = rollouts.sampling_params(rollouts.seed * 1000 + start)
        samples = generate_samples(rollouts.engine, prompts, [p.answer for p in chunk], rollouts.n, params,
                                   rollouts.reward_fn, rollouts.tokenizer, version=0)
        for p, pr, row in zip(chunk, prompts, samples):
            records.append({"prompt_id": p.id, "prompt": pr, "answer": p.answer,
                            "samples": [dataclasses.asdict(s) for s in row]})
        bar.update(len(chunk))
    bar.close()
    if parallel.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_records(path, records)
    if dist.is_initialized():
        dist.barrier()
