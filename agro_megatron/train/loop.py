"""The AGRO training loop (AGRO.md sec. 2, 3, 5), one readable class.

    prompts -> rollouts (engine) -> rewards -> log-probs of policy and reference (one paired,
    forward-only pass) -> advantages (losses/) -> surrogate loss through megatron's schedule ->
    optimizer -> weight sync -> metrics, checkpoints

The loop knows nothing of how a loss is computed (losses/) or how TP/PP move tensors (pipeline.py,
ops/); it only moves batches between them.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time

import torch
import torch.distributed as dist

from agro_megatron import losses
from agro_megatron.config import JobConfig
from agro_megatron.ops import vocab_parallel_logprobs
from agro_megatron.ops.context_parallel import gather_strided_objects
from agro_megatron.train import state as ckpt
from agro_megatron.train.context import RunContext
from agro_megatron.train.metrics import MetricsLogger
from agro_megatron.train.pipeline import make_micro_batches, run_micro_batches, scatter_rows
from agro_megatron.train.rollouts import (OfflineDataset, ReplayMixer, StepSamples, generate_samples,
                                          prompt_indices)


class StopRequested(Exception):
    pass


class Trainer:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg: JobConfig = ctx.cfg
        self.step = 0
        self.bad_steps = 0
        self.stop_signal = False
        self.replay = ReplayMixer(self.cfg.algorithm.replay_capacity, self.cfg.algorithm.replay_p) \
            if self.cfg.algorithm.regime == "replay" else None
        self.offline = None
        self.stale_snapshots: list[dict] = []   # regime=stale: weights of the last k versions
        self.metrics = MetricsLogger(ctx.log_dir, enabled=ctx.is_logging_rank,
                                     tensorboard=self.cfg.logging.tensorboard)

    # ------------------------------------------------------------------ signals and checkpoints
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _any_rank_stopping(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def rank_state(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "rng": ckpt.rng_state(),
                "scheduler": self.ctx.bundle.scheduler.state_dict(),
                "replay": self.replay.buffer.state_dict() if self.replay else None,
                "stale": self.stale_snapshots, "metrics": self.metrics.history}

    def save(self) -> str:
        return ckpt.save_checkpoint(self.ctx.ckpt_dir, self.step, model=self.ctx.bundle.module,
                                    optimizer=self.ctx.bundle.optimizer, rank_state=self.rank_state(),
                                    keep_last=self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> bool:
        c = self.cfg.checkpoint
        if c.resume == "never":
            return False
        path = ckpt.latest_checkpoint(self.ctx.ckpt_dir) if c.resume == "auto" else c.resume
        if not path:
            return False
        st = ckpt.load_checkpoint(path, model=self.ctx.bundle.module, optimizer=self.ctx.bundle.optimizer)
        self.step, self.bad_steps = st["step"], st["bad_steps"]
        self.ctx.bundle.scheduler.load_state_dict(st["scheduler"])
        if self.replay and st["replay"]:
            self.replay.buffer.load_state_dict(st["replay"])
        self.stale_snapshots = st["stale"]
        self.metrics.restore(st["metrics"])
        ckpt.set_rng_state(st["rng"])
        # the engine was built from the starting weights: a vLLM engine holds its own copy
        self.ctx.engine.update_weights(self.ctx.bundle.module)
        self.ctx.print(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ data
    def _prompts_for_step(self, step: int):
        c, ctx = self.cfg, self.ctx
        idx = prompt_indices(len(ctx.train_problems), c.train.prompts_per_step, step, c.train.seed,
                             ctx.dp_rank, ctx.dp_size)
        probs = [ctx.train_problems[i] for i in idx]
        return [p.id for p in probs], [ctx.encode_prompt(p) for p in probs], [p.answer for p in probs]

    def collect(self, step: int, timings: dict | None = None) -> StepSamples:
        """This step's samples; `timings` gets the reward-scoring seconds ("reward_s")."""
        c, ctx = self.cfg, self.ctx
        regime = c.algorithm.regime
        if regime == "offline":
            if self.offline is None:
                self.offline = OfflineDataset(ctx.offline_path)
            return self.offline.batch(step, c.train.prompts_per_step, c.train.seed, ctx.dp_rank, ctx.dp_size)
        ids, prompts, answers = self._prompts_for_step(step)
        rank_key = (c.train.seed, step, ctx.dp_rank) + ((ctx.cp_rank,) if ctx.cp_size > 1 else ())
        params = ctx.sampling_params(seed=hash(rank_key) % (2 ** 31))
        engine = ctx.engine
        behind = 0
        if regime == "stale" and c.algorithm.staleness > 0 and len(self.stale_snapshots) > 1:
            behind = len(self.stale_snapshots) - 1  # snapshots[-1] is the current policy
            ctx.behaviour_model.load_state_dict(self.stale_snapshots[0], strict=False)
            # One engine (vLLM allows one sleep-mode engine per process): it samples this step
            # from the old weights, and the step's update_weights gives it the policy back.
            engine.update_weights(ctx.behaviour_model)
        # Context parallel ranks hold the same weights: each samples every cp-th prompt, then all
        # of them get the whole batch.
        share = slice(ctx.cp_rank, None, ctx.cp_size)
        samples = generate_samples(engine, prompts[share], answers[share], c.rollout.n, params, ctx.reward_fn,
                                   ctx.tokenizer, version=step - behind, timings=timings)
        if ctx.cp_size > 1:
            from megatron.core import parallel_state as ps

            samples = gather_strided_objects(samples, ps.get_context_parallel_group())
        on_policy = torch.full((len(prompts), c.rollout.n), behind == 0, dtype=torch.bool)
        batch = StepSamples(ids, prompts, answers, samples, on_policy)
        if regime == "replay":
            batch = self.replay.mix(batch, c.train.seed, step)
        return batch

    # ------------------------------------------------------------------ log-probs and advantages
    def _sequences(self, batch: StepSamples):
        seqs, plens = [], []
        for prompt, row in zip(batch.prompts, batch.samples):
            for s in row:
                seqs.append(list(prompt) + list(s.token_ids))
                plens.append(len(prompt))
        return seqs, plens

    def _micro_batches(self, seqs, plens):
        return make_micro_batches(seqs, plens, pad_id=self.ctx.pad_id, max_tokens=self.cfg.train.micro_batch_tokens,
                                  uniform=self.ctx.pp > 1)

    def score_sequences(self, batch: StepSamples):
        """Per-token log pi, log pi_ref, full-vocab KL and entropy of every response token: [P, n, T]."""
        T, V = self.cfg.rollout.temperature, self.ctx.arch.vocab_size
        seqs, plens = self._sequences(batch)
        mbs = self._micro_batches(seqs, plens)

        def loss_fn(logits, mb):
            pol, ref = logits
            labels = mb.labels.to(pol.device)
            st = vocab_parallel_logprobs(pol, labels, ref_logits=ref, temperature=T, vocab_size=V)
            ref_lp = vocab_parallel_logprobs(ref, labels, temperature=T, compute_entropy=False,
                                             vocab_size=V).logprobs
            out = {"logp": st.logprobs, "ref_logp": ref_lp, "kl": st.kl, "entropy": st.entropy}
            return torch.zeros((), device=pol.device), out

        model = self.ctx.paired_model()
        with torch.no_grad():
            stats = run_micro_batches(model, mbs, loss_fn, forward_only=True, paired=True)
        if not self.ctx.is_last_stage:
            return None
        L = max(len(s) for s in seqs)
        rows = {k: scatter_rows(stats, mbs, k, len(seqs), L) for k in ("logp", "ref_logp", "kl", "entropy")}
        return self._to_response_layout(batch, rows, plens)

    def _to_response_layout(self, batch, rows, plens):
        P, n = len(batch.samples), len(batch.samples[0])
        Tmax = max(len(s.token_ids) for row in batch.samples for s in row)
        Tmax = max(Tmax, 1)
        out = {k: torch.zeros(P, n, Tmax, dtype=torch.float64) for k in rows}
        mask = torch.zeros(P, n, Tmax, dtype=torch.float64)
        k = 0
        for p in range(P):
            for i in range(n):
                T_i = len(batch.samples[p][i].token_ids)
                s = plens[k] - 1
                for key, v in rows.items():
                    out[key][p, i, :T_i] = v[k, s:s + T_i].double()
                mask[p, i, :T_i] = 1.0
                k += 1
        out["mask"] = mask
        return out

    def advantages(self, batch: StepSamples, tok: dict):
        a = self.cfg.algorithm
        pd, lr = losses.token_advantages(
            a.estimator, batch.rewards, tok["logp"], tok["ref_logp"], tok["mask"], a.beta,
            token_estimator=a.token_estimator, token_kl=tok["kl"], lr_baseline=a.lr_baseline,
            lr_coef=a.lr_coef, logratio_reduction=a.logratio_reduction, on_policy=batch.on_policy,
            return_parts=True)
        return pd + lr, pd, lr

    # ------------------------------------------------------------------ one optimizer step
    def train_on(self, batch: StepSamples, adv: torch.Tensor | None) -> dict:
        a, ctx = self.cfg.algorithm, self.ctx
        T, V = self.cfg.rollout.temperature, self.ctx.arch.vocab_size
        seqs, plens = self._sequences(batch)
        mbs = self._micro_batches(seqs, plens)
        P, n = len(batch.samples), len(batch.samples[0])
        num_seqs = P * n
        if ctx.is_last_stage:
            flat = adv.reshape(num_seqs, -1)
            for mb in mbs:
                A = torch.zeros(mb.tokens.shape, dtype=torch.float32)
                for j, row in enumerate(mb.index.tolist()):
                    if row < 0:
                        continue
                    s, T_i = plens[row] - 1, len(seqs[row]) - plens[row]
                    A[j, s:s + T_i] = flat[row, :T_i].float()
                mb.extra["adv"] = A
        paired = a.estimator == "kl_pg"

        def loss_fn(logits, mb):
            pol, ref = logits if paired else (logits, None)
            labels = mb.labels.to(pol.device)
            st = vocab_parallel_logprobs(pol, labels, ref_logits=ref, temperature=T,
                                         compute_entropy=False, vocab_size=V)
            rows = (mb.index >= 0).to(pol.device)  # drop the padding rows of uniform micro-batches
            mask = mb.loss_mask.to(pol.device)[rows]
            # Each sequence is its own "group of 1" here: advantages were computed on whole prompt
            # groups beforehand; num_prompts = all local sequences gives the global 1/(n*P) scaling.
            loss = losses.surrogate_loss(
                st.logprobs[rows].unsqueeze(1), mb.extra["adv"].to(pol.device)[rows].unsqueeze(1),
                mask.unsqueeze(1), num_prompts=num_seqs,
                kl_pg_token_kl=st.kl[rows].unsqueeze(1) if paired else None,
                beta=a.beta if paired else None, logratio_reduction=a.logratio_reduction,
                response_lengths=mb.response_lengths.to(pol.device)[rows].unsqueeze(1))
            return loss, {"loss": loss.detach()}

        b = ctx.bundle
        b.policy.zero_grad_buffer()
        b.optimizer.zero_grad()
        model = ctx.paired_model() if paired else b.policy
        stats = run_micro_batches(model, mbs, loss_fn, forward_only=False, paired=paired)
        loss = torch.tensor([sum(float(s["loss"]) for s in stats)]) if stats else torch.zeros(1)
        bad = torch.tensor([0.0 if math.isfinite(float(loss)) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            b.optimizer.zero_grad()
            return {"loss": float("nan"), "skipped": 1.0}
        ok, grad_norm, _ = b.optimizer.step()
        b.scheduler.step(increment=1)
        return {"loss": float(loss), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c, ctx = self.cfg, self.ctx
        self.install_signal_handlers()
        total = c.train.steps
        progress = ctx.progress(total, initial=self.step, desc="AGRO")
        while self.step < total:
            t0 = time.perf_counter()
            if c.algorithm.regime == "stale" and c.algorithm.staleness > 0:
                # host copies: k policy versions must not cost k models of accelerator memory
                self.stale_snapshots.append({k: v.detach().to("cpu", copy=True)
                                             for k, v in ctx.bundle.module.state_dict().items()
                                             if torch.is_tensor(v)})
                self.stale_snapshots = self.stale_snapshots[-c.algorithm.staleness - 1:]
            timings = {}
            batch = self.collect(self.step, timings)
            # Training starts: the engine releases its memory until update_weights wakes it.
            ctx.engine.sleep()
            t_rollout = time.perf_counter()
            # scoring is timed inside collect; the rest (generation, reading offline data, replay
            # mixing, gathering over CP) counts as rollout time
            reward_s = timings.get("reward_s", 0.0)
            rewards = batch.rewards
            reward_bad = not torch.isfinite(rewards).all()
            tok = self.score_sequences(batch) if not reward_bad else None
            t_logprob = time.perf_counter()
            step_metrics = {}
            # Non-finite reward: skip the step on every rank (one rank's NaN stops all of them).
            flag = torch.tensor([1.0 if reward_bad else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                out = {"loss": float("nan"), "skipped": 1.0}
                t_train = time.perf_counter()
            else:
                adv = pd = lr = None
                if ctx.is_last_stage:
                    adv, pd, lr = self.advantages(batch, tok)
                first_adv = adv  # the metrics describe the advantages of the fresh batch
                for epoch in range(c.algorithm.epochs_per_batch):
                    if epoch:
                        # After an update the batch is off-policy: re-score it under the current
                        # policy (R_pi depends on log pi) and drop agro_on's likelihood-ratio term.
                        stale = dataclasses.replace(batch, on_policy=torch.zeros_like(batch.on_policy))
                        tok_now = self.score_sequences(stale)
                        if ctx.is_last_stage:
                            adv, _, _ = self.advantages(stale, tok_now)
                    out = self.train_on(batch, adv)
                    if out["skipped"]:
                        break
                t_train = time.perf_counter()
                if ctx.is_last_stage and tok is not None:
                    step_metrics = self._step_metrics(batch, tok, first_adv, pd, lr)
            ctx.engine.update_weights(ctx.bundle.module)
            t_sync = time.perf_counter()
            if out["skipped"]:
                self.bad_steps += 1
                ctx.print(f"step {self.step + 1}: non-finite loss or reward, step skipped "
                          f"({self.bad_steps} in a row)")
                if self.bad_steps >= c.train.max_bad_steps:
                    raise RuntimeError(
                        f"{self.bad_steps} consecutive steps had non-finite loss or reward; stopping. "
                        "Check the reward function and lower optim.lr, or raise train.max_bad_steps")
            else:
                self.bad_steps = 0
            n_tokens = sum(len(s.token_ids) for row in batch.samples for s in row)
            scalars = {**step_metrics, "train/loss": out["loss"], "train/grad_norm": out.get("grad_norm"),
                       "train/lr": ctx.bundle.optimizer.param_groups[0]["lr"],
                       "train/skipped": out["skipped"],
                       "time/rollout_s": t_rollout - t0 - reward_s, "time/reward_s": reward_s,
                       "time/logprob_s": t_logprob - t_rollout,
                       "time/train_s": t_train - t_logprob, "time/sync_s": t_sync - t_train,
                       "perf/tokens_per_s": n_tokens * ctx.dp_size / max(t_sync - t0, 1e-9),
                       "data/replay_fraction": 1.0 - batch.on_policy.float().mean().item()}
            self.step += 1
            self.metrics.log(self.step, scalars)
            progress.update(1)
            progress.set_postfix(reward=f"{step_metrics.get('train/reward_mean', float('nan')):.3f}",
                                 kl=f"{step_metrics.get('train/kl_full_vocab', float('nan')):.3f}")
            if c.eval.every and self.step % c.eval.every == 0 and self.step < total:
                self.metrics.log(self.step, ctx.evaluate(prefix="eval"))
            stopping = self._any_rank_stopping()
            if stopping or (c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0):
                path = self.save()
                ctx.print(f"saved checkpoint {path}")
            if stopping:
                progress.close()
                raise StopRequested(f"stopped by signal at step {self.step}; checkpoint saved")
        progress.close()
        return {"steps": self.step}

    def _step_metrics(self, batch, tok, adv, pd, lr) -> dict:
        """Per-step statistics, averaged over data-parallel ranks."""
        from agro_megatron.train.pipeline import all_reduce_dp

        mask = tok["mask"]
        ntok = mask.sum().clamp_min(1)
        seq_kl = (tok["logp"] - tok["ref_logp"]).mul(mask).sum(-1)
        r = batch.rewards
        vals = torch.tensor([
            r.mean(), (r > 0.5).double().mean(), r.std(), mask.sum(-1).mean(), seq_kl.mean(),
            (tok["kl"] * mask).sum(-1).mean(), (tok["entropy"] * mask).sum() / ntok,
            (adv * mask).sum() / ntok, ((adv * mask) ** 2).sum().div(ntok).sqrt(),
            pd.mul(mask).pow(2).sum().sqrt(), lr.mul(mask).pow(2).sum().sqrt(),
        ], dtype=torch.float64)
        vals = all_reduce_dp(vals) / self.ctx.dp_size
        keys = ["train/reward_mean", "train/accuracy", "train/reward_std", "train/response_length",
                "train/kl", "train/kl_full_vocab", "train/entropy", "train/advantage_mean",
                "train/advantage_rms", "train/pd_term_norm", "train/lr_term_norm"]
        return dict(zip(keys, vals.tolist()))
