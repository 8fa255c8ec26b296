"""Time per optimizer step of agro_on vs rloo on the same rollouts (tiny model, CPU).

Both estimators share everything but the advantage formula, so the ratio measures the overhead
of AGRO's likelihood-ratio term. One rollout batch is generated and its log-probs computed once;
then `Trainer.optimize` (the objective's advantages + one optimizer step) is timed for each
estimator's Objective, interleaved, median of several repetitions. Last line:
`agro_over_rloo=<ratio>` (target <= 1.05).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from agro_megatron.testing.distributed import run_distributed


def _bench(log_dir: str, reps: int) -> dict:
    import dataclasses

    from agro_megatron.losses.objective import Objective
    from agro_megatron.testing.train_checks import length_reward, tiny_config
    from agro_megatron.train.layout import SequenceLayout
    from agro_megatron.train.loop import Trainer
    from agro_megatron.train.run import setup_job

    cfg = tiny_config(log_dir, **{
        "model.tiny": "{hidden_size: 128, intermediate_size: 384, num_layers: 4, num_heads: 4, "
                      "num_kv_heads: 2, head_dim: 32}",
        "train.prompts_per_step": 16, "rollout.n": 4, "rollout.max_new_tokens": 32})
    run, parts = setup_job(cfg, reward_fn=length_reward)
    trainer = Trainer(run, bundle=parts.bundle, engine=parts.engine, objective=parts.objective,
                      source=parts.source, evaluator=parts.evaluator)
    batch = parts.source.next_batch(0, {})
    layout = SequenceLayout(batch.prompts, batch.responses, pad_id=run.data.pad_id,
                            max_tokens=cfg.train.micro_batch_tokens, uniform=False)
    stats = trainer.token_stats(layout, batch)
    objectives = {est: Objective(dataclasses.replace(cfg.algorithm, estimator=est), temperature=cfg.rollout.temperature,
                                 vocab_size=run.arch.vocab_size) for est in ("agro_on", "rloo")}
    times = {"agro_on": [], "rloo": []}
    for rep in range(reps + 1):
        for est, objective in objectives.items():
            trainer.objective = objective
            t0 = time.perf_counter()
            trainer.optimize(batch, layout, stats)
            if rep:  # the first round warms up allocators and caches
                times[est].append(time.perf_counter() - t0)
    ntok = sum(len(s.token_ids) for row in batch.samples for s in row)
    parts.engine.close()
    return {"times": times, "tokens": ntok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = run_distributed(_bench, 1, args=(d, args.reps))[0]
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    print(f"rollout batch: 16 prompts x 4 responses, {res['tokens']} response tokens")
    for k, v in med.items():
        print(f"{k:8s} median step {v * 1000:.1f} ms  (runs: {', '.join(f'{x * 1000:.0f}' for x in res['times'][k])})")
    print(f"agro_over_rloo={med['agro_on'] / med['rloo']:.3f}")


if __name__ == "__main__":
    main()
