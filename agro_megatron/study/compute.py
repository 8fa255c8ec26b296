"""Compute C of a run up to each step: training plus generation FLOPs, from the planner's parameter count.

Per RL step, with N the parameters of one model replica as agro-plan counts them
(`plan.params.total_params_over_ranks` at TP=PP=1, padded vocabulary included) and
T = prompts_per_step x n x (prompt tokens + response tokens) the step's tokens:

    generation   2 N T                 (prefill + decode forwards of the rollout engine)
    scoring      2 N T + 2 N T         (policy and frozen-reference log-probs)
    training     6 N T x epochs        (forward + backward per optimizer pass over the batch)

i.e. C_step = (6 + 6 x epochs_per_batch) N T. Attention's quadratic term is left out (short
sequences, as in the usual 6N rule), and so are evaluations (they are not training compute).
The response length is the step's logged mean (train/response_length); the prompt length is the
held-out prompts' mean recorded with each evaluation (same distribution as the training prompts).
"""
from __future__ import annotations

import functools
import os

from agro_megatron.study.results import CellResult


def flops_per_token(params: int, epochs_per_batch: int = 1) -> float:
    return float((6 + 6 * epochs_per_batch) * params)


@functools.lru_cache(maxsize=256)
def _params(arch_items: tuple) -> int:
    from agro_megatron.models.llama import LlamaArch
    from agro_megatron.plan.params import total_params_over_ranks

    arch = LlamaArch(**dict(arch_items))
    return int(total_params_over_ranks(arch, 1, 1, spec="local"))


def cell_arch(res: CellResult, cell_dir: str | None = None) -> dict | None:
    """The model shape: the trained model's metadata, else the tiny config plus the run's tokenizer."""
    if res.arch:
        return {k: v for k, v in res.arch.items() if k in _ARCH_FIELDS}
    model = res.config.get("model", {})
    if model.get("megatron_checkpoint") or model.get("hf_checkpoint") or cell_dir is None:
        return None
    tok = os.path.join(cell_dir, "run", "tokenizer", "tokenizer.json")
    if not os.path.exists(tok):
        return None
    t = model.get("tiny") or {}
    return dict(vocab_size=_vocab_size(tok), hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_layers=t["num_layers"], num_heads=t["num_heads"], num_kv_heads=t["num_kv_heads"],
                head_dim=t["head_dim"], tie_word_embeddings=t.get("tie_word_embeddings", False))


_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings")


@functools.lru_cache(maxsize=64)
def _vocab_size(path: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


def cell_params(res: CellResult, cell_dir: str | None = None) -> int | None:
    """The trainer's recorded count (train/context.py writes the planner's), else counted here."""
    if res.params:
        return int(res.params)
    arch = cell_arch(res, cell_dir)
    if arch is None:
        return None
    return _params(tuple(sorted((k, v) for k, v in arch.items() if k in _ARCH_FIELDS)))


def cumulative_compute(res: CellResult, params: int) -> dict[int, float]:
    """step -> training + generation FLOPs spent up to and including that step (0 at step 0)."""
    cfg = res.config
    prompts = cfg.get("train", {}).get("prompts_per_step", 0)
    n = cfg.get("rollout", {}).get("n", 0)
    epochs = cfg.get("algorithm", {}).get("epochs_per_batch", 1)
    prompt_tokens = res.prompt_tokens_mean or 0.0
    per_token = flops_per_token(params, epochs)
    out, total = {0: 0.0}, 0.0
    for step, length in res.response_length:
        total += per_token * prompts * n * (prompt_tokens + length)
        out[step] = total
    return out
