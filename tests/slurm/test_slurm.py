"""slurm/*.sbatch, unmodified, on a real one-node Slurm (tests/slurm/cluster.sh).

Only command-line sbatch options differ from a GPU cluster: --gpus-per-node=0 / --gpus=0 and
small --cpus-per-task (the node has 2 CPUs). The training job runs 1 node x 2 tasks with gloo.
Its requeue is driven the way `--signal=B:USR1@T` drives it (a USR1 to the batch shell only,
here sent at once with `scancel --batch --signal=USR1` instead of waiting for the time limit).
"""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = ["model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
        "data.synthetic_train_size=64", "data.synthetic_heldout_size=8", "data.system_prompt=null",
        "rollout.n=2", "rollout.max_new_tokens=8", "train.prompts_per_step=4", "sft.steps=0",
        "eval.max_problems=2", "logging.progress=false", "logging.plots=false", "parallel.tp=2"]
STEPS = 30
CPU_NODE = ("--gpus-per-node=0", "--cpus-per-task=1")


def _wait_for_first_step(metrics: Path, job: str, cluster, timeout: float = 300) -> None:
    """Until the trainer has logged a training step (metrics.jsonl is appended step by step)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if any('"train/loss"' in line for line in metrics.read_text().splitlines()):
                return
        except OSError:
            pass
        info = cluster.job(job)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} ended before its first step: {info}\n{tail(Path(info['StdOut']))}")
        time.sleep(0.2)
    raise AssertionError(f"no training step logged in {metrics} after {timeout} s")


@pytest.fixture(scope="module")
def requeued_train_job(slurm_cluster, tmp_path_factory):
    """One train.sbatch job: 1 node x 2 tasks; USR1 after its first step; requeued; run to the end.

    checkpoint.save_every=0: the only checkpoint before the requeue is the one the signal makes.
    """
    work = tmp_path_factory.mktemp("train")
    run_dir = work / "run"
    job = slurm_cluster.submit(
        "train.sbatch", str(REPO / "examples" / "tiny_cpu.yaml"), *TINY, f"train.steps={STEPS}",
        "checkpoint.save_every=0", "checkpoint.keep_last=5", f"logging.dir={run_dir}",
        sbatch_args=(*CPU_NODE, "--ntasks-per-node=2"), cwd=work)
    _wait_for_first_step(run_dir / "metrics.jsonl", job, slurm_cluster)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm_cluster.wait(job, restarts=1, settle=3, timeout=480)
    log = Path(info["StdOut"]).read_text(errors="replace")
    return {"job": job, "info": info, "log": log, "run_dir": run_dir}


def test_train_job_completes_on_two_ranks(requeued_train_job):
    info, log, run_dir = (requeued_train_job[k] for k in ("info", "log", "run_dir"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info['_history']} {info}\n{log[-4000:]}"
    # every launch (first run and the requeued one): two ranks, each in a world of two, over gloo
    for r in (0, 1):
        lines = re.findall(rf"^{r}: \[rank {r}/(\d+)\] (\w+) process group up", log, re.M)
        assert [w for w, _ in lines] == ["2", "2"], f"rank {r} saw {lines}\n{log[-4000:]}"
        assert {b for _, b in lines} == {"gloo"}
    final = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    assert (final / "COMPLETE").exists() and (final / "rank_00000.pt").exists() and (final / "rank_00001.pt").exists()
    assert json.loads((run_dir / "result.json").read_text())["steps"] == STEPS
    events = glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    assert events and any(b"train/loss" in Path(e).read_bytes() for e in events), events


def test_usr1_checkpoints_requeues_and_resumes(requeued_train_job):
    info, log, run_dir = (requeued_train_job[k] for k in ("info", "log", "run_dir"))
    assert info["Restarts"] == "1", f"{info['_history']}\n{log[-4000:]}"
    assert "USR1: asking every rank to save a checkpoint" in log
    stopped = re.findall(r"stopped by signal at step (\d+); checkpoint saved", log)
    assert len(stopped) == 1, f"expected one signal stop:\n{log[-4000:]}"
    k = int(stopped[0])
    assert 0 < k < STEPS
    assert f"requeueing job {requeued_train_job['job']} to resume" in log and "(restart 1)" in log
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(run_dir / "checkpoints" / f"step_{k:06d}"), str(k))], f"{resumed}\n{log[-4000:]}"
    # the metrics of the two runs join up: every step once, none lost and none repeated
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in line]
    assert steps == list(range(1, STEPS + 1))


def test_convert_job_round_trip(slurm_cluster, tmp_path):
    """convert.sbatch import (TP=2) then export: the HF weights come back bit for bit."""
    import torch
    from safetensors.torch import load_file

    from agro_megatron.testing.tiny_llama import write_tiny_llama

    hf = write_tiny_llama(tmp_path / "hf", vocab_size=300, layers=2, kv_heads=2)
    for args in (["import", "--hf", str(hf), "--out", str(tmp_path / "mcore"), "--tp", "2", "--quiet"],
                 ["export", "--megatron", str(tmp_path / "mcore"), "--out", str(tmp_path / "hf2"), "--quiet"]):
        job = slurm_cluster.submit("convert.sbatch", *args, sbatch_args=("--cpus-per-task=1",), cwd=tmp_path)
        info = slurm_cluster.wait(job, timeout=240)
        assert info["JobState"] == "COMPLETED", f"{info}\n{tail(Path(info['StdOut']))}"
        assert "conversion finished" in Path(info["StdOut"]).read_text()
    before = load_file(str(hf / "model.safetensors"))
    after = {}
    for f in (tmp_path / "hf2").glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_eval_job_scores_responses(slurm_cluster, tmp_path):
    """eval.sbatch on precomputed responses: accuracy equals the count of right answers written."""
    from agro_megatron.data import load_problems

    data = REPO / "examples" / "data" / "math_sample.jsonl"
    problems = load_problems(str(data))
    with open(tmp_path / "responses.jsonl", "w") as f:
        for i, p in enumerate(problems):  # problem i: right on the first i % 3 of 3 samples
            rs = [f"The final answer is ${p.answer if j < i % 3 else 'wrong'}$" for j in range(3)]
            f.write(json.dumps({"id": p.id, "responses": rs}) + "\n")
    job = slurm_cluster.submit("eval.sbatch", "--data", str(data), "--responses", str(tmp_path / "responses.jsonl"),
                               "--out", str(tmp_path / "scores.json"), "--workers", "1",
                               sbatch_args=("--gpus=0", "--cpus-per-task=1"), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", f"{info}\n{tail(Path(info['StdOut']))}"
    report = json.loads((tmp_path / "scores.json").read_text())
    right = sum(i % 3 for i in range(len(problems)))
    assert report["overall"]["accuracy"] == pytest.approx(right / (3 * len(problems)))
