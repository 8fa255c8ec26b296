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
        self.tensorboard = enabled and tensorboard
        self._tb = None           # opened at the first write: a restore first says what to purge
        self._purge_step = None

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self.history.append({"step": step, **clean})
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:  # readable while running
            f.write(json.dumps(self.history[-1]) + "\n")
        self._write_tensorboard(step, clean)

    def _write_tensorboard(self, step: int, clean: dict) -> None:
        if not self.tensorboard:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(self.log_dir, "tensorboard"), purge_step=self._purge_step)
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def restore(self, history: list[dict]) -> None:
        """After a resume: the history up to the checkpoint, and the file rewritten to match it.

        TensorBoard's event files are append-only, so the events of the steps logged after the
        checkpoint would show twice. The next writer starts with a purge from the checkpoint's last
        step (SummaryWriter's purge_step: readers drop the earlier events at or after it) and
        re-logs that step's records: records logged at that step after the save (the final
        evaluation of a finished run that is run again) go, the checkpoint's own stay once.
        """
        if not self.enabled:
            return
        self.history = list(history)
        self._rewrite()
        last = max((r["step"] for r in self.history), default=None)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = 0 if last is None else last
        for rec in self.history:
            if rec["step"] == last:
                self._write_tensorboard(last, {k: v for k, v in rec.items() if k != "step"})

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
        """Reward and held-out accuracy vs step and vs KL(pi || pi_ref), KL vs step, and where each
        step's time went (per phase): one PNG."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kl_key, kl_label = plotted_kl(self.history)
        train = [r for r in self.history if "train/reward_mean" in r and kl_key in r]
        steps = [r["step"] for r in train]
        reward = moving_average([r["train/reward_mean"] for r in train])
        kl = moving_average([r[kl_key] for r in train])
        evals = [r for r in self.history if "eval/accuracy" in r]
        ev_steps, ev_acc = [r["step"] for r in evals], [r["eval/accuracy"] for r in evals]
        ev_kl, ev_acc_kl = eval_vs_kl(self.history, kl_key)

        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
        axes[0].plot(steps, reward, label=f"train reward ({SMOOTH}-step mean)")
        if ev_steps:
            axes[0].plot(ev_steps, ev_acc, "o-", label="held-out accuracy")
        axes[0].set_xlabel("step")
        axes[0].set_title("reward / accuracy vs step")
        axes[0].legend()
        axes[1].plot(kl, reward, ".-", alpha=0.6, label=f"train reward ({SMOOTH}-step means)")
        if ev_kl:
            axes[1].plot(ev_kl, ev_acc_kl, "o-", label="held-out accuracy")
        axes[1].set_xlabel(kl_label)
        axes[1].set_title("reward / accuracy vs KL")
        axes[1].legend()
        axes[2].plot(steps, [r[kl_key] for r in train])
        axes[2].set_xlabel("step")
        axes[2].set_title(kl_label)
        plot_phases(axes[3], self.history)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# The KL plotted: the full-vocabulary sum along the sampled sequences. It is >= 0 and means the
# same for replayed or offline samples; the sampled log-ratio (train/kl) estimates KL on-policy only.
KL = "train/kl_full_vocab"
KL_LABEL = "KL(pi || pi_ref) per sequence (full vocabulary)"
# Without the full-vocabulary KL (train.logprobs=engine skips it): the sampled log-ratio.
SAMPLED_KL, SAMPLED_KL_LABEL = "train/kl", "sampled log pi/pi_ref per sequence"
SMOOTH = 5
# The phases of a step, in order (train/loop.py times them; the reward phase is inside the rollout).
PHASES = ("rollout", "reward", "logprob", "train", "sync", "checkpoint")


def plotted_kl(history: list[dict]) -> tuple[str, str]:
    """(metric key, label) of the KL the plots use: the full-vocabulary one when it was measured."""
    if any(KL in r for r in history):
        return KL, KL_LABEL
    return SAMPLED_KL, SAMPLED_KL_LABEL


def phase_table(history: list[dict]) -> list[tuple[str, float, float]]:
    """(phase, median seconds per step, share of the step) over the logged steps: where time went."""
    import statistics

    med = {}
    for phase in PHASES:
        values = [r[f"time/{phase}_s"] for r in history if f"time/{phase}_s" in r]
        if phase == "checkpoint":   # saved on some steps only: its cost spread over every step
            steps = max(1, sum(1 for r in history if "time/train_s" in r))
            med[phase] = sum(values) / steps
        elif values:
            med[phase] = statistics.median(values)
    total = sum(med.values()) or 1.0
    return [(phase, med[phase], med[phase] / total) for phase in PHASES if phase in med]


def format_phase_table(rows: list[tuple[str, float, float]]) -> str:
    """phase_table's rows as the text table a run prints at its end."""
    if not rows:
        return ""
    lines = ["phase        s/step   share", *(f"{p:<11} {s:7.3f}  {share:6.1%}" for p, s, share in rows)]
    lines.append(f"{'total':<11} {sum(s for _, s, _ in rows):7.3f}")
    return "\n".join(lines)


def plot_phases(ax, history: list[dict]) -> None:
    """Stacked seconds per phase at every step (checkpoint saves show as spikes)."""
    steps = sorted({r["step"] for r in history if "time/train_s" in r})
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        by_step = {}
        for r in history:
            if f"time/{phase}_s" in r:
                by_step[r["step"]] = by_step.get(r["step"], 0.0) + r[f"time/{phase}_s"]
        values = [by_step.get(s, 0.0) for s in steps]
        if any(values):
            ax.bar(steps, values, bottom=bottom, label=phase, width=1.0)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("time per step, by phase")
    if steps:
        ax.legend(fontsize=8)


def moving_average(values: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def eval_vs_kl(history: list[dict], kl_key: str = KL) -> tuple[list[float], list[float]]:
    """(KL, held-out accuracy) at each evaluation: the mean KL of the training steps since the
    previous evaluation (0 before training, where pi = pi_ref)."""
    kls, accs, last = [], [], 0
    train = sorted((r["step"], r[kl_key]) for r in history if kl_key in r)
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
    out = {
        "train/reward_mean": rewards.mean(),
        "train/accuracy": (rewards > 0.5).double().mean(),
        "train/reward_std": rewards.std(),
        "train/response_length": mask.sum(-1).mean(),
        # the sampled log-ratio summed over each response (negative off-policy: not a KL there)
        "train/kl": (stats.logprobs - stats.ref_logprobs).mul(mask).sum(-1).mean(),
    }
    if stats.kl is not None:       # measured by the paired log-prob pass only (train.logprobs)
        out[KL] = (stats.kl * mask).sum(-1).mean()
    if stats.entropy is not None:
        out["train/entropy"] = (stats.entropy * mask).sum() / ntok
    return out
