"""Rewards. MATH: ``score(response, ground_truth) -> 0.0 | 1.0`` (see ``rewards/math.py``)."""
from agro_megatron.rewards.math import (
    clear_cache, configure, extract_answer, is_equivalent, sandbox_stats, score, score_batch, warm,
)

__all__ = ["score", "score_batch", "extract_answer", "is_equivalent", "configure", "clear_cache",
           "sandbox_stats", "warm"]
