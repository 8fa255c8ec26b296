"""AGRO advantages and the surrogate loss (docs/algorithm.md §2-5), pure torch.

Shapes: ``P`` prompts, ``n`` responses per prompt (a group), ``T`` token positions.
Every estimator is an ascent direction ``g = (1/n) sum_i A_i grad log pi(y_i)``; the
advantages returned here are detached constants, and :func:`surrogate_loss` turns them into
a loss whose gradient is ``-g`` averaged over prompts. Nothing here knows about tensor or
data parallelism: callers pass per-token log-probs (and full-vocab KL) computed elsewhere.
"""
from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("agro_on", "agro_off", "rloo", "kl_pg", "pg")
TOKEN_ESTIMATORS = ("vanilla", "causal", "local_kl")
# Token estimators whose advantages read the full-vocabulary KL at every position, so the
# log-prob pass must run the policy and the reference side by side (no engine log-probs).
FULL_VOCAB_KL_TOKEN_ESTIMATORS = ("local_kl",)
RATIO_BASELINES = ("loo_var", "none", "loo_sq")
LOGRATIO_REDUCTIONS = ("sum", "mean")

# Estimators whose advantage contains -beta * (log pi - log pi_ref) of the sample itself.
_REGULARIZED = ("agro_on", "agro_off", "rloo")


def _choose(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")


def _dtypes(*tensors: Tensor | None) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype): outputs keep the inputs' float type, maths is >= fp32."""
    out = None
    for t in tensors:
        if t is not None:
            out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    if out is None or not out.is_floating_point:
        out = torch.float32
    return out, torch.promote_types(out, torch.float32)


def _check_beta(estimator: str, beta: float) -> float:
    beta = float(beta)
    if estimator in _REGULARIZED and not beta > 0:
        raise ValueError(
            f"{estimator} needs beta > 0 (it divides by beta and regularizes towards pi_ref); "
            f"got beta={beta}. Use estimator 'pg' for an unregularized run."
        )
    if estimator == "kl_pg" and not beta >= 0:
        raise ValueError(f"kl_pg needs beta >= 0, got beta={beta}")
    return beta


def _check_group(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [prompts, n] (one row per prompt group), got "
            f"{tuple(rewards.shape)}; reshape flat batches with .view(-1, n)"
        )
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(
            f"AGRO estimators need n >= 2 responses per prompt: the leave-one-out baseline of "
            f"response i is the mean over the OTHER responses of its prompt, and there are none "
            f"with n={n}. Sample at least 2 responses per prompt."
        )


def _check_shape(name: str, t: Tensor | None, shape: torch.Size, needed_by: str) -> None:
    if t is None:
        raise ValueError(f"{name} is required by {needed_by}")
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# ----------------------------------------------------------------------------------------
# Sequence-level estimators (docs/algorithm.md §2)
# ----------------------------------------------------------------------------------------


def validate_algorithm(estimator: str, beta: float, *, token_estimator: str = "vanilla",
                       ratio_baseline: str = "loo_var", logratio_reduction: str = "sum",
                       on_policy_samples: bool = True) -> None:
    """Raise ValueError naming the problem unless the estimators accept these settings (the one
    rule set: the config's validation and the objective both call this). `on_policy_samples`:
    whether every sample will come from the current policy (the sample source says)."""
    _choose("estimator", estimator, ESTIMATORS)
    _choose("token_estimator", token_estimator, TOKEN_ESTIMATORS)
    _choose("ratio_baseline", ratio_baseline, RATIO_BASELINES)
    _choose("logratio_reduction", logratio_reduction, LOGRATIO_REDUCTIONS)
    _check_beta(estimator, beta)
    if estimator not in _REGULARIZED and token_estimator != "vanilla":
        raise ValueError(
            f"token_estimator {token_estimator!r} only changes estimators with a log-ratio term "
            f"({', '.join(_REGULARIZED)}); {estimator} has none: use token_estimator='vanilla'")
    if token_estimator != "vanilla" and not on_policy_samples:
        raise ValueError(f"algorithm.token_estimator={token_estimator} is only valid on on-policy samples, and "
                         "this regime trains on off-policy ones; use token_estimator=vanilla")


