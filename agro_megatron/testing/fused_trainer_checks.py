"""Worker for tests/test_fused_output_trainer.py: whole runs with and without `train.fused_output`.

Each run goes through `train_checks.run` (run_job on the tiny config) while this module counts
which op computed the statistics and losses (`vocab_parallel_logprobs` on logits, or
`fused_output_logprobs` on hidden states), records the SFT stage's losses, and checks after the
run that no hidden-states hook is left on the policy (the sampler shares the model).
"""
from __future__ import annotations

import contextlib
import os

import torch

from agro_megatron.testing import train_checks as tc


@contextlib.contextmanager
def _observed(record: dict):
    """Count the two ops' calls inside `output_logprobs`, and keep run_sft's losses and the Trainer."""
    from agro_megatron.ops import output as out_mod
    from agro_megatron.train import loop, sft

    saved = (out_mod.vocab_parallel_logprobs, out_mod.fused_output_logprobs, sft.run_sft, loop.Trainer.run)
    calls = record.setdefault("calls", {"logits": 0, "fused": 0})

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def run_sft(run, bundle, *args, **kwargs):
        record["start"] = _state(bundle.module)  # the job's starting weights (SFT comes first)
        losses = saved[2](run, bundle, *args, **kwargs)
        record["sft_losses"] = list(losses)
        return losses

    def trainer_run(self):
        record["trainer"] = self
        record.setdefault("start", _state(self.bundle.module))
        return saved[3](self)

    out_mod.vocab_parallel_logprobs = counted("logits", saved[0])
    out_mod.fused_output_logprobs = counted("fused", saved[1])
    sft.run_sft, loop.Trainer.run = run_sft, trainer_run
    try:
        yield
    finally:
        out_mod.vocab_parallel_logprobs, out_mod.fused_output_logprobs, sft.run_sft, loop.Trainer.run = saved


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _logits_after_run(trainer) -> bool:
    """Whether the trained policy's output layer is its own again (no hidden-states hook left)."""
    from agro_megatron.models.hidden_head import returns_hidden_states

    return not returns_hidden_states(trainer.bundle.module)


def run_observed(root: str, runs: dict) -> dict:
    """`train_checks.run` for each {name: overrides} (length reward) in this process group, each in
    root/name; adds "calls" (op counts), "sft_losses" (when SFT ran), "logits_after" and
    "start_weights" to its result."""
    out = {}
    for name, overrides in runs.items():
        record: dict = {}
        with _observed(record):
            res = tc.run(os.path.join(root, name), "length_reward", overrides)
        trainer, start = record.pop("trainer", None), record.pop("start", {})
        res.update(record, logits_after=trainer is not None and _logits_after_run(trainer))
        res["start_weights"] = start  # this rank's parameters when the job's training began
        res.pop("history", None)
        out[name] = res
    return out
