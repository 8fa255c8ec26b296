"""Rollout engines: the protocol (base.py), the native Megatron-core sampler (native.py), the
colocated vLLM engine (vllm_engine.py), and `make_engine`, which builds one by name (factory.py).

    engine = make_engine("native", model, vocab_size=arch.vocab_size)
    completions = engine.generate(prompt_ids, n=8, params=SamplingParams(temperature=1.0, seed=0))
"""
from agro_megatron.rollout.base import Completion, RolloutEngine, SamplingParams, validate_prompts
from agro_megatron.rollout.factory import ENGINE_KINDS, make_engine
from agro_megatron.rollout.generate import make_generate_fn  # text-level sampler for `agro-eval --model DIR`

__all__ = ["ENGINE_KINDS", "Completion", "RolloutEngine", "SamplingParams", "make_engine", "make_generate_fn",
           "validate_prompts"]
