"""Everything a run holds besides the loop itself: process layout, tokenizer, data, models, engine.

Built once by `build_context`; the Trainer and the SFT stage read from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from agro_megatron.config import JobConfig


@dataclasses.dataclass
class RunContext:
    cfg: JobConfig
    log_dir: str
    ckpt_dir: str
    tp: int
    pp: int
    dp_size: int
    dp_rank: int
    is_last_stage: bool
    is_logging_rank: bool
    cp_size: int = 1   # context parallel: CP ranks share a DP rank's prompts and split its rollouts
    cp_rank: int = 0
    tokenizer: Any = None
    tokenizer_dir: str | None = None
    pad_id: int = 0
    stop_ids: tuple = ()
    train_problems: list = dataclasses.field(default_factory=list)
    heldout_problems: list = dataclasses.field(default_factory=list)
    reward_fn: Callable | None = None
    arch: Any = None
    bundle: Any = None
    engine: Any = None
    behaviour_model: Any = None
    offline_path: str | None = None
    _paired: Any = None

    # -- helpers ---------------------------------------------------------------------------------
    def print(self, *args) -> None:
        if self.is_logging_rank:
            print(*args, flush=True)

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                    disable=not (self.is_logging_rank and self.cfg.logging.progress), file=sys.stderr)

    def encode_prompt(self, problem) -> list[int]:
        from agro_megatron.data import encode_prompt

        ids = encode_prompt(problem, self.tokenizer, system_prompt=self.system_prompt)
        limit = self.cfg.data.max_prompt_tokens
        if len(ids) > limit:
            raise ValueError(f"problem {problem.id}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                             f"{limit}; raise the limit or filter long problems")
        return ids

    @property
    def system_prompt(self):
        from agro_megatron.data import SYSTEM_PROMPT

        sp = self.cfg.data.system_prompt
        return SYSTEM_PROMPT if sp == "default" else (sp or None)

    def sampling_params(self, *, seed: int, greedy: bool = False, n_tokens: int | None = None):
        from agro_megatron.rollout import SamplingParams

        r = self.cfg.rollout
        return SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=n_tokens or r.max_new_tokens, stop_token_ids=self.stop_ids,
                              seed=seed)

    def paired_model(self):
        from agro_megatron.train.pipeline import PolicyWithReference

        if self._paired is None:
            self._paired = PolicyWithReference(self.bundle.policy, self.bundle.reference)
        return self._paired

    def evaluate(self, prefix: str = "eval") -> dict:
        """Held-out accuracy of the current policy with the run's engine (greedy by default)."""
        from agro_megatron.eval import evaluate

        e = self.cfg.eval
        problems = self.heldout_problems[: e.max_problems]
        if not problems:
            return {}
        workers = self.dp_size * self.cp_size  # every DP x CP rank evaluates its own share
        per_rank = problems[self.dp_rank * self.cp_size + self.cp_rank::workers]

        from agro_megatron.data import format_prompt

        def prompt_fn(problem):
            return format_prompt(problem, self.tokenizer, system_prompt=self.system_prompt)

        def generate_fn(prompts, n, temperature):
            ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
            params = self.sampling_params(seed=self.cfg.train.seed + 7, greedy=temperature == 0)
            out = self.engine.generate(ids, n, params)
            return [[self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in row] for row in out]

        report = evaluate(generate_fn, per_rank, n=e.n, temperature=e.temperature, k_values=(1,),
                          score_fn=self.reward_fn, prompt_fn=prompt_fn, progress=False)
        acc = report.overall.accuracy
        correct = torch.tensor([acc * len(per_rank), float(len(per_rank))], dtype=torch.float64)
        if workers > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(correct, group=ps.get_data_parallel_group(with_context_parallel=True))
        return {f"{prefix}/accuracy": float(correct[0] / correct[1])}


def load_run_data(cfg: JobConfig, log_dir: str, tokenizer_dir: str | None):
    """Tokenizer and problems. The tiny tokenizer is built (once, by rank 0) for synthetic runs."""
    from agro_megatron.data import (build_tiny_tokenizer, generate_problems, load_problems, load_tokenizer,
                                    split_problems)

    d = cfg.data
    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(log_dir, "tokenizer")
        if dist.get_rank() == 0 and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
            build_tiny_tokenizer(tokenizer_dir, seed=d.seed)
        dist.barrier()
    tokenizer = load_tokenizer(tokenizer_dir)
    if d.train == "synthetic":
        pool = generate_problems(d.synthetic_train_size + d.synthetic_heldout_size, seed=d.seed,
                                 levels=d.synthetic_levels)
        train, heldout = split_problems(pool, d.synthetic_heldout_size, seed=d.seed)
    else:
        train = load_problems(d.train, skip_malformed=d.skip_malformed)
        heldout = []
    if d.heldout and d.heldout != "synthetic":
        heldout = load_problems(d.heldout, skip_malformed=d.skip_malformed)
    return tokenizer, tokenizer_dir, train, heldout


def save_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
