"""Small CPU versions of the paper's comparisons, with plots, in minutes.

    python examples/compare.py onpolicy   # rloo vs agro_off vs agro_on on on-policy data (Fig. 2-3)
    python examples/compare.py offline    # agro_off vs kl_pg vs pg on fixed samples from pi_ref (Fig. 5)

One SFT warm-up is trained first and shared (copied) by every run, so the algorithms start from
the same reference and see identical settings (docs/algorithm.md §9). Each run is a normal
agro-train job (its own directory, TensorBoard, checkpoints); the script overlays their curves in
one PNG.
Extra `key=value` arguments are passed to every run (e.g. train.steps=10); `--only rloo,agro_on`
runs a subset of the preset's algorithms.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

PRESETS = {
    "onpolicy": [("rloo", ["algorithm.estimator=rloo"]),
                 ("agro_off", ["algorithm.estimator=agro_off"]),
                 ("agro_on", ["algorithm.estimator=agro_on"])],
    "offline": [("agro_off", ["algorithm.estimator=agro_off"]),
                ("kl_pg", ["algorithm.estimator=kl_pg"]),
                ("pg", ["algorithm.estimator=pg", "algorithm.beta=0"])],
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "tiny_cpu.yaml"))
    ap.add_argument("--out", default=None, help="output directory (default runs/compare_<preset>)")
    ap.add_argument("--only", default=None, help="comma-separated subset of the preset's algorithms")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after --out
    algorithms = PRESETS[args.preset]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in algorithms})
        if unknown:
            ap.error(f"--only: {', '.join(unknown)} not in the {args.preset} preset "
                     f"(choose from {', '.join(name for name, _ in algorithms)})")
        algorithms = [(name, opts) for name, opts in algorithms if name in wanted]
    out = os.path.abspath(args.out or f"runs/compare_{args.preset}")
    os.makedirs(out, exist_ok=True)
    train = [sys.executable, "-m", "agro_megatron.train", args.config]
    base = os.path.join(out, "sft")
    # 1. the shared starting point: SFT warm-up only (train.steps=0)
    run(train + [f"logging.dir={base}", "train.steps=0", "logging.plots=false"] + args.overrides)
    extra = []
    if args.preset == "offline":
        extra = ["algorithm.regime=offline", f"algorithm.offline_data={os.path.join(out, 'offline_from_ref.jsonl')}"]
    curves = {}
    for name, opts in algorithms:
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        for item in ("sft_model", "tokenizer", "eval_before.json"):
            src, dst = os.path.join(base, item), os.path.join(d, item)
            if not os.path.exists(dst):
                (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        run(train + [f"logging.dir={d}"] + extra + opts + args.overrides)
        with open(os.path.join(d, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]
    path = plot(curves, os.path.join(out, f"compare_{args.preset}.png"), args.preset)
    print(f"wrote {path}")
    for name, hist in curves.items():
        acc = [r["eval/accuracy"] for r in hist if "eval/accuracy" in r]
        print(f"{name:9s} held-out accuracy {acc[0]:.3f} -> {acc[-1]:.3f}")
    return 0


def plot(curves: dict, path: str, title: str) -> str:
    """2 x 2: held-out accuracy and train reward, each vs step and vs KL(pi || pi_ref)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agro_megatron.train.metrics import KL, KL_LABEL, SMOOTH, eval_vs_kl, moving_average

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, hist in curves.items():
        tr = [r for r in hist if "train/reward_mean" in r and KL in r]
        ev = [r for r in hist if "eval/accuracy" in r]
        reward = moving_average([r["train/reward_mean"] for r in tr])
        axes[0, 0].plot([r["step"] for r in ev], [r["eval/accuracy"] for r in ev], "o-", label=name)
        axes[0, 1].plot(*eval_vs_kl(hist), "o-", label=name)
        axes[1, 0].plot([r["step"] for r in tr], reward, label=name)
        axes[1, 1].plot(moving_average([r[KL] for r in tr]), reward, ".-", alpha=0.7, label=name)
    labels = [("held-out accuracy", "step"), ("held-out accuracy vs KL", KL_LABEL),
              (f"train reward ({SMOOTH}-step mean)", "step"), ("train reward vs KL", KL_LABEL)]
    for ax, (t, xl) in zip(axes.flat, labels):
        ax.set_title(f"{title}: {t}")
        ax.set_xlabel(xl)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
