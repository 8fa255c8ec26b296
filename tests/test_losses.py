"""Sequence-level AGRO estimators against exact enumeration on a tabular softmax policy.

The policy is softmax(theta) over K arms (one prompt). For n responses we enumerate every
n-tuple of arms with its exact probability and compute the expected ascent direction
E[(1/n) sum_i A_i grad log pi(y_i)] through the library's own surrogate_loss; the reference
is the autograd gradient of the losses L_mu / L_on (docs/algorithm.md §1) written out directly
(float64).
"""
import math

import pytest
import torch

from agro_megatron.losses import (
    ESTIMATORS,
    RATIO_BASELINES,
    TOKEN_ESTIMATORS,
    agro_off_variance_objective,
    agro_on_parts,
    sequence_advantages,
    surrogate_loss,
)

K = 4
BETA = 0.7
TOL = 1e-9
F64 = torch.float64


def problem(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=F64)
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), -1)
    r = torch.rand(K, generator=g, dtype=F64)
    mu = torch.softmax(torch.randn(K, generator=g, dtype=F64), -1)
    return theta, ref_logp, r, mu


def tuples(n):
    return torch.cartesian_prod(*[torch.arange(K)] * n)  # [K^n, n]


def expected_direction(estimator, theta, ref_logp, r, mu, n, advantages=None, **kw):
    """sum over n-tuples of prob * (1/n) sum_i A_i grad log pi(y_i); mu=None means mu = pi."""
    theta = theta.clone().requires_grad_()
    logpi = torch.log_softmax(theta, -1)
    Y = tuples(n)
    w = (logpi.detach().exp() if mu is None else mu)[Y].prod(-1)
    lp = logpi[Y]
    if advantages is None:
        A = sequence_advantages(estimator, r[Y], lp.detach(), ref_logp[Y], BETA, **kw)
    else:
        A = advantages(r[Y], lp.detach(), ref_logp[Y])
    M = Y.shape[0]
    # weighting a stop-gradient advantage by prob * M turns surrogate_loss's mean into E[.]
    loss = surrogate_loss(lp.unsqueeze(-1), A * w[:, None] * M, torch.ones_like(lp).unsqueeze(-1))
    (g,) = torch.autograd.grad(-loss, theta)
    return g


def exact_off(theta, ref_logp, r, mu):
    """-(1/beta) grad L_mu(pi), L_mu = 1/2 Var_{y~mu}[R_pi(y)] with mu fixed (detached)."""
    theta = theta.clone().requires_grad_()
    R = r - BETA * (torch.log_softmax(theta, -1) - ref_logp)
    L = 0.5 * (mu * (R - (mu * R).sum()) ** 2).sum()
    (g,) = torch.autograd.grad(L, theta)
    return -g / BETA


def exact_on(theta, ref_logp, r):
    """-(1/beta) grad L_on(pi), L_on = L_pi(pi) differentiated through the sampling law too."""
    theta = theta.clone().requires_grad_()
    logpi = torch.log_softmax(theta, -1)
    pi = logpi.exp()
    R = r - BETA * (logpi - ref_logp)
    L = 0.5 * (pi * (R - (pi * R).sum()) ** 2).sum()
    (g,) = torch.autograd.grad(L, theta)
    return -g / BETA


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("estimator", ["agro_off", "rloo"])
def test_agro_off_unbiased_for_any_fixed_mu(estimator, n):
    for seed in range(2):
        theta, ref_logp, r, mu = problem(seed)
        target = exact_off(theta, ref_logp, r, mu)
        assert target.abs().max() > 1e-2  # not a trivial zero
        assert close(expected_direction(estimator, theta, ref_logp, r, mu, n), target)
        # with mu = pi it is the off-policy loss at mu = pi, NOT grad L_on
        pi = torch.softmax(theta, -1)
        assert close(expected_direction(estimator, theta, ref_logp, r, None, n),
                     exact_off(theta, ref_logp, r, pi))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("ratio_baseline", ["loo_var", "none"])
def test_agro_on_unbiased_on_policy(ratio_baseline, n):
    for seed in range(2):
        theta, ref_logp, r, _ = problem(seed)
        target = exact_on(theta, ref_logp, r)
        got = expected_direction("agro_on", theta, ref_logp, r, None, n, ratio_baseline=ratio_baseline)
        assert close(got, target)
        # the test has power: agro_off differs from grad L_on by more than rounding
        off = expected_direction("agro_off", theta, ref_logp, r, None, n)
        assert (off - target).abs().max() > 1e-3


