"""Token-level AGRO estimators and the surrogate loss.

Exact check on a tiny token MDP: vocab 3, length 3, a tabular softmax policy and reference
per prefix (13 prefixes), reward a random function of the whole sequence. We enumerate all
pairs (and triples) of sequences with their exact probabilities and compare the expected
gradient of the per-token surrogate with the autograd gradient of the AGRO losses.
In the variable-length variant token 0 is EOS, which exercises the response mask exactly.
"""
import itertools
import math

import pytest
import torch

from agro_megatron.losses import sequence_advantages, surrogate_loss, token_advantages

V, T = 3, 3
BETA = 0.6
TOL = 1e-9
F64 = torch.float64
PREFIXES = {p: k for k, p in enumerate(
    p for L in range(T) for p in itertools.product(range(V), repeat=L))}


def sequences(variable):
    if not variable:
        return list(itertools.product(range(V), repeat=T))
    out = []

    def grow(prefix):
        for v in range(V):
            s = prefix + (v,)
            if v == 0 or len(s) == T:
                out.append(s)
            else:
                grow(s)
    grow(())
    return out


class MDP:
    def __init__(self, seed, variable=False):
        g = torch.Generator().manual_seed(seed)
        seqs = sequences(variable)
        S = len(seqs)
        self.Y = torch.zeros(S, T, dtype=torch.long)
        self.mask = torch.zeros(S, T, dtype=F64)
        self.pid = torch.zeros(S, T, dtype=torch.long)
        for k, s in enumerate(seqs):
            for t, v in enumerate(s):
                self.Y[k, t], self.mask[k, t], self.pid[k, t] = v, 1.0, PREFIXES[s[:t]]
        P = len(PREFIXES)
        self.theta = torch.randn(P, V, generator=g, dtype=F64)
        self.ref = torch.log_softmax(torch.randn(P, V, generator=g, dtype=F64), -1)
        self.behaviour = torch.log_softmax(torch.randn(P, V, generator=g, dtype=F64), -1)
        self.r = torch.rand(S, generator=g, dtype=F64)

    def tokens(self, theta):
        """Per-token log pi, log pi_ref, full-vocab KL at each position (0 off the mask)."""
        logpi = torch.log_softmax(theta, -1)
        lp = logpi[self.pid, self.Y] * self.mask
        ref = self.ref[self.pid, self.Y] * self.mask
        kl = (logpi.exp() * (logpi - self.ref)).sum(-1)[self.pid] * self.mask
        return lp, ref, kl

    def seq_prob(self, logits):
        return (torch.log_softmax(logits, -1)[self.pid, self.Y] * self.mask).sum(-1).exp()

    def exact(self, law, reduction="sum"):
        """-(1/beta) grad of 1/2 Var_{y~mu}[R_pi]: mu = pi differentiated (law "on", L_on),
        mu = pi held fixed ("pi", L_mu at mu = pi) or the behaviour policy ("behaviour")."""
        theta = self.theta.clone().requires_grad_()
        lp, ref, _ = self.tokens(theta)
        lr = (lp - ref).sum(-1)
        if reduction == "mean":
            lr = lr / self.mask.sum(-1)
        R = self.r - BETA * lr
        mu = {"on": lambda: self.seq_prob(theta), "pi": lambda: self.seq_prob(self.theta),
              "behaviour": lambda: self.seq_prob(self.behaviour)}[law]()
        L = 0.5 * (mu * (R - (mu * R).sum()) ** 2).sum()
        (g,) = torch.autograd.grad(L, theta)
        return -g / BETA

    def expected(self, estimator, n, on_policy=True, token_estimator="vanilla", advantages=None,
                 **kw):
        """E over n-tuples of sequences of the surrogate's ascent direction."""
        theta = self.theta.clone().requires_grad_()
        lp, ref, kl = self.tokens(theta)
        probs = self.seq_prob(theta.detach() if on_policy else self.behaviour)
        I = torch.cartesian_prod(*[torch.arange(len(self.r))] * n)
        w = probs[I].prod(-1)
        args = (self.r[I], lp.detach()[I], ref[I], self.mask[I])
        if advantages is None:
            A = token_advantages(estimator, *args, BETA, token_estimator=token_estimator,
                                 token_kl=kl.detach()[I], **kw)
        else:
            A = advantages(*args, kl.detach()[I])
        loss = surrogate_loss(lp[I], A * (w * len(I))[:, None, None], self.mask[I])
        (g,) = torch.autograd.grad(-loss, theta)
        return g


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module", params=[False, True], ids=["fixed_len", "variable_len"])
def mdp(request):
    return MDP(seed=0, variable=request.param)


