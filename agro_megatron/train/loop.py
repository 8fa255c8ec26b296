"""The training loop, one readable class. One step:

    samples (the sample source) -> the engine sleeps -> per-token log-probs of policy and reference
    (one paired, forward-only pass) -> advantages (the objective) -> the objective's loss through
    megatron's schedule -> optimizer -> the source's after-step hook -> weight sync into the engine

The Trainer is handed its objective (losses/objective.py) and its sample source (sources/): it
never names an estimator or a regime. Rows and micro-batches are train/layout.py's; the schedule
is train/pipeline.py's; what a checkpoint holds is declared by the components (train/state.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time

import torch
import torch.distributed as dist

from agro_megatron.losses.objective import Objective, TokenStats
from agro_megatron.ops import output_logprobs
from agro_megatron.sources.base import SampleSource, StepSamples
from agro_megatron.train.context import Evaluator, RunContext
from agro_megatron.train.layout import SequenceLayout
from agro_megatron.train.metrics import MetricsLogger, batch_metrics
from agro_megatron.train.model_setup import PolicyBundle
from agro_megatron.train.pipeline import PolicyWithReference, all_reduce_dp, run_micro_batches
from agro_megatron.train.state import CheckpointManager, RNGState


class StopRequested(Exception):
    pass


@dataclasses.dataclass
class TrainProgress:
    """Steps done, and consecutive steps skipped for a non-finite loss or reward."""

    step: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_steps = state["step"], state["bad_steps"]


class PhaseTimer:
    """Wall seconds per phase of a step (`with timer("rollout"): ...`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


class Trainer:
    def __init__(self, context: RunContext, *, bundle: PolicyBundle, engine, objective: Objective,
                 source: SampleSource, evaluator: Evaluator):
        self.context, self.cfg = context, context.cfg
        self.bundle, self.engine, self.objective, self.source, self.evaluator = bundle, engine, objective, source, evaluator
        self.paired_model = PolicyWithReference(bundle.policy, bundle.reference)
        self.progress = TrainProgress()
        self.stop_signal = False
        self.metrics = MetricsLogger(context.log_dir, enabled=context.layout.is_logging_rank,
                                     tensorboard=self.cfg.logging.tensorboard)
        self.checkpoints = CheckpointManager(
            context.ckpt_dir, model=bundle.module, optimizer=bundle.optimizer, keep_last=self.cfg.checkpoint.keep_last,
            states={"progress": self.progress, "scheduler": bundle.scheduler, "source": source,
                    "metrics": self.metrics, "rng": RNGState()})

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c = self.cfg
        self._install_signal_handlers()
        bar = self.context.progress(c.train.steps, initial=self.progress.step, desc="AGRO")
        while self.progress.step < c.train.steps:
            t0 = time.perf_counter()
            scalars = {**self.train_step(self.progress.step), "time/step_s": time.perf_counter() - t0}
            self.progress.step += 1
            step = self.progress.step
            self.metrics.log(step, scalars)
            bar.update(1)
            bar.set_postfix(reward=f"{scalars.get('train/reward_mean', float('nan')):.3f}",
                            kl=f"{scalars.get('train/kl_full_vocab', scalars.get('train/kl', float('nan'))):.3f}")
            if c.eval.every and step % c.eval.every == 0 and step < c.train.steps:
                self.metrics.log(step, self.evaluator.evaluate(prefix="eval", step=step))
            stopping = self._any_rank(self.stop_signal)
            if stopping or (c.checkpoint.save_every and step % c.checkpoint.save_every == 0):
                t0 = time.perf_counter()
                self.context.print(f"saved checkpoint {self.save()}")
                self.metrics.log(step, {"time/checkpoint_s": time.perf_counter() - t0})
            if stopping:
                bar.close()
                raise StopRequested(f"stopped by signal at step {step}; checkpoint saved")
        bar.close()
        return {"steps": self.progress.step}

    def train_step(self, step: int) -> dict:
        """One rollout batch and its optimizer step(s); returns the step's scalars."""
        timer, timings, train_state = PhaseTimer(), {}, self.bundle.train_state
        train_state.offload()                      # the engine generates: training state off the device
        with timer("rollout"):
            batch = self.source.next_batch(step, timings)
        self.engine.sleep()                        # training starts: the engine releases its memory
        train_state.restore()
        layout = SequenceLayout(batch.prompts, batch.responses, pad_id=self.context.data.pad_id,
                                max_tokens=self.cfg.train.micro_batch_tokens, uniform=self.context.layout.pp > 1)
        stats = adv = None
        if self._any_rank(not torch.isfinite(batch.rewards).all()):
            out = {"loss": float("nan"), "skipped": 1.0}   # one rank's NaN reward skips the step everywhere
        else:
            with timer("logprob"):
                stats = self.token_stats(layout, batch)
            with timer("train"):
                out, adv = self.optimize(batch, layout, stats)
        train_state.offload()
        with timer("sync"):
            self.source.after_step(self.bundle.module)
            self.engine.update_weights(self.bundle.module)
        self._count_bad_step(out, step)
        return {**self._step_metrics(batch, stats, adv), **self._phase_metrics(batch, timer, timings),
                "train/loss": out["loss"], "train/grad_norm": out.get("grad_norm"), "train/skipped": out["skipped"],
                "train/lr": self.bundle.optimizer.param_groups[0]["lr"]}

    def optimize(self, batch: StepSamples, layout: SequenceLayout, stats: TokenStats | None):
        """`epochs_per_batch` optimizer steps on one batch. After the first the samples are no
        longer the current policy's: their statistics are recomputed and they count as off-policy.
        Returns the last step's result and the fresh batch's advantages (None off the last stage)."""
        objective, paired = self.objective, self.objective.needs_reference_logits
        model = self.paired_model if paired else self.bundle.policy
        loss_fn = objective.loss_function(layout.num_sequences)
        first = None
        for epoch in range(self.cfg.algorithm.epochs_per_batch):
            if epoch:
                batch = batch.after_update()
                stats = self.token_stats(layout, batch)
            if self.context.layout.is_last_stage:
                adv = objective.advantages(batch.rewards, batch.on_policy, stats)
                layout.place("advantages", adv.total)
                first = adv if first is None else first
            out = self.bundle.optimizer_step(model, layout.micro_batches, loss_fn, paired=paired,
                                             fused_output=self.cfg.train.fused_output)
            if out["skipped"]:
                break
        return out, first

    @torch.no_grad()
    def token_stats(self, layout: SequenceLayout, batch: StepSamples) -> TokenStats | None:
        """log pi, log pi_ref, full-vocabulary KL and entropy at every response token, [P, n, T];
        None on ranks without logits. One forward pass of the policy and the reference, paired --
        or, with `train.logprobs=engine` and a batch drawn entirely from the current policy, the
        engine's log pi and a forward pass of the reference alone (config.py says what it trades)."""
        if self.cfg.train.logprobs == "engine" and bool(batch.on_policy.all()):
            return self._reference_stats(layout, batch)
        temperature, vocab = self.cfg.rollout.temperature, self.context.arch.vocab_size

        def stats_fn(outputs, mb):  # logits shards, or HiddenStates under train.fused_output
            policy, reference = outputs
            labels = mb.labels.to(policy.device)
            st = output_logprobs(policy, labels, reference, temperature=temperature, vocab_size=vocab)
            ref = output_logprobs(reference, labels, temperature=temperature, compute_entropy=False,
                                  vocab_size=vocab)
            return torch.zeros((), device=policy.device), {"logprobs": st.logprobs, "ref_logprobs": ref.logprobs,
                                                           "kl": st.kl, "entropy": st.entropy}

        per_mb = run_micro_batches(self.paired_model, layout.micro_batches, stats_fn, forward_only=True, paired=True,
                                   fused_output=self.cfg.train.fused_output)
        if not self.context.layout.is_last_stage:
            return None
        keys = ("logprobs", "ref_logprobs", "kl", "entropy")
        return TokenStats(**{k: layout.to_responses(per_mb, k) for k in keys}, mask=layout.response_mask())

    def _reference_stats(self, layout: SequenceLayout, batch: StepSamples) -> TokenStats | None:
        """TokenStats with log pi from the engine (the samples' behaviour log-probs, which are the
        current policy's) and log pi_ref from one forward pass of the reference; no full-vocabulary
        KL or entropy."""
        temperature, vocab = self.cfg.rollout.temperature, self.context.arch.vocab_size

        def stats_fn(output, mb):
            ref = output_logprobs(output, mb.labels.to(output.device), temperature=temperature,
                                  compute_entropy=False, vocab_size=vocab)
            return torch.zeros((), device=output.device), {"ref_logprobs": ref.logprobs}

        per_mb = run_micro_batches(self.bundle.reference, layout.micro_batches, stats_fn, forward_only=True,
                                   fused_output=self.cfg.train.fused_output)
        if not self.context.layout.is_last_stage:
            return None
        engine = layout.from_samples([[s.logprobs for s in row] for row in batch.samples])
        return TokenStats(logprobs=engine, ref_logprobs=layout.to_responses(per_mb, "ref_logprobs"),
                          kl=None, entropy=None, mask=layout.response_mask())

    # ------------------------------------------------------------------ metrics
    def _step_metrics(self, batch, stats, adv) -> dict:
        """Batch and objective statistics, averaged over data-parallel ranks (last stage only)."""
        if stats is None or adv is None:
            return {}
        named = {**batch_metrics(batch.rewards, stats), **self.objective.metrics(adv, stats.mask)}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in named.values()])
        values = all_reduce_dp(values) / self.context.layout.dp
        return dict(zip(named, values.tolist()))

    def _phase_metrics(self, batch, timer: PhaseTimer, timings: dict) -> dict:
        s = timer.seconds
        reward = timings.get("reward_s", 0.0)   # rewarding happens inside the rollout phase
        step_s = sum(s.values())
        tokens = sum(len(x.token_ids) for row in batch.samples for x in row)
        return {"time/rollout_s": s["rollout"] - reward, "time/reward_s": reward,
                "time/logprob_s": s.get("logprob", 0.0), "time/train_s": s.get("train", 0.0),
                "time/sync_s": s["sync"], "perf/tokens_per_s": tokens * self.context.layout.dp / max(step_s, 1e-9),
                "data/replay_fraction": 1.0 - batch.on_policy.float().mean().item()}

    def _count_bad_step(self, out: dict, step: int) -> None:
        if not out["skipped"]:
            self.progress.bad_steps = 0
            return
        self.progress.bad_steps += 1
        self.context.print(f"step {step + 1}: non-finite loss or reward, step skipped "
                       f"({self.progress.bad_steps} in a row)")
        if self.progress.bad_steps >= self.cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{self.progress.bad_steps} consecutive steps had non-finite loss or reward; stopping. "
                "Check the reward function and lower optim.lr, or raise train.max_bad_steps")

    # ------------------------------------------------------------------ signals and checkpoints
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def save(self) -> str:
        with self.bundle.train_state.resident():
            return self.checkpoints.save(self.progress.step)

    def maybe_resume(self) -> bool:
        c = self.cfg.checkpoint
        if c.resume == "never":
            return False
        with self.bundle.train_state.resident():
            if c.resume == "auto":  # the newest intact checkpoint (damaged newer ones are reported and skipped)
                path = self.checkpoints.load_newest()
            else:
                path = c.resume
                self.checkpoints.load(path)
        if not path:
            return False
        self.engine.update_weights(self.bundle.module)  # a vLLM engine still holds the starting weights
        self.context.print(f"resumed from {path} at step {self.progress.step}")
        return True
