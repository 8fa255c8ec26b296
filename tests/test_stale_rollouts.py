"""Stale rollouts (generated k policy versions behind) need no importance weights under AGRO.

agro_off's expected update on samples from ANY fixed mu is the exact gradient -(1/beta) grad L_mu
(tests/test_losses.py), and every L_mu is minimised by the same pi* (docs/algorithm.md §1, §3).
So samples from an old policy move pi towards pi* with no ratio pi/mu. Checked exactly on a
tabular bandit.
"""
import importlib.util
import os

import torch

_path = os.path.join(os.path.dirname(__file__), "..", "examples", "tabular_consistency.py")
_spec = importlib.util.spec_from_file_location("tabular_consistency_stale", _path)
tab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tab)

BETA = 0.1


def test_pi_star_is_a_fixed_point_for_any_stale_behaviour_policy():
    ref_logp, rewards = tab.make_problem(8, seed=1)
    theta_star = torch.log_softmax(ref_logp + rewards / BETA, -1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # three different "old policies" that generated the data
        mu = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
        agro = tab.expected_direction("agro_off", theta_star, ref_logp, rewards, mu, BETA)
        klpg = tab.expected_direction("kl_pg", theta_star, ref_logp, rewards, mu, BETA)
        assert agro.abs().max() < 1e-10   # no drift away from pi*, whatever produced the samples
        assert klpg.abs().max() > 1e-3    # regularised PG without importance weights drifts


def test_training_on_k_step_stale_samples_converges_to_pi_star():
    ref_logp, rewards = tab.make_problem(8, seed=2)
    star = torch.log_softmax(ref_logp + rewards / BETA, -1)
    k, lr = 3, 20.0
    theta = ref_logp.clone()
    start = tab.kl(torch.log_softmax(theta, -1), star).item()
    history, curve = [theta.clone()] * (k + 1), []
    for _ in range(300):
        mu = torch.softmax(history[-(k + 1)], -1)  # rollouts from the policy k updates ago
        theta = theta + lr * tab.expected_direction("agro_off", theta, ref_logp, rewards, mu, BETA)
        history.append(theta.clone())
        curve.append(tab.kl(torch.log_softmax(theta, -1), star).item())
    # KL(pi || pi*) falls by > 3 orders of magnitude and keeps falling (rate limited only by
    # arms that pi* makes rare, as on-policy)
    assert curve[-1] < start * 1e-3
    assert all(b <= a for a, b in zip(curve[-100:], curve[-99:]))