@pytest.mark.parametrize("n", [2, 4])
def test_loo_sq_baseline_is_biased(n):
    theta, ref_logp, r, _ = problem(0)
    target = exact_on(theta, ref_logp, r)
    got = expected_direction("agro_on", theta, ref_logp, r, None, n, ratio_baseline="loo_sq")
    assert (got - target).abs().max() > 1e-3


@pytest.mark.parametrize("n", [3, 4])
def test_loo_var_estimates_mean_of_d_squared(n):
    """loo_var's v_i = n/(n-1) s^2_{-i}, s^2 over the other R_j: E[v_i] = E[d_i^2].

    See docs/algorithm.md §2.2.

    (s^2 of the other d_j would also be unbiased, since d_j - mean_{k!=i} d_k does not depend
    on R_i, but it is (n/(n-1))^2 times larger and so over-shoots E[d_i^2]; checked too.)"""
    theta, ref_logp, r, mu = problem(2)
    Y = tuples(n)
    lp = torch.log_softmax(theta, -1)[Y]
    for law in (mu, torch.softmax(theta, -1)):
        w = law[Y].prod(-1)[:, None]
        pd, lr = agro_on_parts(r[Y], lp, ref_logp[Y], BETA)
        v = pd * pd + 2 * BETA * lr            # lr = -(1/(2 beta)) (d^2 - v)
        Ed2, Ev = (w * pd * pd).sum(0), (w * v).sum(0)
        assert Ed2.min() > 1e-2 and torch.allclose(Ev, Ed2, rtol=1e-12, atol=0)
        v_d = torch.stack([n / (n - 1) * torch.cat([pd[:, :i], pd[:, i + 1:]], 1).var(1)
                           for i in range(n)], 1)
        assert torch.allclose((w * v_d).sum(0), Ed2 * (n / (n - 1)) ** 2, rtol=1e-12, atol=0)


def test_loo_var_baseline_formula():
    """v_i = n/(n-1) * unbiased variance of the other R_j, against a direct loop."""
    g = torch.Generator().manual_seed(3)
    rew, lp, ref = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    n = 5
    pd, lr = agro_on_parts(rew, lp, ref, BETA, ratio_coef=1.3)
    R = rew - BETA * (lp - ref)
    for p in range(3):
        for i in range(n):
            others = [R[p, j].item() for j in range(n) if j != i]
            d = R[p, i].item() - sum(others) / (n - 1)
            mean_o = sum(others) / (n - 1)
            v = n / (n - 1) * sum((x - mean_o) ** 2 for x in others) / (n - 2)
            assert math.isclose(pd[p, i].item(), d, abs_tol=1e-12)
            assert math.isclose(lr[p, i].item(), -1.3 / (2 * BETA) * (d * d - v), abs_tol=1e-12)


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0])
def test_ratio_coef_scales_the_likelihood_ratio_term(c):
    theta, ref_logp, r, _ = problem(1)
    n = 3
    pd_part = exact_off(theta, ref_logp, r, torch.softmax(theta, -1))  # E[(R-m) s]
    lr_part = exact_on(theta, ref_logp, r) - pd_part                   # -(1/2b) E[(R-m)^2 s]
    got = expected_direction("agro_on", theta, ref_logp, r, None, n, ratio_coef=c)
    assert close(got, pd_part + c * lr_part)


def test_parts_sum_and_symmetry():
    g = torch.Generator().manual_seed(5)
    rew, lp, ref = (torch.randn(6, 4, generator=g, dtype=F64) for _ in range(3))
    A = sequence_advantages("agro_on", rew, lp, ref, BETA)
    pd, lr = agro_on_parts(rew, lp, ref, BETA)
    off = sequence_advantages("agro_off", rew, lp, ref, BETA)
    assert torch.allclose(pd + lr, A, rtol=0, atol=1e-12)
    assert torch.equal(pd, off)
    assert torch.equal(sequence_advantages("rloo", rew, lp, ref, BETA), off)
    pd2, lr2 = sequence_advantages("agro_off", rew, lp, ref, BETA, return_parts=True)
    assert torch.equal(pd2, off) and torch.count_nonzero(lr2) == 0
    # n = 2: A_1 = R_1 - R_2 = -A_2
    R = rew[:, :2] - BETA * (lp[:, :2] - ref[:, :2])
    A2 = sequence_advantages("agro_off", rew[:, :2], lp[:, :2], ref[:, :2], BETA)
    assert torch.allclose(A2[:, 0], R[:, 0] - R[:, 1], rtol=0, atol=1e-12)
    assert torch.allclose(A2[:, 0], -A2[:, 1], rtol=0, atol=1e-12)