def _loo_diff(x: Tensor) -> Tensor:
    """x_i - mean_{j != i} x_j, via the group mean (= n/(n-1) * (x_i - mean)) for stability."""
    n = x.shape[-1]
    return (x - x.mean(-1, keepdim=True)) * (n / (n - 1))


def _ratio_baseline(kind: str, R: Tensor, d: Tensor) -> Tensor:
    """Baseline v_i of the likelihood-ratio term d_i^2 (docs/algorithm.md §2.2).

    ``loo_var``: ``n/(n-1) * s^2_{-i}`` with ``s^2_{-i}`` the unbiased (ddof=1) variance of
    the OTHER responses' regularized rewards R_j (0 when n = 2). It is a function of y_{-i}
    only, hence unbiased (E_pi[grad log pi(y_i)] = 0), and E[v_i] = E[d_i^2]. (The spread of
    the other d_j would be unbiased too but is (n/(n-1))^2 times too large.) ``loo_sq``: the
    paper's ``mean_{j != i} d_j^2``, lower variance but BIASED: each d_j (j != i) contains
    R_i. ``none``: 0. tests/test_losses.py checks all of this by exact enumeration.
    """
    n = R.shape[-1]
    if kind == "none":
        return torch.zeros_like(R)
    if kind == "loo_sq":
        sq = d * d
        return (sq.sum(-1, keepdim=True) - sq) / (n - 1)
    if n == 2:
        return torch.zeros_like(R)
    c = R - R.mean(-1, keepdim=True)
    ss_others = (c * c).sum(-1, keepdim=True) - (n / (n - 1)) * c * c  # sum of sq. dev. of y_{-i}
    return (n / (n - 1)) * ss_others.clamp_min(0) / (n - 2)


def _sequence_parts(estimator: str, rewards: Tensor, logratio: Tensor | None, beta: float,
                    ratio_baseline: str, ratio_coef: float) -> tuple[Tensor, Tensor]:
    """(pg, ratio) with A = pg + ratio; ``logratio`` is the per-response log pi - log pi_ref."""
    if estimator in ("pg", "kl_pg"):
        return _loo_diff(rewards), torch.zeros_like(rewards)
    R = rewards - beta * logratio
    d = _loo_diff(R)
    if estimator != "agro_on":
        return d, torch.zeros_like(d)
    ratio = -(float(ratio_coef) / (2 * beta)) * (d * d - _ratio_baseline(ratio_baseline, R, d))
    return d, ratio


def sequence_advantages(estimator: str, rewards: Tensor, logprobs: Tensor | None,
                        ref_logprobs: Tensor | None, beta: float, *, ratio_baseline: str = "loo_var",
                        ratio_coef: float = 1.0, return_parts: bool = False):
    """Advantages A_i of shape [P, n] from sequence log-prob SUMS (docs/algorithm.md §2 table).

    With ``R = r - beta*(logprobs - ref_logprobs)`` and ``d_i = R_i - mean_{j!=i} R_j``:
    ``agro_off``/``rloo``: ``d_i`` (unbiased for -(1/beta) grad L_mu under any fixed mu);
    ``agro_on``: ``d_i - (ratio_coef/(2 beta)) (d_i^2 - v_i)`` (on-policy samples only; v_i per
    ``ratio_baseline``); ``kl_pg``/``pg``: ``r_i - mean_{j!=i} r_j`` (kl_pg's KL term lives in
    :func:`surrogate_loss`; log-probs may be None). For the "mean" log-ratio reduction pass
    per-token MEANS instead of sums (or use :func:`token_advantages`).

    Returns detached advantages in the inputs' dtype; with ``return_parts=True`` returns
    ``(pg_term, ratio_term)`` with ``A = pg_term + ratio_term`` (ratio_term is 0 except for agro_on),
    so the trainer can log both norms. To mix on-policy and replayed samples in agro_on,
    zero ``ratio_term`` on the replayed ones (they get agro_off's advantage: docs/algorithm.md §3).
    """
    _choose("estimator", estimator, ESTIMATORS)
    _choose("ratio_baseline", ratio_baseline, RATIO_BASELINES)
    beta = _check_beta(estimator, beta)
    _check_group(rewards)
    out_dt, dt = _dtypes(rewards, logprobs, ref_logprobs)
    logratio = None
    if estimator in _REGULARIZED:
        _check_shape("logprobs", logprobs, rewards.shape, estimator)
        _check_shape("ref_logprobs", ref_logprobs, rewards.shape, estimator)
        logratio = logprobs.detach().to(dt) - ref_logprobs.detach().to(dt)
    with torch.no_grad():
        pg, ratio = _sequence_parts(estimator, rewards.detach().to(dt), logratio, beta,
                                 ratio_baseline, ratio_coef)
    if return_parts:
        return pg.to(out_dt), ratio.to(out_dt)
    return (pg + ratio).to(out_dt)


