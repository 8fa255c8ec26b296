"""The MATH reward: 1.0 when the response's final answer equals the ground truth, else 0.0.

Pipeline per answer (docs/algorithm.md §9; the paper's prompt ends with "The final answer is X"):
1. ``extract_answer``: X after the last marker, else the last ``\\boxed{}`` (``extract.py``).
2. ``normalize``: MATH grading conventions; equal canonical strings, plain numbers, and
   tuples/intervals/sets of plain numbers are decided at once, in this process, exactly
   (``normalize.py``).
3. Otherwise SymPy equivalence (intervals, sets, tuples, radicals, pi, polynomials...) in a
   sandboxed checker process under a hard per-check deadline (``sandbox.py``, ``worker.py``,
   ``symbolic.py``).
A timeout, crash or blocked operation scores 0.0. No model text is ever evaluated as code.

``score`` is safe to call from any thread; results are cached per (answer, ground truth).
"""
from __future__ import annotations

import math as _m
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from agro_megatron.rewards.extract import MAX_ANSWER_CHARS, extract_answer
from agro_megatron.rewards.normalize import (
    as_number, as_numbers, compare_key, nesting_depth, normalize, numbers_equal, structures_equal,
)
from agro_megatron.rewards.sandbox import get_pool

__all__ = ["score", "score_batch", "extract_answer", "is_equivalent", "configure", "clear_cache",
           "sandbox_stats", "warm"]

MAX_NESTING = 10
"""Answers nested deeper than this are rejected: the LaTeX grammar's parse time grows
exponentially with brace depth (depth 10: ~1 s, 15: ~3 s, 20: ~80 s); MATH answers nest < 6 deep."""

_DEFAULTS = {"timeout_s": 5.0, "workers": max(1, min(4, os.cpu_count() or 1))}
_CACHE: OrderedDict[tuple[str, str], bool] = OrderedDict()
_CACHE_SIZE = 1 << 16
_CACHE_LOCK = threading.Lock()


def configure(*, timeout_s: float | None = None, workers: int | None = None) -> dict:
    """Set the defaults used by ``score``/``is_equivalent`` (and ``score_batch`` when not given).

    ``timeout_s``: wall-clock limit of one symbolic check (default 5 s). ``workers``: sandbox
    processes a batch uses (default min(4, CPUs)). Returns the resulting defaults.
    """
    if timeout_s is not None:
        _DEFAULTS["timeout_s"] = _check_timeout(timeout_s)
    if workers is not None:
        _DEFAULTS["workers"] = _check_workers(workers)
    return dict(_DEFAULTS)


def clear_cache() -> None:
    """Forget cached verdicts (benchmarks measure cold checks)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def sandbox_stats() -> dict:
    """Counters of this process's sandbox (checks, timeouts, crashes, blocked, restarts): log
    them; a rising timeout count means answers the checker cannot decide within the limit."""
    return dict(get_pool().stats)


def warm(*, workers: int | None = None, wait: bool = True) -> threading.Thread | None:
    """Start the sandbox now (SymPy's import and warm-up in the zygote, then ``workers`` checkers;
    default ``configure``'s), so that no check pays that start-up (seconds) inside its time
    limit or inside a training step. Call it once at start-up, before the first reward.

    ``wait=False`` starts it in a background thread and returns the thread (checks that arrive
    meanwhile wait for it); the start-up then overlaps with model building. Idempotent.
    """
    n = _DEFAULTS["workers"] if workers is None else _check_workers(workers)
    if wait:
        get_pool().warm(n)
        return None
    thread = threading.Thread(target=get_pool().warm, args=(n,), name="reward-sandbox-warm", daemon=True)
    thread.start()
    return thread


def _check_timeout(timeout_s) -> float:
    if not isinstance(timeout_s, (int, float)) or not _m.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def _check_workers(workers) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return workers


def _quick(pred: str, gold: str) -> tuple[bool | None, str, str]:
    """(verdict or None if SymPy must decide, canonical pred, canonical gold)."""
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False, "", ""
    p, g = normalize(pred), normalize(gold)
    if not p or not g:
        return False, p, g
    if compare_key(p) == compare_key(g):
        return True, p, g
    if nesting_depth(p) > MAX_NESTING or nesting_depth(g) > MAX_NESTING:
        return False, p, g
    a, b = as_number(p), as_number(g)
    if a is not None and b is not None:
        return numbers_equal(a, b), p, g
    a, b = as_numbers(p), as_numbers(g)
    if a is not None and b is not None:
        return structures_equal(a, b), p, g
    return None, p, g


def _equivalent_many(preds: Sequence[str | None], golds: Sequence[str], timeout_s: float,
                     workers: int) -> list[bool]:
    out = [False] * len(preds)
    todo: dict[tuple[str, str], list[int]] = {}
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        if pred is None:
            continue
        verdict, p, g = _quick(pred, gold)
        if verdict is not None:
            out[i] = verdict
            continue
        with _CACHE_LOCK:
            hit = _CACHE.get((p, g))
        if hit is not None:
            out[i] = hit
        else:
            todo.setdefault((p, g), []).append(i)
    if todo:
        keys = list(todo)
        verdicts = get_pool().check(keys, timeout_s, min(workers, len(keys)))
        with _CACHE_LOCK:
            for key, verdict in zip(keys, verdicts):
                for i in todo[key]:
                    out[i] = bool(verdict)
                if verdict is not None:  # a timeout may be load, not the answer: not cached
                    _CACHE[key] = verdict
                    _CACHE.move_to_end(key)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return out


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}; convert it with str()")


def is_equivalent(pred: str | None, gold: str, *, timeout_s: float | None = None) -> bool:
    """Whether answer ``pred`` equals ground truth ``gold`` (MATH conventions, then SymPy)."""
    if pred is not None:
        _check_str("pred", pred)
    _check_str("gold", gold)
    t = _DEFAULTS["timeout_s"] if timeout_s is None else _check_timeout(timeout_s)
    return _equivalent_many([pred], [gold], t, 1)[0]


def score(response: str, ground_truth: str) -> float:
    """1.0 if the final answer in ``response`` equals ``ground_truth``, else 0.0."""
    _check_str("response", response)
    _check_str("ground_truth", ground_truth)
    return float(is_equivalent(extract_answer(response), ground_truth))


def score_batch(responses: Sequence[str], ground_truths: Sequence[str], *,
                timeout_s: float | None = None, workers: int | None = None) -> list[float]:
    """``[score(r, g) for r, g in zip(responses, ground_truths)]``, checked in parallel.

    ``timeout_s`` limits each distinct symbolic check (default ``configure``'s, 5 s);
    ``workers`` sandbox processes share the batch (default min(4, CPUs)). Identical
    (answer, ground truth) pairs are checked once.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"score_batch got {len(responses)} responses but {len(ground_truths)} "
                         "ground truths; pass one ground truth per response (repeat it for "
                         "several samples of the same prompt)")
    for r in responses:
        _check_str("each response", r)
    for g in ground_truths:
        _check_str("each ground truth", g)
    t = _DEFAULTS["timeout_s"] if timeout_s is None else _check_timeout(timeout_s)
    n = _DEFAULTS["workers"] if workers is None else _check_workers(workers)
    answers = [extract_answer(r) for r in responses]
    return [float(v) for v in _equivalent_many(answers, ground_truths, t, n)]