@pytest.mark.parametrize("estimator", ["agro_off", "rloo", "agro_on"])
def test_token_estimators_match_exact_gradient_n2(mdp, estimator):
    """On-policy samples: agro_off/rloo estimate grad L_mu at mu = pi, agro_on grad L_on."""
    target = mdp.exact("on" if estimator == "agro_on" else "pi")
    assert target.abs().max() > 1e-2
    for te in ("vanilla", "causal", "local_kl"):
        assert close(mdp.expected(estimator, 2, token_estimator=te), target), te


@pytest.mark.parametrize("ratio_baseline", ["loo_var", "none"])
def test_token_estimators_agro_on_n3(ratio_baseline):
    mdp = MDP(seed=1, variable=True)
    target = mdp.exact("on")
    for te in ("vanilla", "causal", "local_kl"):
        got = mdp.expected("agro_on", 3, token_estimator=te, ratio_baseline=ratio_baseline)
        assert close(got, target), te


def test_token_tests_have_power():
    """Cases that MUST fail: causal off-policy, and token-replacing inside d_i^2."""
    mdp = MDP(seed=2, variable=True)
    # off-policy samples: vanilla agro_off is exact, causal / local_kl are not
    target = mdp.exact("behaviour")
    assert close(mdp.expected("agro_off", 2, on_policy=False), target)
    for te in ("causal", "local_kl"):
        assert (mdp.expected("agro_off", 2, on_policy=False, token_estimator=te)
                - target).abs().max() > 1e-3
    # on-policy agro_on with the token log-ratio also put into the likelihood-ratio term
    target = mdp.exact("on")

    def naive(rew, lp, ref, mask, kl):
        d_t, _ = token_advantages("agro_on", rew, lp, ref, mask, BETA, token_estimator="causal",
                                  return_parts=True)
        return (d_t - d_t * d_t / (2 * BETA)) * mask

    assert (mdp.expected(None, 2, advantages=naive) - target).abs().max() > 1e-3


def test_mean_reduction_fixed_length():
    """mean log-ratio = sum with beta_eff = beta/T: exact with ratio_coef = T, scaled by T."""
    mdp = MDP(seed=3, variable=False)
    for est, law in (("agro_off", "pi"), ("agro_on", "on")):
        target = T * mdp.exact(law, reduction="mean")
        for te in ("vanilla", "causal", "local_kl"):
            got = mdp.expected(est, 2, token_estimator=te, logratio_reduction="mean",
                               ratio_coef=float(T))
            assert close(got, target), (est, te)


def direct(estimator, te, rew, lp, ref, mask, kl, beta, reduction, c=1.0):
    """The docstring's formulas, one scalar at a time (loo_var baseline)."""
    P, n, Tn = lp.shape
    out = torch.zeros(P, n, Tn, dtype=F64)
    for p in range(P):
        toks = [[t for t in range(Tn) if mask[p, i, t] > 0] for i in range(n)]
        scale = [len(toks[i]) if reduction == "mean" else 1 for i in range(n)]
        l = [{t: (lp[p, i, t] - ref[p, i, t]).item() for t in toks[i]} for i in range(n)]
        Ls = [sum(l[i].values()) / scale[i] for i in range(n)]
        R = [rew[p, i].item() - beta * Ls[i] for i in range(n)]
        for i in range(n):
            others = [R[j] for j in range(n) if j != i]
            b = sum(others) / (n - 1)
            if estimator in ("pg", "kl_pg"):
                for t in toks[i]:
                    out[p, i, t] = rew[p, i] - sum(rew[p, j] for j in range(n) if j != i) / (n - 1)
                continue
            d = R[i] - b
            mo = sum(others) / (n - 1)
            v = 0.0 if n == 2 else n / (n - 1) * sum((x - mo) ** 2 for x in others) / (n - 2)
            lr_term = -c / (2 * beta) * (d * d - v) if estimator == "agro_on" else 0.0
            for t in toks[i]:
                if te == "vanilla":
                    Lt = Ls[i]
                elif te == "causal":
                    Lt = sum(l[i][u] for u in toks[i] if u >= t) / scale[i]
                else:
                    Lt = (l[i][t] + sum(kl[p, i, u].item() for u in toks[i] if u > t)) / scale[i]
                out[p, i, t] = rew[p, i].item() - beta * Lt - b + lr_term
    return out


