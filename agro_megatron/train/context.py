"""What a run knows before any model exists: where it writes, how its processes are laid out,
its tokenizer and problems. Built once by train/run.py (`start_job`) and then read-only.

The models, the optimizer, the rollout engine, the objective and the sample source are not
here: train/run.py builds them from this context and hands them to the Trainer explicitly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from agro_megatron.config import JobConfig
from agro_megatron.models.llama import LlamaArch


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """This rank's place in the TP x PP x CP x DP grid (megatron's parallel state, read once)."""

    tp: int
    pp: int
    cp: int
    dp: int
    dp_rank: int
    cp_rank: int
    is_last_stage: bool      # holds the logits (and so the loss, the statistics and the metrics)
    is_logging_rank: bool    # the one rank that prints, logs and plots

    @classmethod
    def from_megatron(cls) -> "ProcessLayout":
        from megatron.core import parallel_state as ps

        last = ps.is_pipeline_last_stage()
        return cls(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                   cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                   dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
                   is_last_stage=last,
                   is_logging_rank=(last and ps.get_tensor_model_parallel_rank() == 0
                                    and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0))


@dataclasses.dataclass(frozen=True)
class RunData:
    """The tokenizer and the problems, and how a problem becomes a prompt."""

    tokenizer: object
    tokenizer_dir: str
    train_problems: list
    heldout_problems: list
    system_prompt: str | None
    max_prompt_tokens: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Computed once: every rollout and evaluation batch asks for them."""
        from agro_megatron.data import stop_token_ids

        return tuple(stop_token_ids(self.tokenizer))

    def encode_prompt(self, problem) -> list[int]:
        from agro_megatron.data import encode_prompt

        ids = encode_prompt(problem, self.tokenizer, system_prompt=self.system_prompt)
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"problem {problem.id}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                             f"{self.max_prompt_tokens}; raise the limit or filter long problems")
        return ids


@dataclasses.dataclass(frozen=True)
class RunContext:
    cfg: JobConfig
    log_dir: str
    ckpt_dir: str
    layout: ProcessLayout
    data: RunData
    arch: LlamaArch
    reward_fn: Callable

    def print(self, *args) -> None:
        if self.layout.is_logging_rank:
            print(*args, flush=True)

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                    disable=not (self.layout.is_logging_rank and self.cfg.logging.progress), file=sys.stderr)

    def sampling_params(self, seed: int, *, greedy: bool = False):
        from agro_megatron.rollout import SamplingParams

        r = self.cfg.rollout
        return SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop_token_ids=self.data.stop_ids, seed=seed)


class Evaluator:
    """Held-out accuracy of the engine's current weights: every DP x CP rank scores its share."""

    def __init__(self, run: RunContext, engine):
        self.run, self.engine = run, engine

    def evaluate(self, prefix: str = "eval", step: int | None = None) -> dict:
        """{"<prefix>/accuracy": ...}; with `step`, the per-problem counts are also written
        (`save_problem_counts`)."""
        from agro_megatron.data import format_prompt
        from agro_megatron.eval import evaluate

        run, layout, data = self.run, self.run.layout, self.run.data
        e = run.cfg.eval
        problems = data.heldout_problems[: e.max_problems]
        if not problems:
            return {}
        workers = layout.dp * layout.cp
        per_rank = problems[layout.dp_rank * layout.cp + layout.cp_rank::workers]

        def prompt_fn(problem):
            return format_prompt(problem, data.tokenizer, system_prompt=data.system_prompt)

        def generate_fn(prompts, n, temperature):
            ids = [list(data.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
            params = run.sampling_params(run.cfg.train.seed + 7, greedy=temperature == 0)
            out = self.engine.generate(ids, n, params)
            return [[data.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in row] for row in out]

        report = evaluate(generate_fn, per_rank, n=e.n, temperature=e.temperature, k_values=(1,),
                          score_fn=run.reward_fn, prompt_fn=prompt_fn, progress=False)
        correct = torch.tensor([report.overall.accuracy * len(per_rank), float(len(per_rank))], dtype=torch.float64)
        if workers > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(correct, group=ps.get_data_parallel_group(with_context_parallel=True))
        if step is not None:
            self.save_problem_counts(report.problems, step, problems)
        return {f"{prefix}/accuracy": float(correct[0] / correct[1])}

    def save_problem_counts(self, records: list[dict], step: int, problems: list) -> None:
        """Each held-out problem's (n, correct) at `step`, gathered from every DP x CP rank to the
        logging rank, into <log_dir>/eval_problems/step_<step>.json. The accuracy alone cannot give
        unbiased pass@k or paired per-problem comparisons between runs (agro-study report needs both).
        Also what the study's compute estimate needs: the mean prompt length in tokens and the
        planner's parameter count of one model replica."""
        layout = self.run.layout
        mine = [{"id": str(r["id"]), "n": int(r["n"]), "correct": int(r["num_correct"])} for r in records]
        gathered = [mine]
        if layout.dp * layout.cp > 1:
            from megatron.core import parallel_state as ps

            gathered = [None] * (layout.dp * layout.cp)
            dist.all_gather_object(gathered, mine, group=ps.get_data_parallel_group(with_context_parallel=True))
        if not layout.is_logging_rank:
            return
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["id"])
        prompt_tokens = sum(len(self.run.data.encode_prompt(p)) for p in problems) / len(problems)
        out = os.path.join(self.run.log_dir, "eval_problems")
        os.makedirs(out, exist_ok=True)
        from agro_megatron.plan.params import total_params_over_ranks

        e = self.run.cfg.eval
        save_json(os.path.join(out, f"step_{step:06d}.json"),
                  {"step": step, "n": e.n, "temperature": e.temperature, "prompt_tokens_mean": prompt_tokens,
                   "params": total_params_over_ranks(self.run.arch, 1, 1, spec="local"), "problems": rows})


def load_run_data(cfg: JobConfig, log_dir: str, tokenizer_dir: str | None) -> RunData:
    """Tokenizer and problems. The tiny tokenizer is built (once, by rank 0) for synthetic runs."""
    from agro_megatron.data import SYSTEM_PROMPT, build_tiny_tokenizer, load_tokenizer
    from agro_megatron.train.inputs import select_problems

    d = cfg.data
    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(log_dir, "tokenizer")
        if dist.get_rank() == 0 and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
            build_tiny_tokenizer(tokenizer_dir, seed=d.seed)
        dist.barrier()
    tokenizer = load_tokenizer(tokenizer_dir)
    system_prompt = SYSTEM_PROMPT if d.system_prompt == "default" else (d.system_prompt or None)
    # data.heldout's choice, rows over data.max_prompt_tokens rejected by location (train/inputs.py)
    train, heldout = select_problems(d, tokenizer, system_prompt, d.max_prompt_tokens)
    return RunData(tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, train_problems=train, heldout_problems=heldout,
                   system_prompt=system_prompt, max_prompt_tokens=d.max_prompt_tokens)


def save_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
