"""Worker for the product-path test: HF checkpoint -> agro-convert -> agro-train -> export."""
from __future__ import annotations


def train_from_converted(ckpt_dir: str, log_dir: str, tp: int) -> dict:
    from agro_megatron.testing.train_checks import length_reward, tiny_config
    from agro_megatron.train.run import run_job

    cfg = tiny_config(log_dir, **{"model.megatron_checkpoint": ckpt_dir, "parallel.tp": tp, "train.steps": 2,
                                  "checkpoint.save_every": 0})
    start = None
    result = run_job(cfg, reward_fn=length_reward)
    trainer = result.pop("trainer")
    return {"final_model": result["final_model"], "steps": result["steps"],
            "losses": [r["train/loss"] for r in trainer.metrics.history if "train/loss" in r], "start": start}
