"""Worker functions for tests/test_engine_logprobs.py: the two log-prob paths on one batch."""
from __future__ import annotations

import torch

from agro_megatron.testing.train_checks import length_reward, tiny_config


def both_paths_on_one_batch(log_dir: str, overrides: dict) -> dict:
    """Build a job, draw step 0's batch, and take its TokenStats both ways (`train.logprobs`
    recompute and engine) from the same weights. Returns them on the last pipeline stage."""
    import dataclasses

    from agro_megatron.train.layout import SequenceLayout
    from agro_megatron.train.loop import Trainer
    from agro_megatron.train.run import setup_job

    cfg = tiny_config(log_dir, **overrides)
    run, parts = setup_job(cfg, reward_fn=length_reward)
    try:
        trainer = Trainer(run, bundle=parts.bundle, engine=parts.engine, objective=parts.objective,
                          source=parts.source, evaluator=parts.evaluator)
        batch = parts.source.next_batch(0, {})
        layout = SequenceLayout(batch.prompts, batch.responses, pad_id=run.data.pad_id,
                                max_tokens=cfg.train.micro_batch_tokens, uniform=run.layout.pp > 1)
        out = {}
        for mode in ("recompute", "engine"):
            trainer.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logprobs=mode))
            stats = trainer.token_stats(layout, batch)
            out[mode] = None if stats is None else {
                "logprobs": stats.logprobs, "ref_logprobs": stats.ref_logprobs, "mask": stats.mask,
                "kl": stats.kl, "entropy": stats.entropy}
        replayed = trainer.token_stats(layout, batch.after_update())  # collective: every rank calls it
        out["off_policy_engine"] = None if replayed is None else replayed.kl is not None
        out["tokens"] = int(sum(len(s.token_ids) for row in batch.samples for s in row))
        return out
    finally:
        parts.engine.close()


def final_weights(log_dir: str, overrides: dict) -> dict:
    """run_job, then the starting and trained weights and the logged history."""
    from agro_megatron.train.run import run_job

    result = run_job(tiny_config(log_dir, **overrides), reward_fn=length_reward)
    trainer = result.pop("trainer")
    weights = {k: v.detach().clone() for k, v in trainer.bundle.module.state_dict().items() if torch.is_tensor(v)}
    start = {k: v.detach().clone() for k, v in trainer.bundle.reference.state_dict().items() if torch.is_tensor(v)}
    return {"weights": weights, "start": start, "history": trainer.metrics.history}
