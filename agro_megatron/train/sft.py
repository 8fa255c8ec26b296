"""Supervised warm-up on reference solutions: the paper's RL starts from an SFT model (docs/algorithm.md §7).

Cross-entropy on the response tokens only, through the same megatron schedule and vocab-parallel
op as the RL loss. The result is saved as a model checkpoint that becomes the RL run's reference.

SIGTERM / SIGUSR1 (a Slurm preemption, `scancel --signal`) stop it after the current step with a
trainer checkpoint of the SFT state (model, optimizer, LR schedule, step, losses, RNG) in
<checkpoint dir>/sft; the next run of the same command resumes from it and ends with the same
model as an uninterrupted SFT. It is deleted once the SFT model is saved.
"""
from __future__ import annotations

import os
import random
import shutil
import signal

import torch
import torch.distributed as dist

from agro_megatron.checkpoint.atomic import fault_point
from agro_megatron.train.loop import StopRequested
from agro_megatron.train.state import CheckpointManager, RNGState

from agro_megatron.ops import output_logprobs
from agro_megatron.train.layout import make_micro_batches


def sft_examples(run) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every training problem, checked before any model is built.

    The prompts were held to data.max_prompt_tokens when the data loaded; a prompt + reference
    solution longer than the model's context (max_position_embeddings) is rejected here with the
    rows' locations, instead of being trained on (a 1 MB solution would take many minutes a step).
    """
    from agro_megatron.config import ConfigError
    from agro_megatron.data import encode_sft_example

    data, limit = run.data, run.arch.max_position_embeddings
    examples = [encode_sft_example(p, data.tokenizer, system_prompt=data.system_prompt) for p in data.train_problems]
    long = [(p.meta.get("where", p.id), len(a) + len(b))
            for p, (a, b) in zip(data.train_problems, examples) if len(a) + len(b) > limit]
    if long:
        rows = ", ".join(f"{where} ({n} tokens)" for where, n in long[:5]) + (" ..." if len(long) > 5 else "")
        raise ConfigError(f"data.train: {len(long)} row(s) are longer than the model's context of {limit} tokens "
                           f"as prompt + reference solution for SFT: {rows}; shorten or remove them, or set "
                           "sft.steps=0 to skip the SFT warm-up")
    return examples


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 only set a flag (`requested()` asks every rank); the
    previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.flag, self._old = False, {}

    def __enter__(self) -> "StopSignals":
        def handler(signum, frame):
            self.flag = True

        self._old = {sig: signal.signal(sig, handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        """Whether any rank got a signal (collective: call on every rank at the same point)."""
        t = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class SFTProgress:
    """Steps done and their losses: the part of an interrupted SFT's state that is not the model,
    the optimizer, the LR schedule or the RNG."""

    def __init__(self):
        self.step, self.losses = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses = state["step"], list(state["losses"])


def sft_checkpoint_dir(run) -> str:
    return os.path.join(run.ckpt_dir, "sft")


def discard_sft_checkpoints(run) -> None:
    """Delete the interrupted SFT's checkpoints once the SFT model is saved (rank 0; it supersedes them)."""
    if dist.get_rank() == 0:
        shutil.rmtree(sft_checkpoint_dir(run), ignore_errors=True)


def run_sft(run, bundle, examples=None, stop: StopSignals | None = None) -> list[float]:
    """Train `bundle` for cfg.sft.steps on (prompt, solution) pairs; return the loss per step.
    `examples`: sft_examples(run), when the caller checked them before building the model.

    Resumes from <checkpoint dir>/sft when an earlier run was stopped there. With `stop` (entered):
    a signal before the last step saves the SFT state there and raises StopRequested, saying so."""
    cfg, layout, data = run.cfg, run.layout, run.data
    s = cfg.sft
    per_rank = max(1, s.batch_size // layout.dp)
    examples = sft_examples(run) if examples is None else examples
    done = SFTProgress()
    checkpoints = CheckpointManager(sft_checkpoint_dir(run), model=bundle.module, optimizer=bundle.optimizer,
                                    states={"sft": done, "scheduler": bundle.scheduler, "rng": RNGState()},
                                    keep_last=1)
    with bundle.train_state.resident():
        resumed = checkpoints.load_newest()
    if resumed:
        run.print(f"SFT resumed from {resumed} at step {done.step} of {s.steps}")
    losses = done.losses
    progress = run.progress(s.steps, initial=done.step, desc="SFT")
    for step in range(done.step, s.steps):
        rng = random.Random(f"{cfg.train.seed}:sft:{step}")
        idx = [rng.randrange(len(examples)) for _ in range(per_rank * layout.dp)]
        idx = idx[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        plens = [len(examples[i][0]) for i in idx]
        mbs = make_micro_batches(seqs, plens, pad_id=data.pad_id, max_tokens=cfg.train.micro_batch_tokens,
                                 uniform=layout.pp > 1)
        total_tokens = float(sum(len(x) - p for x, p in zip(seqs, plens)))

        def loss_fn(output, mb):  # logits shard, or HiddenStates under train.fused_output
            st = output_logprobs(output, mb.labels.to(output.device), compute_entropy=False,
                                 vocab_size=run.arch.vocab_size)
            loss = -(st.logprobs * mb.loss_mask.to(output.device)).sum() / total_tokens
            return loss, {"loss": loss.detach()}

        # skips a non-finite step, like RL's
        out = bundle.optimizer_step(bundle.policy, mbs, loss_fn, fused_output=cfg.train.fused_output)
        losses.append(out["loss"])
        done.step = step + 1
        fault_point("sft-step", f"step_{done.step:06d}")  # tests deliver signals here (inert otherwise)
        progress.update(1)
        progress.set_postfix(loss=f"{out['loss']:.3f}")
        if stop is not None and done.step < s.steps and stop.requested():
            progress.close()
            with bundle.train_state.resident():
                path = checkpoints.save(done.step)
            message = (f"SFT stopped by signal at step {done.step} of {s.steps}; its state is saved in {path} "
                       "and the same command resumes it")
            run.print(message)
            raise StopRequested(message)
    progress.close()
    return losses
