"""Step metrics: TensorBoard scalars, an in-memory history (saved with checkpoints), end-of-run plots."""
from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    """Writes on the logging rank only; other ranks get a no-op logger with the same API."""

    def __init__(self, log_dir: str, *, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self.history: list[dict] = []
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self.history.append({"step": step, **clean})
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:  # readable while running
            f.write(json.dumps(self.history[-1]) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def restore(self, history: list[dict]) -> None:
        """After a resume: the history up to the checkpoint, and the file rewritten to match it."""
        if not self.enabled:
            return
        self.history = list(history)
        self._rewrite()

    def state_dict(self) -> dict:
        """The history so far (saved with checkpoints: a resumed run's logs and plots are whole)."""
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.restore(state["history"])

    def _rewrite(self) -> None:
        path = os.path.join(self.log_dir, "metrics.jsonl")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.enabled:
            self._rewrite()

    def plot(self, path: str) -> str | None:
        """Reward and held-out accuracy vs step and vs KL(pi || pi_ref), and KL vs step: one PNG."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.history if "train/reward_mean" in r and KL in r]
        steps = [r["step"] for r in train]
        reward = moving_average([r["train/reward_mean"] for r in train])
        kl = moving_average([r[KL] for r in train])
        evals = [r for r in self.history if "eval/accuracy" in r]
        ev_steps, ev_acc = [r["step"] for r in evals], [r["eval/accuracy"] for r in evals]
        ev_kl, ev_acc_kl = eval_vs_kl(self.history)

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot(steps, reward, label=f"train reward ({SMOOTH}-step mean)")
        if ev_steps:
            axes[0].plot(ev_steps, ev_acc, "o-", label="held-out accuracy")
        axes[0].set_xlabel("step")
        axes[0].set_title("reward / accuracy vs step")
        axes[0].legend()
        axes[1].plot(kl, reward, ".-", alpha=0.6, label=f"train reward ({SMOOTH}-step means)")
        if ev_kl:
            axes[1].plot(ev_kl, ev_acc_kl, "o-", label="held-out accuracy")
        axes[1].set_xlabel(KL_LABEL)
        axes[1].set_title("reward / accuracy vs KL")
        axes[1].legend()
        axes[2].plot(steps, [r[KL] for r in train])
        axes[2].set_xlabel("step")
        axes[2].set_title(KL_LABEL)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# The KL plotted: the full-vocabulary sum along the sampled sequences. It is >= 0 and means the
# same for replayed or offline samples; the sampled log-ratio (train/kl) estimates KL on-policy only.
KL = "train/kl_full_vocab"
KL_LABEL = "KL(pi || pi_ref) per sequence (full vocabulary)"
SMOOTH = 5


def moving_average(values: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def eval_vs_kl(history: list[dict]) -> tuple[list[float], list[float]]:
    """(KL, held-out accuracy) at each evaluation: the mean KL of the training steps since the
    previous evaluation (0 before training, where pi = pi_ref)."""
    kls, accs, last = [], [], 0
    train = sorted((r["step"], r[KL]) for r in history if KL in r)
    for r in history:
        if "eval/accuracy" not in r:
            continue
        window = [kl for step, kl in train if last < step <= r["step"]]
        kls.append(sum(window) / len(window) if window else 0.0)
        accs.append(r["eval/accuracy"])
        last = r["step"]
    return kls, accs


def batch_metrics(rewards, stats) -> dict:
    """Per-step statistics of a batch: rewards, response lengths, KL to the reference and entropy.

    `rewards` [P, n]; `stats`: the objective's TokenStats of the batch ([P, n, T] each).
    """
    mask = stats.mask
    ntok = mask.sum().clamp_min(1)
    return {
        "train/reward_mean": rewards.mean(),
        "train/accuracy": (rewards > 0.5).double().mean(),
        "train/reward_std": rewards.std(),
        "train/response_length": mask.sum(-1).mean(),
        # the sampled log-ratio summed over each response (negative off-policy: not a KL there)
        "train/kl": (stats.logprobs - stats.ref_logprobs).mul(mask).sum(-1).mean(),
        KL: (stats.kl * mask).sum(-1).mean(),
        "train/entropy": (stats.entropy * mask).sum() / ntok,
    }
