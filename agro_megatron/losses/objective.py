"""The training objective of a run: one object, built from the `algorithm` config section.

It owns everything that depends on which estimator is in use (docs/algorithm.md §2-§4):

* `advantages`: the per-token advantages of a rollout batch, from its rewards and the per-token
  statistics of the log-prob pass, with the likelihood-ratio term kept only for samples drawn
  from the current policy;
* `loss_function`: the micro-batch loss the pipeline schedule calls, on this rank's vocabulary
  shard of the logits (the vocabulary is never gathered);
* `metrics`: the sizes of its terms, for the logs.

The trainer is handed an Objective and calls these three; it never names an estimator (the
anchor is torchtitan's RL loss: a configurable loss object the trainer is given).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor

from agro_megatron.losses.agro import (FULL_VOCAB_KL_TOKEN_ESTIMATORS, surrogate_loss, token_advantages,
                                      validate_algorithm)
from agro_megatron.ops import output_logprobs


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """Per-response-token statistics of a batch under the current policy and the reference,
    each [P, n, T] (T: the longest response), 0 past a response's end."""

    logprobs: Tensor       # log pi(y_t | y_<t) of the sampled token
    ref_logprobs: Tensor   # log pi_ref(y_t | y_<t)
    kl: Tensor | None      # full-vocabulary KL(pi || pi_ref) at that position (None: not measured)
    entropy: Tensor | None # full-vocabulary entropy of pi at that position (None: not measured)
    mask: Tensor           # 1 on response tokens


@dataclasses.dataclass(frozen=True)
class Advantages:
    """Per-token advantages [P, n, T] and their two parts (total = policy_gradient + likelihood_ratio)."""

    total: Tensor
    policy_gradient: Tensor    # reward minus KL penalty minus the leave-one-out baseline
    likelihood_ratio: Tensor   # agro_on's term; 0 for other estimators and for off-policy samples


class Objective:
    """`algorithm`: the AlgorithmConfig section. `temperature`: the sampling temperature the
    log-probs are taken at. `vocab_size`: the tokenizer's vocabulary (TP padding excluded)."""

    def __init__(self, algorithm, *, temperature: float, vocab_size: int):
        validate_algorithm(algorithm.estimator, algorithm.beta, token_estimator=algorithm.token_estimator,
                           ratio_baseline=algorithm.ratio_baseline,
                           logratio_reduction=algorithm.logratio_reduction)
        self.cfg = algorithm
        self.temperature = temperature
        self.vocab_size = vocab_size

    @property
    def needs_reference_logits(self) -> bool:
        """Whether the loss itself needs the reference's logits (kl_pg's differentiable KL term):
        then the schedule runs the policy and the reference side by side."""
        return self.cfg.estimator == "kl_pg"

    @property
    def needs_full_vocab_kl(self) -> bool:
        """Whether the advantages read `TokenStats.kl` (a token estimator built on the full-vocabulary
        KL): then the log-prob pass must see the policy's and the reference's logits together."""
        return self.cfg.token_estimator in FULL_VOCAB_KL_TOKEN_ESTIMATORS

    def advantages(self, rewards: Tensor, on_policy: Tensor, stats: TokenStats) -> Advantages:
        """rewards [P, n]; on_policy [P, n] (False: replayed, stale, offline, or updated since)."""
        a = self.cfg
        pg, ratio = token_advantages(
            a.estimator, rewards, stats.logprobs, stats.ref_logprobs, stats.mask, a.beta,
            token_estimator=a.token_estimator, token_kl=stats.kl, ratio_baseline=a.ratio_baseline,
            ratio_coef=a.ratio_coef, logratio_reduction=a.logratio_reduction, on_policy=on_policy,
            return_parts=True)
        return Advantages(pg + ratio, pg, ratio)

    def loss_function(self, num_sequences: int) -> Callable:
        """`loss_fn(logits, micro_batch) -> (loss, {"loss": ...})` for the pipeline schedule.

        `logits`: this rank's vocabulary shard, or the (policy, reference) pair when
        `needs_reference_logits`; each may instead be `ops.HiddenStates` (train.fused_output), which
        `output_logprobs` takes alike. The micro-batch carries its per-position advantages in
        `extra["advantages"]` (the sequence layout puts them there). Every sequence is scaled as
        its own group of one with N = `num_sequences`, the batch's sequences on this rank: the
        advantages were computed on whole prompt groups beforehand, so the micro-batch losses
        add up to the full batch's 1/(n*N) surrogate (docs/algorithm.md §5).
        """
        a, paired = self.cfg, self.needs_reference_logits

        def loss_fn(logits, mb):
            policy, reference = logits if paired else (logits, None)
            labels = mb.labels.to(policy.device)
            st = output_logprobs(policy, labels, reference, temperature=self.temperature,
                                 compute_entropy=False, vocab_size=self.vocab_size)
            rows = (mb.index >= 0).to(policy.device)  # drop the padding rows of uniform micro-batches
            mask = mb.loss_mask.to(policy.device)[rows]
            loss = surrogate_loss(
                st.logprobs[rows].unsqueeze(1), mb.extra["advantages"].to(policy.device)[rows].unsqueeze(1),
                mask.unsqueeze(1), num_prompts=num_sequences,
                kl_pg_token_kl=st.kl[rows].unsqueeze(1) if paired else None,
                beta=a.beta if paired else None, logratio_reduction=a.logratio_reduction,
                response_lengths=mb.response_lengths.to(policy.device)[rows].unsqueeze(1))
            return loss, {"loss": loss.detach()}

        return loss_fn

    @staticmethod
    def metrics(adv: Advantages, mask: Tensor) -> dict[str, Tensor]:
        """Mean and RMS of the advantages per token, and the norms of the two parts."""
        ntok = mask.sum().clamp_min(1)
        return {
            "train/advantage_mean": (adv.total * mask).sum() / ntok,
            "train/advantage_rms": ((adv.total * mask) ** 2).sum().div(ntok).sqrt(),
            "train/pg_term_norm": adv.policy_gradient.mul(mask).pow(2).sum().sqrt(),
            "train/ratio_term_norm": adv.likelihood_ratio.mul(mask).pow(2).sum().sqrt(),
        }
