"""Supervised warm-up on reference solutions: the paper's RL starts from an SFT model (docs/algorithm.md §7).

Cross-entropy on the response tokens only, through the same megatron schedule and vocab-parallel
op as the RL loss. The result is saved as a model checkpoint that becomes the RL run's reference.
"""
from __future__ import annotations

import random


from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.train.layout import make_micro_batches


def run_sft(run, bundle) -> list[float]:
    """Train `bundle` for cfg.sft.steps on (prompt, solution) pairs; return the loss per step."""
    from agro_megatron.data import encode_sft_example

    cfg, layout, data = run.cfg, run.layout, run.data
    s = cfg.sft
    per_rank = max(1, s.batch_size // layout.dp)
    examples = [encode_sft_example(p, data.tokenizer, system_prompt=data.system_prompt) for p in data.train_problems]
    losses = []
    progress = run.progress(s.steps, desc="SFT")
    for step in range(s.steps):
        rng = random.Random(f"{cfg.train.seed}:sft:{step}")
        idx = [rng.randrange(len(examples)) for _ in range(per_rank * layout.dp)]
        idx = idx[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        plens = [len(examples[i][0]) for i in idx]
        mbs = make_micro_batches(seqs, plens, pad_id=data.pad_id, max_tokens=cfg.train.micro_batch_tokens,
                                 uniform=layout.pp > 1)
        total_tokens = float(sum(len(x) - p for x, p in zip(seqs, plens)))

        def loss_fn(logits, mb):
            st = vocab_parallel_logprobs(logits, mb.labels.to(logits.device), compute_entropy=False,
                                         vocab_size=run.arch.vocab_size)
            loss = -(st.logprobs * mb.loss_mask.to(logits.device)).sum() / total_tokens
            return loss, {"loss": loss.detach()}

        out = bundle.optimizer_step(bundle.policy, mbs, loss_fn)  # skips a non-finite step, like RL's
        losses.append(out["loss"])
        progress.update(1)
        progress.set_postfix(loss=f"{out['loss']:.3f}")
    progress.close()
    return losses
