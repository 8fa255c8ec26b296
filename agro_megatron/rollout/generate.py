"""`make_generate_fn(model_dir)`: text in, sampled texts out, for `agro-eval --model DIR`.

Loads a converted checkpoint (`agro-convert import` output) in this process at TP=1 x PP=1
(a world of one is created when none exists) and samples with the requested engine. Larger models
are evaluated inside a torchrun job through the same RunContext.evaluate path the trainer uses.
"""
from __future__ import annotations

import os
from typing import Callable


def make_generate_fn(model_dir: str, *, engine: str = "native", max_new_tokens: int = 512, seed: int = 0,
                     tokenizer=None) -> Callable:
    from agro_megatron import parallel
    from agro_megatron.checkpoint.convert import ASSETS_DIR
    from agro_megatron.checkpoint.load import build_and_load
    from agro_megatron.data import load_tokenizer, stop_token_ids
    from agro_megatron.rollout.base import SamplingParams
    from agro_megatron.rollout.factory import make_engine

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a directory: pass a checkpoint written by agro-convert import")
    parallel.init_distributed()
    parallel.init_model_parallel(tp=1, pp=1, seed=seed)
    model, arch = build_and_load(model_dir, dtype="fp32")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tok = tokenizer  # an already loaded HF tokenizer
    else:
        if not tokenizer or os.path.abspath(tokenizer) == os.path.abspath(model_dir):
            tokenizer = os.path.join(model_dir, ASSETS_DIR)  # agro-convert keeps the HF side files there
        tok = load_tokenizer(tokenizer)
    eng = make_engine(engine, model, vocab_size=arch.vocab_size, pad_token_id=tok.pad_token_id or 0)
    stops = tuple(stop_token_ids(tok))
    calls = [0]

    def generate_fn(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                stop_token_ids=stops, seed=seed + calls[0])
        calls[0] += 1
        out = eng.generate(ids, n, params)
        return [[tok.decode(c.token_ids, skip_special_tokens=True) for c in row] for row in out]

    return generate_fn
