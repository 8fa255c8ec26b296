"""examples/tabular_consistency.py: agro_off reaches pi* off-policy, kl_pg does not."""
import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    path = os.path.join(ROOT, "examples", "tabular_consistency.py")
    spec = importlib.util.spec_from_file_location("tabular_consistency", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expected_directions_match_closed_forms():
    ex = load_example()
    beta = 0.1
    ref_logp, r = ex.make_problem(6, seed=1)
    mu = ref_logp.exp()
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logpi = torch.log_softmax(theta, -1)
    pi = logpi.exp()
    # softmax logits: grad log pi(y) = e_y - pi, and E_mu[c(y) (e_y - pi)] = mu*c when E_mu c = 0
    R = r - beta * (logpi - ref_logp)
    assert torch.allclose(ex.expected_direction("agro_off", theta, ref_logp, r, mu, beta),
                          mu * (R - (mu * R).sum()), rtol=0, atol=1e-12)
    kl_grad = pi * (logpi - ref_logp - ex.kl(logpi, ref_logp))
    assert torch.allclose(ex.expected_direction("kl_pg", theta, ref_logp, r, mu, beta),
                          mu * (r - (mu * r).sum()) - beta * kl_grad, rtol=0, atol=1e-12)


def test_fig1_agro_off_converges_kl_pg_stalls(tmp_path):
    ex = load_example()
    hist = ex.main(["--steps", "150", "--lr", "20", "--out", str(tmp_path)])
    off, klpg = hist["agro_off"], hist["kl_pg"]
    assert off[0] == klpg[0] > 1.0
    assert off[-1] < 1e-3 and off[-1] < klpg[-1] / 100
    assert klpg[-1] > 0.1 and abs(klpg[-1] - klpg[-50]) < 1e-3 * klpg[-1]  # a plateau
    png = tmp_path / "kl_to_optimum.png"
    assert png.exists() and png.stat().st_size > 10_000
