"""Rollout engines: the protocol (base.py), the native Megatron-core sampler (native.py).

    engine = make_engine("native", model, vocab_size=arch.vocab_size)
    completions = engine.generate(prompt_ids, n=8, params=SamplingParams(temperature=1.0, seed=0))
"""
from agro_megatron.rollout.base import (Completion, RolloutEngine, SamplingParams, make_engine,
                                        validate_prompts)

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_engine", "make_generate_fn",
           "validate_prompts"]


def make_generate_fn(model_dir: str, **options):
    """Text-level sampler for `agro-eval --model DIR` (see rollout/generate.py)."""
    from agro_megatron.rollout.generate import make_generate_fn as _make

    return _make(model_dir, **options)
