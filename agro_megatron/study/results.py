"""What a cell's run directory holds, read for the report (nothing here writes).

    run/metrics.jsonl           one record per step (train/*), evaluations as eval/accuracy at their step
    run/eval_problems/step_*.json  per-problem (n, correct) of each evaluation (train/context.Evaluator)
    run/result.json             written when the run finished
    run/final_model/agro_checkpoint.json  the trained model's architecture (parameter count, when the
                                evaluation record has none)

Only the newest eval_problems file (the final evaluation) is read: pass@k and the paired
comparisons are about the end of training, and 1,000 cells must report in seconds.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

from agro_megatron.study.cells import read_status
from agro_megatron.study.workers import parallel_map
from agro_megatron.train.metrics import KL, SAMPLED_KL

# The KL the trainer logs and plots (train/metrics.py names them): the full-vocabulary one, >= 0 in
# every regime; runs with train.logprobs=engine do not measure it, and their on-policy batches'
# sampled log-ratio (its unbiased estimate) stands in for it, as in the trainer's own plots.
KL_KEY, SAMPLED_KL_KEY = KL, SAMPLED_KL
END_WINDOW = 5                   # "KL at the end": the mean over the last steps (one step is noisy)


@dataclass
class CellResult:
    """One cell's outcome. `evals`: (step, held-out accuracy), step 0 = before RL."""
    id: str
    arm: str
    point: str
    group: str
    seed: int | None
    state: str
    config: dict
    finished: bool = False
    evals: list[tuple[int, float]] = field(default_factory=list)
    kl: list[tuple[int, float]] = field(default_factory=list)             # (step, KL to the reference)
    response_length: list[tuple[int, float]] = field(default_factory=list)
    final_problems: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (n, correct)
    final_problems_step: int | None = None
    prompt_tokens_mean: float | None = None
    params: int | None = None         # the planner's parameter count, as the trainer recorded it
    arch: dict | None = None          # the model's shape, for the parameter count
    vocab_size: int | None = None

    @property
    def final_accuracy(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def peak_accuracy(self) -> float | None:
        return max(a for _, a in self.evals) if self.evals else None

    @property
    def initial_accuracy(self) -> float | None:
        return next((a for s, a in self.evals if s == 0), None)

    @property
    def end_kl(self) -> float | None:
        if not self.kl:
            return None
        tail = [v for _, v in self.kl[-END_WINDOW:]]
        return sum(tail) / len(tail)


def read_cell(cell_dir: str) -> CellResult | None:
    """The result of one cell directory (None when it has no cell.json: not a cell)."""
    meta_path = os.path.join(cell_dir, "cell.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    config = {}
    cfg_path = os.path.join(cell_dir, "run", "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    run = os.path.join(cell_dir, "run")
    res = CellResult(id=meta["id"], arm=meta["arm"], point=meta.get("point", ""), group=meta["group"],
                     seed=meta.get("seed"), state=read_status(cell_dir).state, config=config,
                     finished=os.path.exists(os.path.join(run, "result.json")))
    _read_metrics(os.path.join(run, "metrics.jsonl"), res)
    files = sorted(glob.glob(os.path.join(run, "eval_problems", "step_*.json")))
    if files:
        with open(files[-1]) as f:
            ev = json.load(f)
        res.final_problems = {str(p["id"]): (int(p["n"]), int(p["correct"])) for p in ev["problems"]}
        res.final_problems_step = int(ev["step"])
        res.prompt_tokens_mean = ev.get("prompt_tokens_mean")
        res.params = ev.get("params")
    meta_ckpt = os.path.join(run, "final_model", "agro_checkpoint.json")
    if os.path.exists(meta_ckpt):
        with open(meta_ckpt) as f:
            res.arch = json.load(f).get("arch")
    return res


def _read_metrics(path: str, res: CellResult) -> None:
    if not os.path.exists(path):
        return
    evals, kl, length = {}, {}, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line being written while we read
                continue
            step = int(rec.get("step", 0))
            if "eval/accuracy" in rec:
                evals[step] = float(rec["eval/accuracy"])
            if KL_KEY in rec or SAMPLED_KL_KEY in rec:
                kl[step] = float(rec.get(KL_KEY, rec.get(SAMPLED_KL_KEY)))
            if "train/response_length" in rec:
                length[step] = float(rec["train/response_length"])
    res.evals, res.kl, res.response_length = sorted(evals.items()), sorted(kl.items()), sorted(length.items())


def read_study(study_dir: str, workers: int | None = 1) -> list[CellResult]:
    """Every cell directory under <study_dir>/cells, in a stable order.

    ``workers``: processes to parse the cells in (None: one per CPU); parsing each cell's metrics
    log is most of a large report's reading time, and the cells are independent.
    """
    dirs = sorted(glob.glob(os.path.join(study_dir, "cells", "*")))
    return [r for r in parallel_map(read_cell, dirs, workers, min_jobs=64) if r is not None]