def test_variable_length_against_direct_formula():
    g = torch.Generator().manual_seed(9)
    P, n, Tn = 2, 3, 6
    rew = torch.rand(P, n, generator=g, dtype=F64).round()
    lp, ref = (-3 * torch.rand(P, n, Tn, generator=g, dtype=F64) for _ in range(2))
    kl = torch.rand(P, n, Tn, generator=g, dtype=F64)
    mask = torch.tensor([[[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
                         [[1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]],
                        dtype=torch.bool)
    garbage = torch.where(mask, lp, -math.inf)  # padding values must not leak
    for est in ("agro_on", "agro_off", "kl_pg", "pg"):
        for te in (("vanilla", "causal", "local_kl") if est.startswith("agro") else ("vanilla",)):
            for red in ("sum", "mean"):
                got = token_advantages(est, rew, garbage, ref, mask, BETA, token_estimator=te,
                                       token_kl=torch.where(mask, kl, math.nan), ratio_coef=0.8,
                                       logratio_reduction=red)
                want = direct(est, te, rew, lp, ref, mask, kl, BETA, red, c=0.8)
                assert torch.allclose(got, want, rtol=0, atol=1e-12), (est, te, red)
    # vanilla equals the sequence estimator broadcast on the response tokens
    seq = sequence_advantages("agro_on", rew, (lp * mask).sum(-1), (ref * mask).sum(-1), BETA)
    tok = token_advantages("agro_on", rew, lp, ref, mask, BETA)
    assert torch.allclose(tok, seq[..., None] * mask, rtol=0, atol=1e-12)
    pd, lr = token_advantages("agro_on", rew, lp, ref, mask, BETA, token_estimator="causal",
                              return_parts=True)
    assert torch.allclose(pd + lr, token_advantages("agro_on", rew, lp, ref, mask, BETA,
                                                    token_estimator="causal"), atol=1e-12)


def test_token_errors():
    z = torch.zeros(2, 3, 4)
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="token_kl is required"):
        token_advantages("agro_on", r, z, z, z, 1.0, token_estimator="local_kl")
    with pytest.raises(ValueError, match="only changes estimators with a log-ratio term"):
        token_advantages("kl_pg", r, z, z, z, 1.0, token_estimator="causal")
    with pytest.raises(ValueError, match="unknown token_estimator 'future'"):
        token_advantages("agro_on", r, z, z, z, 1.0, token_estimator="future")
    with pytest.raises(ValueError, match="unknown logratio_reduction 'max'"):
        token_advantages("agro_on", r, z, z, z, 1.0, logratio_reduction="max")
    with pytest.raises(ValueError, match="mask must have shape"):
        token_advantages("agro_on", r, z, z, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="n >= 2"):
        token_advantages("agro_on", r[:, :1], z[:, :1], z[:, :1], z[:, :1], 1.0)
    assert token_advantages("pg", r, None, None, z, 0.0).shape == (2, 3, 4)


def test_surrogate_loss_value_and_micro_batches():
    g = torch.Generator().manual_seed(4)
    P, n, Tn, beta = 6, 4, 5, 0.3
    lp = (-2 * torch.rand(P, n, Tn, generator=g, dtype=F64)).requires_grad_()
    kl = torch.rand(P, n, Tn, generator=g, dtype=F64).requires_grad_()
    mask = torch.rand(P, n, Tn, generator=g) > 0.3
    A = torch.randn(P, n, Tn, generator=g, dtype=F64)
    for red in ("sum", "mean"):
        full = surrogate_loss(lp, A, mask, kl_pg_token_kl=kl, beta=beta, logratio_reduction=red)
        m = mask.to(F64)
        klseq = (kl * m).sum(-1) / (m.sum(-1).clamp_min(1) if red == "mean" else 1)
        want = (-(A * lp * m).sum((1, 2)) / n + beta * klseq.sum(-1) / n).mean()
        assert torch.allclose(full, want, rtol=0, atol=1e-13)
        g_full = torch.autograd.grad(full, (lp, kl))
        parts = [surrogate_loss(lp[s], A[s], mask[s], num_prompts=P, kl_pg_token_kl=kl[s],
                                beta=beta, logratio_reduction=red)
                 for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
        total = sum(parts)
        assert math.isclose(total.item(), full.item(), rel_tol=0, abs_tol=1e-13)
        g_mb = torch.autograd.grad(total, (lp, kl))
        for a, b in zip(g_full, g_mb):
            assert torch.allclose(a, b, rtol=0, atol=1e-14)
    # padding may hold -inf log-probs / nan KL: the loss and its gradient stay finite
    bad = surrogate_loss(torch.where(mask, lp, -math.inf), A, mask,
                         kl_pg_token_kl=torch.where(mask, kl, math.nan), beta=beta)
    assert torch.allclose(bad, surrogate_loss(lp, A, mask, kl_pg_token_kl=kl, beta=beta))
    assert torch.isfinite(torch.autograd.grad(bad, lp)[0]).all()
    # sequence-level advantages broadcast over tokens; advantages get no gradient
    Aseq = torch.randn(P, n, dtype=F64, requires_grad=True)
    a = surrogate_loss(lp, Aseq, mask)
    b = surrogate_loss(lp, Aseq.detach()[..., None].expand(P, n, Tn), mask)
    assert torch.allclose(a, b, rtol=0, atol=1e-13)
    assert torch.autograd.grad(a, (Aseq,), allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="num_prompts=2 is smaller"):
        surrogate_loss(lp, A, mask, num_prompts=2)
    with pytest.raises(ValueError, match="needs beta >= 0"):
        surrogate_loss(lp, A, mask, kl_pg_token_kl=kl)


def test_likelihood_ratio_term_only_for_on_policy_samples():
    """A mixed group (fresh and replayed samples): the fresh ones get agro_on's advantage, the
    others agro_off's, both computed over the whole group (the leave-one-out terms see all n)."""
    g = torch.Generator().manual_seed(7)
    P, n, Tn, beta = 3, 4, 5, 0.2
    r = torch.rand(P, n, generator=g, dtype=F64)
    lp = -2 * torch.rand(P, n, Tn, generator=g, dtype=F64)
    ref = -2 * torch.rand(P, n, Tn, generator=g, dtype=F64)
    mask = torch.rand(P, n, Tn, generator=g) > 0.2
    on = torch.tensor([[True, False, True, False], [True] * 4, [False] * 4])
    for te in ("vanilla", "causal"):
        mixed = token_advantages("agro_on", r, lp, ref, mask, beta, token_estimator=te, on_policy=on)
        a_on = token_advantages("agro_on", r, lp, ref, mask, beta, token_estimator=te)
        a_off = token_advantages("agro_off", r, lp, ref, mask, beta, token_estimator=te)
        assert torch.equal(mixed[on], a_on[on]) and torch.equal(mixed[~on], a_off[~on])
        assert not torch.equal(a_on[on], a_off[on])  # the term is really there for fresh samples
    with pytest.raises(ValueError, match=r"on_policy must have the rewards' shape \[prompts, n\] = \[3, 4\]"):
        token_advantages("agro_on", r, lp, ref, mask, beta, on_policy=on[:, :2])