def agro_on_parts(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, beta: float, *,
                  ratio_baseline: str = "loo_var", ratio_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """agro_on split as (pg_term = d_i, ratio_term = -(c/(2 beta))(d_i^2 - v_i)), for logging."""
    return sequence_advantages("agro_on", rewards, logprobs, ref_logprobs, beta,
                               ratio_baseline=ratio_baseline, ratio_coef=ratio_coef, return_parts=True)


def agro_off_variance_objective(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor,
                                beta: float, *, num_prompts: int | None = None) -> Tensor:
    """Objective ``-(1/(2 beta)) s^2(R_1..R_n)`` (ddof=1), summed over prompts / num_prompts.

    Differentiable in ``logprobs``, no stop-gradient needed. Its gradient equals the
    gradient of ``-surrogate_loss(logprobs, sequence_advantages('agro_off', ...))`` with the
    same ``num_prompts`` (because d_i = n/(n-1) (R_i - mean R)): minimise its negative.
    """
    beta = _check_beta("agro_off", beta)
    _check_group(rewards)
    _check_shape("logprobs", logprobs, rewards.shape, "agro_off_variance_objective")
    _check_shape("ref_logprobs", ref_logprobs, rewards.shape, "agro_off_variance_objective")
    R = rewards.detach() - beta * (logprobs - ref_logprobs.detach())
    denom = rewards.shape[0] if num_prompts is None else int(num_prompts)
    return -(R.var(dim=-1, correction=1).sum() / denom) / (2 * beta)


# ----------------------------------------------------------------------------------------
# Token-level estimators (docs/algorithm.md §4)
# ----------------------------------------------------------------------------------------


def _suffix_sum(x: Tensor) -> Tensor:
    """out[..., t] = sum_{t' >= t} x[..., t']."""
    return x.flip(-1).cumsum(-1).flip(-1)


def token_advantages(estimator: str, rewards: Tensor, token_logprobs: Tensor | None,
                     token_ref_logprobs: Tensor | None, mask: Tensor, beta: float, *,
                     token_estimator: str = "vanilla", token_kl: Tensor | None = None,
                     ratio_baseline: str = "loo_var", ratio_coef: float = 1.0,
                     logratio_reduction: str = "sum", on_policy: Tensor | None = None,
                     return_parts: bool = False):
    """Per-token advantages A_{i,t} of shape [P, n, T] (0 where ``mask`` is 0).

    Inputs: ``rewards`` [P, n]; ``token_logprobs``/``token_ref_logprobs`` [P, n, T] (log pi
    and log pi_ref of the sampled token at each position); ``mask`` [P, n, T], 1 on response
    tokens (any layout, e.g. right padding; padded values are ignored even if inf/nan); ``token_kl`` [P, n, T] the full-vocab
    ``KL(pi(.|y_<t) || pi_ref(.|y_<t))`` at each position (``local_kl`` only).

    The sequence log-ratio is ``L_i = sum_t l_{i,t}`` (``logratio_reduction="sum"``) or
    ``(1/T_i) sum_t l_{i,t}`` (``"mean"``, T_i = mask.sum). Sequence advantages are as in
    :func:`sequence_advantages` with that L_i. A token estimator replaces only sample i's
    OWN log-ratio inside the policy-gradient part d_i = r_i - beta*L_i - b_i:

        d_{i,t} = r_i - beta * Ltilde_{i,t} - b_i     (b_i = mean_{j!=i} R_j unchanged)
        vanilla:  Ltilde_{i,t} = L_i
        causal:   Ltilde_{i,t} = sum_{t'>=t} l_{i,t'}                 (/T_i for "mean")
        local_kl: Ltilde_{i,t} = l_{i,t} + sum_{t'>t} KL_{i,t'}       (/T_i for "mean")

    agro_off / rloo: ``A_{i,t} = d_{i,t}``. agro_on: ``A_{i,t} = d_{i,t} - (c/(2 beta))
    (d_i^2 - v_i)``: the likelihood-ratio term keeps the SEQUENCE d_i. Why: E[l_{t'} s_t] = 0
    for t' < t only because l_{t'} is fixed given y_<t and E_pi[s_t | y_<t] = 0; inside
    d_i^2 the log-ratio multiplies r_i, which depends on the whole sequence, so dropping or
    replacing terms there would bias the gradient (the token-MDP test shows it). With samples
    from pi every token estimator has the same expected gradient as the sequence one; with
    off-policy samples only ``vanilla`` is valid. With "mean" and variable lengths T_i
    depends on y_i, so causal/local_kl are exact only for fixed-length responses.

    For the "mean" reduction the LR coefficient stays c/(2 beta): the exact -(1/beta_eff)
    grad L_on for fixed length T (beta_eff = beta/T) needs ``ratio_coef=T``.

    ``on_policy`` [P, n] bool (default: all True) marks the samples drawn from the current
    policy. agro_on's likelihood-ratio term is an expectation under pi, so samples marked False
    (replayed, stale, offline) get agro_off's advantage: the term is dropped for them only. It
    stays valid for the others, whose leave-one-out baseline v_i may use any other samples.

    ``pg``/``kl_pg`` have no log-ratio term: their A_i is broadcast, only ``vanilla`` is
    accepted, and token log-probs may be None. ``return_parts=True`` returns (pg, ratio) tokens.
    """
    _choose("estimator", estimator, ESTIMATORS)
    _choose("token_estimator", token_estimator, TOKEN_ESTIMATORS)
    _choose("ratio_baseline", ratio_baseline, RATIO_BASELINES)
    _choose("logratio_reduction", logratio_reduction, LOGRATIO_REDUCTIONS)
    beta = _check_beta(estimator, beta)
    _check_group(rewards)
    if mask.dim() != 3 or mask.shape[:2] != rewards.shape:
        raise ValueError(
            f"mask must have shape [prompts, n, T] = [{rewards.shape[0]}, {rewards.shape[1]}, T], "
            f"got {tuple(mask.shape)}"
        )
    regularized = estimator in _REGULARIZED
    if not regularized and token_estimator != "vanilla":
        raise ValueError(
            f"token_estimator {token_estimator!r} only changes estimators with a log-ratio term "
            f"({', '.join(_REGULARIZED)}); {estimator} has none: use token_estimator='vanilla'"
        )
    if regularized:
        _check_shape("token_logprobs", token_logprobs, mask.shape, estimator)
        _check_shape("token_ref_logprobs", token_ref_logprobs, mask.shape, estimator)
    if token_estimator == "local_kl":
        _check_shape("token_kl", token_kl, mask.shape, "token_estimator='local_kl'")
    if on_policy is not None and tuple(on_policy.shape) != tuple(rewards.shape):
        raise ValueError(f"on_policy must have the rewards' shape [prompts, n] = {list(rewards.shape)}, "
                         f"got {list(on_policy.shape)}")
    out_dt, dt = _dtypes(rewards, token_logprobs, token_ref_logprobs)

    with torch.no_grad():
        on = mask.detach().bool()
        m = on.to(dt)
        scale = m.sum(-1).clamp_min(1.0) if logratio_reduction == "mean" else None
        L = l = None
        if regularized:
            l = (token_logprobs.detach().to(dt) - token_ref_logprobs.detach().to(dt))
            l = torch.where(on, l, 0.0)  # padding may hold inf/nan: select, don't multiply
            L = l.sum(-1) if scale is None else l.sum(-1) / scale
        pg, ratio = _sequence_parts(estimator, rewards.detach().to(dt), L, beta, ratio_baseline,
                                 ratio_coef)
        if on_policy is not None:
            ratio = torch.where(on_policy.to(ratio.device).bool(), ratio, 0.0)
        pg_t = pg.unsqueeze(-1).expand_as(m)
        if token_estimator != "vanilla":
            if token_estimator == "causal":
                Lt = _suffix_sum(l)
            else:
                kl = torch.where(on, token_kl.detach().to(dt), 0.0)
                Lt = l + _suffix_sum(kl) - kl
            if scale is not None:
                Lt = Lt / scale.unsqueeze(-1)
            pg_t = pg_t + beta * (L.unsqueeze(-1) - Lt)
        pg_t = pg_t * m
        ratio_t = ratio.unsqueeze(-1) * m
    if return_parts:
        return pg_t.to(out_dt), ratio_t.to(out_dt)
    return (pg_t + ratio_t).to(out_dt)


# ----------------------------------------------------------------------------------------
# Surrogate loss (docs/algorithm.md §5)
# ----------------------------------------------------------------------------------------


def surrogate_loss(token_logprobs: Tensor, token_advantages: Tensor, mask: Tensor, *,
                   num_prompts: int | None = None, kl_pg_token_kl: Tensor | None = None,
                   beta: float | None = None, logratio_reduction: str = "sum",
                   response_lengths: Tensor | None = None) -> Tensor:
    """``-(1/(n*N)) sum_{p,i,t} mask * sg(A) * log pi`` (+ kl_pg's ``beta * KL`` term).

    ``token_logprobs``, ``mask`` [P, n, T]; ``token_advantages`` [P, n, T] or sequence-level
    [P, n] (broadcast over tokens). ``N = num_prompts`` defaults to P. For micro-batches of
    whole prompt groups pass the GLOBAL number of prompts, so that the sum of the
    micro-batch losses equals the full-batch loss (advantages must be computed on whole
    groups beforehand). For kl_pg pass ``kl_pg_token_kl`` [P, n, T], the differentiable
    full-vocab KL(pi||pi_ref) at each position, and ``beta``: adds ``beta * sum_t KL_t`` (mean
    over the response tokens for ``logratio_reduction="mean"``) averaged the same way.
    ``response_lengths`` [P, n]: the whole responses' token counts for that mean, when ``mask``
    covers only part of each response (a context-parallel share); default ``mask.sum(-1)``.
    """
    _choose("logratio_reduction", logratio_reduction, LOGRATIO_REDUCTIONS)
    if token_logprobs.dim() != 3 or mask.shape != token_logprobs.shape:
        raise ValueError(
            f"token_logprobs and mask must both be [prompts, n, T]; got "
            f"{tuple(token_logprobs.shape)} and {tuple(mask.shape)}"
        )
    P, n, _ = token_logprobs.shape
    adv = token_advantages.detach()
    if adv.shape == (P, n):
        adv = adv.unsqueeze(-1)
    elif adv.shape != token_logprobs.shape:
        raise ValueError(
            f"token_advantages has shape {tuple(adv.shape)}; expected {(P, n)} or "
            f"{tuple(token_logprobs.shape)}"
        )
    N = P if num_prompts is None else int(num_prompts)
    if N < P:
        raise ValueError(f"num_prompts={N} is smaller than this batch's {P} prompts; pass the "
                         "total number of prompts in the full batch")
    dt = torch.promote_types(torch.promote_types(token_logprobs.dtype, adv.dtype), torch.float32)
    on = mask.bool()
    m = on.to(dt)
    loss = -torch.where(on, adv.to(dt) * token_logprobs.to(dt), 0.0).sum() / (n * N)
    if kl_pg_token_kl is not None:
        if beta is None or not float(beta) >= 0:
            raise ValueError(f"kl_pg_token_kl needs beta >= 0, got beta={beta}")
        _check_shape("kl_pg_token_kl", kl_pg_token_kl, mask.shape, "surrogate_loss")
        kl = torch.where(on, kl_pg_token_kl.to(dt), 0.0).sum(-1)
        if logratio_reduction == "mean":
            lengths = m.sum(-1) if response_lengths is None else response_lengths.to(dt)
            _check_shape("response_lengths", lengths, mask.shape[:2], "surrogate_loss")
            kl = kl / lengths.clamp_min(1.0)
        loss = loss + float(beta) * kl.sum() / (n * N)
    return loss
