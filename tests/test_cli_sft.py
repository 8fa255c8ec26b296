"""`agro-sft`: the SFT stage alone, saved where a later agro-train of the same config finds it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agro_megatron.testing.distributed import launcher_free_env

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml")

SMALL = ["model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
         "data.synthetic_train_size=16", "data.synthetic_heldout_size=4", "sft.batch_size=8",
         "logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "rollout.n=2",
         "rollout.max_new_tokens=8", "train.prompts_per_step=4", "eval.max_problems=2", "eval.n=2",
         "eval.every=0", "checkpoint.save_every=0"]


def _script(name: str) -> str:
    """The installed console script (beside this interpreter), as a user runs it."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


def test_sft_steps_zero_is_refused(capsys):
    from agro_megatron.cli.sft import main

    assert main([CONFIG, "sft.steps=0"]) == 2
    assert "sft.steps=0" in capsys.readouterr().err


@pytest.mark.slow
def test_agro_sft_then_agro_train_skips_sft(tmp_path):
    args = [CONFIG, *SMALL, f"logging.dir={tmp_path}", "sft.steps=3"]
    sft = subprocess.run([_script("agro-sft"), *args], capture_output=True, text=True, env=launcher_free_env(),
                         timeout=600)
    assert sft.returncode == 0, sft.stderr[-4000:]
    model = tmp_path / "sft_model"
    assert sft.stdout.strip().splitlines()[-1] == str(model)
    assert (model / "COMPLETE").exists()
    train = subprocess.run([_script("agro-train"), *args, "train.steps=1"], capture_output=True, text=True,
                           env=launcher_free_env(), timeout=600)
    assert train.returncode == 0, train.stderr[-4000:]
    assert f"SFT model found at {model}; skipping SFT" in train.stdout
    assert "SFT done" not in train.stdout
