"""Fig. 1 of the AGRO paper on a tabular bandit: off-policy data from pi_ref, exact gradients.

A softmax policy over ``--arms`` arms (one prompt) is trained by gradient ascent on its
logits with the EXACT expected update of each estimator: every pair of responses (n = 2) is
enumerated with its probability under the fixed behaviour law mu = pi_ref, and the
library's own ``sequence_advantages`` / ``surrogate_loss`` give the update. ``agro_off``
drives KL(pi || pi*) to 0 (the any-generation property, docs/algorithm.md §1 and §8), while
``kl_pg`` (reward advantage + per-token KL penalty) converges to a different fixed point: its
reward term is weighted by mu, not by pi, so off-policy it is not consistent (§2.3).

    python examples/tabular_consistency.py --out outputs/tabular
"""
from __future__ import annotations

import argparse
import os

import torch

from agro_megatron.losses import sequence_advantages, surrogate_loss

METHODS = ("agro_off", "kl_pg")


def make_problem(arms: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random reference log-probs (softmax of N(0,1) logits) and rewards U(0,1)."""
    g = torch.Generator().manual_seed(seed)
    ref_logp = torch.log_softmax(torch.randn(arms, generator=g, dtype=torch.float64), -1)
    rewards = torch.rand(arms, generator=g, dtype=torch.float64)
    return ref_logp, rewards


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum()


def expected_direction(method: str, theta: torch.Tensor, ref_logp: torch.Tensor,
                       rewards: torch.Tensor, mu: torch.Tensor, beta: float,
                       n: int = 2) -> torch.Tensor:
    """E_{y_1..y_n ~ mu}[(1/n) sum_i A_i grad log pi(y_i)] (kl_pg: minus beta grad KL), exact."""
    theta = theta.detach().requires_grad_()
    logpi = torch.log_softmax(theta, -1)
    Y = torch.cartesian_prod(*[torch.arange(theta.numel())] * n)   # every n-tuple of arms
    weight = mu[Y].prod(-1) * Y.shape[0]                            # prob * M: mean -> E[.]
    lp = logpi[Y]
    A = sequence_advantages(method, rewards[Y], lp.detach(), ref_logp[Y], beta)
    mask = torch.ones_like(lp).unsqueeze(-1)
    token_kl = None
    if method == "kl_pg":  # one token per response: its KL_t is the full KL(pi || pi_ref)
        token_kl = (kl(logpi, ref_logp) * weight[:, None]).expand_as(lp).unsqueeze(-1)
    loss = surrogate_loss(lp.unsqueeze(-1), A * weight[:, None], mask,
                          kl_pg_token_kl=token_kl, beta=beta)
    (g,) = torch.autograd.grad(-loss, theta)
    return g


def run(arms: int = 20, beta: float = 0.1, steps: int = 1000, lr: float = 10.0, seed: int = 0,
        methods: tuple[str, ...] = METHODS) -> dict[str, list[float]]:
    """Gradient ascent from theta = log pi_ref; returns KL(pi || pi*) after each update."""
    ref_logp, rewards = make_problem(arms, seed)
    mu = ref_logp.exp()
    star = torch.log_softmax(ref_logp + rewards / beta, -1)        # pi* = pi_ref e^{r/beta}/Z
    history: dict[str, list[float]] = {}
    for method in methods:
        theta = ref_logp.clone()
        curve = [kl(torch.log_softmax(theta, -1), star).item()]
        for _ in range(steps):
            theta = theta + lr * expected_direction(method, theta, ref_logp, rewards, mu, beta)
            curve.append(kl(torch.log_softmax(theta, -1), star).item())
        history[method] = curve
    return history


def plot(history: dict[str, list[float]], path: str, beta: float, arms: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, curve in history.items():
        ax.plot(range(len(curve)), [max(v, 1e-16) for v in curve], label=method)
    ax.set_yscale("log")
    ax.set_xlabel("updates (exact expected gradient)")
    ax.set_ylabel(r"KL($\pi$ || $\pi^*$)")
    ax.set_title(f"off-policy data from pi_ref: {arms} arms, beta={beta}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(history: dict[str, list[float]]) -> str:
    steps = len(next(iter(history.values()))) - 1
    marks = sorted({0, *(s for s in (1, 10, 100, 1000, 10000) if s < steps), steps})
    lines = ["step    " + "".join(f"{m:>12}" for m in history)]
    lines += [f"{s:<8}" + "".join(f"{history[m][s]:>12.3e}" for m in history) for s in marks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/tabular")
    args = p.parse_args(argv)
    history = run(args.arms, args.beta, args.steps, args.lr, args.seed)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kl_to_optimum.png")
    plot(history, path, args.beta, args.arms)
    print(table(history))
    print(f"saved {path}")
    return history


if __name__ == "__main__":
    main()
