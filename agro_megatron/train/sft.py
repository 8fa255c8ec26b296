"""Supervised warm-up on reference solutions: the paper's RL starts from an SFT model (AGRO.md sec. 5).

Cross-entropy on the response tokens only, through the same megatron schedule and vocab-parallel
op as the RL loss. The result is saved as a model checkpoint that becomes the RL run's reference.
"""
from __future__ import annotations

import random


from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.train.pipeline import make_micro_batches, run_micro_batches


def run_sft(ctx, bundle) -> list[float]:
    """Train `bundle` for cfg.sft.steps on (prompt, solution) pairs; return the loss per step."""
    from agro_megatron.data import encode_sft_example

    cfg = ctx.cfg
    s = cfg.sft
    per_rank = max(1, s.batch_size // ctx.dp_size)
    examples = []
    for p in ctx.train_problems:
        prompt, response = encode_sft_example(p, ctx.tokenizer, system_prompt=ctx.system_prompt)
        examples.append((prompt, response))
    losses = []
    progress = ctx.progress(s.steps, desc="SFT")
    for step in range(s.steps):
        rng = random.Random(f"{cfg.train.seed}:sft:{step}")
        idx = [rng.randrange(len(examples)) for _ in range(per_rank * ctx.dp_size)]
        idx = idx[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        plens = [len(examples[i][0]) for i in idx]
        mbs = make_micro_batches(seqs, plens, pad_id=ctx.pad_id, max_tokens=cfg.train.micro_batch_tokens,
                                 uniform=ctx.pp > 1)
        total_tokens = float(sum(len(x) - p for x, p in zip(seqs, plens)))

        def loss_fn(logits, mb):
            st = vocab_parallel_logprobs(logits, mb.labels.to(logits.device), compute_entropy=False,
                                         vocab_size=ctx.arch.vocab_size)
            loss = -(st.logprobs * mb.loss_mask.to(logits.device)).sum() / total_tokens
            return loss, {"loss": loss.detach()}

        bundle.policy.zero_grad_buffer()
        bundle.optimizer.zero_grad()
        stats = run_micro_batches(bundle.policy, mbs, loss_fn, forward_only=False)
        bundle.optimizer.step()
        bundle.scheduler.step(increment=1)
        loss = sum(float(x["loss"]) for x in stats) if stats else float("nan")
        losses.append(loss)
        progress.update(1)
        if stats:
            progress.set_postfix(loss=f"{loss:.3f}")
    progress.close()
    return losses
