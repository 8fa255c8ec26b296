"""The user's path end to end: HF Llama-3 folder -> agro-convert import -> agro-train (TP=2, resharded)
-> the trained policy -> agro-convert export -> transformers loads it; agro-eval --model scores it."""
import json
import subprocess
import sys

import pytest
import torch

from agro_megatron.testing.distributed import launcher_free_env, run_distributed
from agro_megatron.testing.product_checks import train_from_converted
from agro_megatron.testing.tiny_llama import write_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

def test_convert_train_export_eval(tmp_path):
    hf = write_tiny_llama(tmp_path / "hf", vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2,
                          tokenizer=True)
    conv = tmp_path / "megatron"
    subprocess.run([sys.executable, "-m", "agro_megatron.cli.convert", "import", "--hf", str(hf), "--out",
                    str(conv), "--tp", "1", "--pp", "1", "--quiet"], check=True, env=launcher_free_env())
    out = run_distributed(train_from_converted, 2, args=(str(conv), str(tmp_path / "run"), 2))
    assert all(o["steps"] == 2 for o in out)
    final = out[0]["final_model"]
    exported = tmp_path / "hf_trained"
    subprocess.run([sys.executable, "-m", "agro_megatron.cli.convert", "export", "--megatron", final,
                    "--out", str(exported), "--quiet"], check=True, env=launcher_free_env())
    from transformers import LlamaForCausalLM

    before = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    after = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32)
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(sd0[k].shape == sd1[k].shape for k in sd0)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0)  # RL changed the weights
    # agro-eval on the trained policy, through the rollout engine
    res = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "agro_megatron.cli.eval", "--data", "examples/data/math_sample.jsonl",
                    "--limit", "3", "--model", final, "--n", "2", "--max-new-tokens", "8", "--out", str(res),
                    "--no-progress"], check=True, env=launcher_free_env(), timeout=600)
    report = json.loads(res.read_text())
    acc = report["overall"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and report["overall"]["num_samples"] == 6
