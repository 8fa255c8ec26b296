"""agro-study on a real one-node Slurm (tests/slurm/cluster.sh): a 4-cell tiny study submitted as
job arrays, one array task signalled (USR1, as --signal=B:USR1@T does before the time limit) and
requeued, resuming from the checkpoint the signal made; the report job runs after every array;
a second `run --slurm` skips the DONE cells.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 200  # long enough (~20 s on a quiet machine) that the USR1 lands before the cell finishes


def _study(tmp: Path) -> Path:
    (tmp / "tiny.yaml").write_text(f"""
base: {REPO / 'examples' / 'tiny_cpu.yaml'}
model:
  tiny: {{hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1, head_dim: 16}}
data: {{synthetic_train_size: 16, synthetic_heldout_size: 4}}
rollout: {{n: 2, max_new_tokens: 6}}
train: {{steps: {STEPS}, prompts_per_step: 2}}
sft: {{steps: 2, batch_size: 4}}
eval: {{every: 50, n: 2, max_problems: 4}}
logging: {{progress: false, plots: false, tensorboard: false}}
checkpoint: {{save_every: 0, keep_last: 5}}
""")
    spec = tmp / "study.yaml"
    spec.write_text("""
name: slurm_tiny
base: tiny.yaml
seeds: [1, 2]
baseline: a
resources: {nodes: 1, procs_per_node: 1, cpus_per_task: 1, time_limit: "00:20:00"}
slurm: {max_parallel: 2}
arms:
  a: {overrides: [algorithm.estimator=agro_on]}
  b: {overrides: [algorithm.estimator=rloo]}
""")
    return spec


def _cli(cluster, *args):
    return cluster.run(sys.executable, "-m", "agro_megatron.cli.study", *args, timeout=300)


def _wait_for_step(metrics: Path, task: str, cluster, timeout: float = 400) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.exists() and '"train/loss"' in metrics.read_text():
            return
        state = cluster.job(task).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"task {task} ended ({state}) before its first step")
        time.sleep(0.3)
    raise AssertionError(f"no step logged in {metrics}")


def _signal_batch_shell(cluster, task: str, logs: Path, timeout: float = 120) -> None:
    """USR1 to the array task's batch shell only, as --signal=B:USR1@T does before the time limit.

    `scancel --batch --signal=USR1` delivers it at once, but on an array task (Slurm 22.05 here)
    the command then keeps retrying ("Job can not be altered now") after the task has requeued
    itself, so it is stopped once the task's log shows the signal arrived."""
    array, index = task.split("_")
    p = subprocess.Popen(["scancel", "--batch", "--signal=USR1", task], env=cluster.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if any("USR1: asking the cell" in f.read_text(errors="replace")
                   for f in logs.glob(f"*_{array}_{index}.out")):
                return
            if p.poll() not in (None, 0):
                raise AssertionError(f"scancel failed: {p.stderr.read()}")
            time.sleep(0.3)
        raise AssertionError(f"task {task} never logged the USR1")
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)


def test_study_arrays_requeue_resume_and_report(slurm_cluster, tmp_path):
    spec, study = _study(tmp_path), tmp_path / "st"
    out = _cli(slurm_cluster, "run", str(spec), "--study-dir", str(study), "--slurm").stdout
    arrays = re.findall(r"submitted array (\d+): \S+ \((\d+) cells\)", out)
    report_job = re.search(r"submitted report job (\d+) after (\S+)", out)
    assert [n for _, n in arrays] == ["4"] and report_job, out
    array = arrays[0][0]
    slurm_cluster.submitted += [array, report_job.group(1)]
    assert report_job.group(2) == array
    assert "Dependency=afterany:" + array in " ".join(f"{k}={v}" for k, v in slurm_cluster.job(report_job.group(1)).items())
    cells = (study / "slurm").glob("*.cells")
    ids = next(cells).read_text().split()
    victim = study / "cells" / ids[0]
    task = f"{array}_0"
    _wait_for_step(victim / "run" / "metrics.jsonl", task, slurm_cluster)
    _signal_batch_shell(slurm_cluster, task, study / "slurm" / "logs")
    infos = {i: slurm_cluster.wait(f"{array}_{i}", restarts=1 if i == 0 else 0, timeout=900) for i in range(4)}
    rep = slurm_cluster.wait(report_job.group(1), timeout=300)
    for i, info in infos.items():
        log = "\n".join(p.read_text(errors="replace") for p in (study / "slurm" / "logs").glob(f"*_{array}_{i}.out"))
        assert info["JobState"] == "COMPLETED", f"task {i}: {info['_history']}\n{log[-3000:]}"
        assert json.loads((study / "cells" / ids[i] / "status.json").read_text())["state"] == "DONE"
    logs = sorted(p.name for p in (study / "slurm" / "logs").glob(f"*_{array}_*.out"))  # %x_%A_%a.out
    assert [n.rsplit("_", 1)[1] for n in logs] == ["0.out", "1.out", "2.out", "3.out"], logs
    # the signalled task: requeued once, resumed from the checkpoint its signal made, no step lost or repeated
    assert infos[0]["Restarts"] == "1"
    status = json.loads((victim / "status.json").read_text())
    assert status["attempts"] == 2 and status["failures"] == 0
    first, second = (victim / "attempt_1.log").read_text(), (victim / "attempt_2.log").read_text()
    stopped = re.findall(r"stopped by signal at step (\d+); checkpoint saved", first)
    assert len(stopped) == 1, first[-3000:]
    k = int(stopped[0])
    assert re.search(rf"resumed from \S+step_{k:06d} at step {k}", second), second[-3000:]
    steps = [json.loads(x)["step"] for x in (victim / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in x]
    assert steps == list(range(1, STEPS + 1))
    # the report job ran after every array task had ended, and saw all four cells
    assert rep["JobState"] == "COMPLETED", rep
    ends = [time.strptime(i["EndTime"], "%Y-%m-%dT%H:%M:%S") for i in infos.values()]
    assert time.strptime(rep["StartTime"], "%Y-%m-%dT%H:%M:%S") >= max(ends)
    md = (study / "report" / "report.md").read_text()
    assert "4 of 4 cells finished" in md and (study / "report" / "results.csv").exists()
    # a second run skips the DONE cells: no array, only a report job
    again = _cli(slurm_cluster, "run", str(spec), "--study-dir", str(study), "--slurm").stdout
    assert "0 to submit in 0 array(s)" in again and "skipped: 4 done" in again and "submitted array" not in again
    job = re.search(r"submitted report job (\d+)", again).group(1)
    slurm_cluster.submitted.append(job)
    assert slurm_cluster.wait(job, timeout=300)["JobState"] == "COMPLETED"