def test_variance_form_gradient_equals_advantage_form():
    g = torch.Generator().manual_seed(7)
    P, n = 5, 4
    rew = torch.rand(P, n, generator=g, dtype=F64).round()
    ref = -5 * torch.rand(P, n, generator=g, dtype=F64)
    lp = (-5 * torch.rand(P, n, generator=g, dtype=F64)).requires_grad_()
    for num_prompts in (None, 12):
        J = agro_off_variance_objective(rew, lp, ref, BETA, num_prompts=num_prompts)
        (gJ,) = torch.autograd.grad(J, lp)
        A = sequence_advantages("agro_off", rew, lp, ref, BETA)
        loss = surrogate_loss(lp.unsqueeze(-1), A, torch.ones(P, n, 1, dtype=F64),
                              num_prompts=num_prompts)
        (gL,) = torch.autograd.grad(loss, lp)
        assert torch.allclose(gJ, -gL, rtol=0, atol=1e-13)
        assert gJ.abs().max() > 1e-3
    # the value itself: -(1/(2 beta)) * unbiased variance, averaged over prompts
    R = rew - BETA * (lp.detach() - ref)
    expect = sum(-R[p].var(correction=1) / (2 * BETA) for p in range(P)) / P
    assert torch.allclose(agro_off_variance_objective(rew, lp, ref, BETA), expect)


def test_pg_and_kl_pg_are_leave_one_out_reward_differences():
    g = torch.Generator().manual_seed(11)
    rew, lp, ref = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(3))
    expect = torch.tensor([[rew[p, i] - (rew[p].sum() - rew[p, i]) / 3 for i in range(4)]
                           for p in range(3)], dtype=F64)
    for est in ("pg", "kl_pg"):
        assert torch.allclose(sequence_advantages(est, rew, lp, ref, BETA), expect, atol=1e-12)
        assert torch.allclose(sequence_advantages(est, rew, None, None, 0.0), expect, atol=1e-12)


def test_output_is_detached_and_keeps_dtype():
    g = torch.Generator().manual_seed(2)
    rew = torch.rand(2, 3, generator=g)
    lp = torch.randn(2, 3, generator=g, requires_grad=True)
    ref = torch.randn(2, 3, generator=g)
    for est in ESTIMATORS:
        A = sequence_advantages(est, rew, lp, ref, BETA)
        assert A.dtype == torch.float32 and not A.requires_grad and A.shape == (2, 3)
    A = sequence_advantages("agro_on", rew, lp.bfloat16(), ref.bfloat16(), BETA)
    assert A.dtype == torch.float32  # promoted with the fp32 rewards


def test_errors_name_the_problem():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="n >= 2.*leave-one-out"):
        one = torch.zeros(3, 1)
        sequence_advantages("agro_off", one, one, one, 1.0)
    for bad_beta in (0.0, -1.0):
        for est in ("agro_on", "agro_off", "rloo"):
            with pytest.raises(ValueError, match="beta > 0"):
                sequence_advantages(est, x, x, x, bad_beta)
    with pytest.raises(ValueError, match="kl_pg needs beta >= 0"):
        sequence_advantages("kl_pg", x, x, x, -0.1)
    with pytest.raises(ValueError, match="unknown estimator 'grpo'.*agro_on, agro_off, rloo"):
        sequence_advantages("grpo", x, x, x, 1.0)
    with pytest.raises(ValueError, match="unknown ratio_baseline 'var'.*loo_var, none, loo_sq"):
        sequence_advantages("agro_on", x, x, x, 1.0, ratio_baseline="var")
    with pytest.raises(ValueError, match=r"logprobs has shape \(3, 5\)"):
        sequence_advantages("agro_on", x, torch.zeros(3, 5), x, 1.0)
    with pytest.raises(ValueError, match="logprobs is required"):
        sequence_advantages("agro_on", x, None, x, 1.0)
    with pytest.raises(ValueError, match=r"\[prompts, n\]"):
        sequence_advantages("agro_on", torch.zeros(12), torch.zeros(12), torch.zeros(12), 1.0)
    assert ESTIMATORS == ("agro_on", "agro_off", "rloo", "kl_pg", "pg")
    assert TOKEN_ESTIMATORS == ("vanilla", "causal", "local_kl")
    assert RATIO_BASELINES == ("loo_var", "none", "loo_sq")
