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
        """Reward and held-out accuracy vs step, and vs KL(pi || pi_ref): one PNG."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key, x="step"):
            pts = [(r[x], r[key]) for r in self.history if key in r and x in r]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        xs, ys = series("train/reward_mean")
        axes[0].plot(xs, ys, label="train reward")
        ex, ey = series("eval/accuracy")
        if ex:
            axes[0].plot(ex, ey, "o-", label="held-out accuracy")
        axes[0].set_xlabel("step")
        axes[0].set_title("reward / accuracy vs step")
        axes[0].legend()
        kx, ky = series("train/reward_mean", x="train/kl")
        steps = [r["step"] for r in self.history if "train/reward_mean" in r and "train/kl" in r]
        sc = axes[1].scatter(kx, ky, c=steps, cmap="viridis", s=18)
        fig.colorbar(sc, ax=axes[1], label="step")
        axes[1].set_xlabel("KL(pi || pi_ref) per sequence")
        axes[1].set_ylabel("train reward")
        axes[1].set_title("reward vs KL")
        lx, ly = series("train/kl")
        axes[2].plot(lx, ly)
        axes[2].set_xlabel("step")
        axes[2].set_title("KL(pi || pi_ref)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
