"""tools/gpu_smoke.sh on CPU (AGRO_SMOKE_CPU=1): the script that is run first on a GPU machine must
itself work before anyone is lent one. Every step either passes or is skipped with a reason (the
CUDA-only, TransformerEngine, vLLM and TP=2 steps on this machine), nothing is written into the
repository, and without a GPU and without AGRO_SMOKE_CPU the script refuses with a clear message.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_smoke.sh")
LINE = re.compile(r"^\[gpu_smoke\] (PASS|FAIL|SKIP) (\S+?)(?::| |$)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGRO_SMOKE", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_", "SLURM_"))}
    env.update(AGRO_PYTHON=sys.executable, **extra)
    return env


@pytest.mark.slow
def test_gpu_smoke_script_passes_on_cpu(tmp_path):
    work = tmp_path / "smoke"
    proc = subprocess.run(["bash", SCRIPT, str(work)], env=_env(AGRO_SMOKE_CPU="1"), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines, out
    m = re.fullmatch(r"gpu_smoke passed=(\d+)/(\d+) skipped=(\d+)", lines[-1])
    assert m, f"last line is not the summary: {lines[-1]!r}\n{out[-6000:]}"
    passed, n, skipped = map(int, m.groups())
    steps = {}
    for line in lines:
        hit = LINE.match(line)
        if hit:
            steps[hit.group(2)] = hit.group(1)
    failed = [s for s, st in steps.items() if st == "FAIL"]
    assert not failed and "] FAIL " not in proc.stdout, f"failed steps {failed}\n{out[-8000:]}"
    assert passed == n - skipped, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    assert len(steps) == n
    # what a CPU run must have exercised, and what it must have skipped with a reason
    for name in ("install", "fused-loss-op", "build-hf", "import", "train-native", "offline-native",
                 "stale-native", "resume", "export"):
        assert steps.get(name) == "PASS", (name, steps)
    for name in ("cuda-stack", "train-te", "train-vllm", "stale-vllm", "tp2"):
        assert steps.get(name) == "SKIP", (name, steps)
        assert re.search(rf"^\[gpu_smoke\] SKIP {re.escape(name)}: \S", proc.stdout, re.M), name
    assert re.search(r"resumed from \S*step_000006 at step 6", proc.stdout)
    assert re.search(r"^\[gpu_smoke\] PASS export .*max\|diff\|/max\|ref\|", proc.stdout, re.M)
    for name in steps:
        if name != "preflight" and steps[name] != "SKIP":
            assert (work / "logs" / f"{name}.log").exists(), name
    assert (work / "runs" / "train-native" / "final_model" / "agro_checkpoint.json").exists()
    assert (work / "exported" / "config.json").exists()


def test_gpu_smoke_script_refuses_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal is for machines without one")
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "smoke")], env=_env(), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "AGRO_SMOKE_CPU=1" in proc.stderr, proc.stderr
    assert "gpu_smoke passed=" not in proc.stdout


def test_gpu_smoke_script_refuses_a_work_dir_inside_the_repo(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, os.path.join(ROOT, "tools")], env=_env(AGRO_SMOKE_CPU="1"),
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "inside the repository" in proc.stderr, proc.stderr
