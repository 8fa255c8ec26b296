"""examples/compare.py: the CPU versions of the paper's on-policy and offline comparisons.

Shortened runs (tiny model, 2 SFT and 2 RL steps) of the real script as a user starts it. What
makes the comparison fair is checked, not just that files appear: every algorithm starts from the
same SFT weights and so draws the same first batch (on-policy), or trains on the same stored
samples (offline); each run's curve is in the overlaid PNG's data.
"""
import json
import os
import subprocess
import sys

import pytest

from agro_megatron.testing.distributed import launcher_free_env

pytestmark = pytest.mark.slow

TINY = ["model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
        "data.synthetic_train_size=16", "data.synthetic_heldout_size=4", "rollout.n=2", "rollout.max_new_tokens=8",
        "train.prompts_per_step=4", "train.steps=2", "sft.steps=2", "sft.batch_size=8", "eval.every=1", "eval.n=2",
        "eval.max_problems=4", "logging.progress=false", "checkpoint.save_every=0"]


def _compare(preset, out, *extra):
    # a plain shell's environment: no launcher variables, so every run is a world of one
    proc = subprocess.run([sys.executable, "examples/compare.py", preset, "--out", str(out), *extra, *TINY],
                          capture_output=True, text=True, timeout=900, env=launcher_free_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _history(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Two algorithms per preset keep the test short; --only picks them (the full presets add
# algorithms, not paths: each run is the same agro-train job with another estimator).
@pytest.mark.parametrize("preset,algorithms", [("onpolicy", ["rloo", "agro_on"]), ("offline", ["agro_off", "pg"])])
def test_compare_runs_every_algorithm_from_one_start_and_plots(tmp_path, preset, algorithms):
    stdout = _compare(preset, tmp_path, "--only", ",".join(algorithms))
    png = tmp_path / f"compare_{preset}.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    first = {}
    for name in algorithms:
        hist = _history(tmp_path / name)
        steps = [r["step"] for r in hist if "train/loss" in r]
        assert steps == [1, 2], name
        with open(tmp_path / name / "config.json") as f:
            assert json.load(f)["algorithm"]["estimator"] == name
        first[name] = next(r for r in hist if r["step"] == 1 and "train/reward_mean" in r)
        assert f"{name:9s} held-out accuracy" in stdout
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()) == sorted(algorithms + ["sft"])
    # Same SFT start and seed (on-policy) or the same stored samples (offline): the first batch is
    # identical for every algorithm, so its reward and response length are too.
    for key in ("train/reward_mean", "train/response_length"):
        assert len({first[n][key] for n in algorithms}) == 1, (key, first)
    if preset == "offline":
        with open(tmp_path / "offline_from_ref.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        assert len(records) == 16 and all(len(r["samples"]) == 2 for r in records)


def test_compare_only_names_an_unknown_algorithm(tmp_path):
    proc = subprocess.run([sys.executable, "examples/compare.py", "onpolicy", "--only", "agro_on,ppo",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--only: ppo not in the onpolicy preset" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran
