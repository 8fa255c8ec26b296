"""slurm/*.sbatch, unmodified, on a real two-node Slurm: each node its own host (network + UTS
namespace, own IP and hostname, own slurmd; tests/slurm/multinode_cluster.sh).

What only exists across hosts: MASTER_ADDR from the node list, LOCAL_RANK per node, the
rendezvous between hosts, process groups spanning nodes, checkpoints written by ranks on
different hosts, a node dying, a requeue of a two-node job, a node that never meets the others.

The reference for every two-node result is the single-node run of the same layout (torchrun,
4 processes on this machine, the same config and starting checkpoint): on CPU with gloo the
two must be bit-exact, so metrics are compared with == and checkpoints tensor by tensor with
torch.equal (no tolerance). The starting policy is a short SFT run, exported and re-imported with
convert.sbatch on the cluster (a random policy earns no reward, and zero rewards train nothing).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS, SAVE_EVERY = 8, 2
TINY = ["model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
        "data.synthetic_train_size=64", "data.synthetic_heldout_size=8", "data.system_prompt=null",
        "eval.every=0", "eval.max_problems=4", "eval.n=2", "logging.progress=false", "logging.plots=false"]
RL = ["sft.steps=0", "rollout.n=4", "rollout.max_new_tokens=16", "train.prompts_per_step=8", f"train.steps={STEPS}",
      f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep_last=10",
      "parallel.timeout_minutes=3", "parallel.rendezvous_timeout_minutes=2"]
# name -> (tp, pp, cp): with 2 nodes x 2 ranks and megatron's rank order (TP fastest, PP slowest)
# TP and CP pair ranks 0-1 / 2-3 (inside a node), PP splits node1 | node2, DP is what is left.
LAYOUTS = {"tp2_dp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2_pp2": (2, 2, 1), "cp2_dp2": (1, 1, 2)}
TWO_NODES = ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")
NOT_COMPARED = ("time/", "perf/")  # wall-clock measurements


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def layout_args(name: str) -> list[str]:
    tp, pp, cp = LAYOUTS[name]
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}"]


def launcher_free_env() -> dict:
    from agro_megatron.testing.distributed import launcher_free_env as env

    return env() | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_records(run_dir: Path) -> list[tuple[int, dict]]:
    """Every training-step line of metrics.jsonl (a resumed run's repeated steps included)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out.append((r["step"], {k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)}))
    return out


def checkpoint_tensors(ckpt: Path) -> dict:
    """A checkpoint as {name: tensor}: the torch_dist state (weights and optimizer state, all ranks'
    shards assembled) plus every rank's own file (RNG states, progress)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)
        elif "/metrics/history/" not in prefix:  # the logged metrics: compared from metrics.jsonl
            flat[prefix] = x

    tmp = ckpt.parent / f".{ckpt.name}.state.pt"
    dcp_to_torch_save(str(ckpt / "state"), str(tmp))
    walk("state", torch.load(tmp, weights_only=False))
    tmp.unlink()
    for f in sorted(ckpt.glob("rank_*.pt")):
        walk(f.stem, torch.load(f, weights_only=False))
    return flat


def assert_same_checkpoint(a: Path, b: Path) -> int:
    import numpy as np
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for k in ta:
        x, y = ta[k], tb[k]
        if torch.is_tensor(x):
            assert torch.equal(x, y), f"{k}: {a} and {b} differ"
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), k
        else:
            assert x == y, (k, x, y)
    return sum(torch.is_tensor(x) for x in ta.values())


def submit_train(cluster, work: Path, run_dir: Path, layout: str, start: Path, extra: tuple = (),
                 sbatch_args: tuple = ()) -> str:
    return cluster.submit("train.sbatch", str(REPO / "examples" / "tiny_cpu.yaml"), *TINY, *RL, *layout_args(layout),
                          f"model.megatron_checkpoint={start}", f"logging.dir={run_dir}", *extra,
                          sbatch_args=(*TWO_NODES, *sbatch_args), cwd=work)


def wait_for_step(cluster, job: str, run_dir: Path, step: int, timeout: float = 400) -> None:
    """Until metrics.jsonl has a training line for `step` (it is appended step by step)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if any(s >= step for s, _ in train_records(run_dir)):
                return
        except (OSError, json.JSONDecodeError):
            pass
        info = cluster.job(job)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} ended before step {step}: {info}\n{tail(Path(info['StdOut']))}")
        time.sleep(0.2)
    raise AssertionError(f"no training step {step} in {run_dir}/metrics.jsonl after {timeout} s")


# ---- shared runs: the starting policy, one two-node run and one single-node run per layout ----

@pytest.fixture(scope="module")
def start_model(multinode_cluster, tmp_path_factory):
    """SFT (one process, here), then convert.sbatch on the cluster as a user would: export the
    SFT'd policy to HF, import it once for TP=2 x PP=2; every layout starts from that import
    (it is resharded on load)."""
    work = tmp_path_factory.mktemp("start")
    sft = subprocess.run([sys.executable, "-m", "agro_megatron.train", str(REPO / "examples" / "tiny_cpu.yaml"), *TINY,
                          "sft.steps=40", "sft.batch_size=16", "train.steps=0", f"logging.dir={work / 'sft'}"],
                         capture_output=True, text=True, timeout=900, env=launcher_free_env(), cwd=work)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    for args in (["export", "--megatron", str(work / "sft" / "final_model"), "--out", str(work / "hf"), "--quiet"],
                 ["import", "--hf", str(work / "hf"), "--out", str(work / "tp2pp2"), "--tp", "2", "--pp", "2",
                  "--quiet"]):
        job = multinode_cluster.submit("convert.sbatch", *args, sbatch_args=("--cpus-per-task=1",), cwd=work)
        info = multinode_cluster.wait(job, timeout=300)
        assert info["JobState"] == "COMPLETED", f"{info}\n{tail(Path(info['StdOut']))}"
        assert "conversion finished" in Path(info["StdOut"]).read_text()
    return work / "tp2pp2"


@pytest.fixture(scope="module")
def runs(multinode_cluster, start_model, tmp_path_factory):
    """Per layout, lazily: the two-node sbatch run and the single-node torchrun run."""
    cache: dict = {}

    def get(layout: str) -> dict:
        if layout in cache:
            return cache[layout]
        work = tmp_path_factory.mktemp(layout)
        job = submit_train(multinode_cluster, work, work / "two_nodes", layout, start_model)
        info = multinode_cluster.wait(job, timeout=600)
        log = Path(info["StdOut"]).read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info['_history']}\n{log[-5000:]}"
        ref = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
             "-m", "agro_megatron.train", str(REPO / "examples" / "tiny_cpu.yaml"), *TINY, *RL, *layout_args(layout),
             f"model.megatron_checkpoint={start_model}", f"logging.dir={work / 'one_node'}"],
            capture_output=True, text=True, timeout=900, env=launcher_free_env(), cwd=work)
        assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
        cache[layout] = {"job": job, "log": log, "two": work / "two_nodes", "one": work / "one_node", "work": work}
        return cache[layout]

    return get


# ---- acceptance 1: four layouts on two nodes, each equal to the single-node run ----

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_on_two_nodes_equals_one_node(runs, layout):
    r = runs(layout)
    # each rank names its host, its node-local rank and its global rank; ranks 0-1 on node1, 2-3 on node2
    ups = re.findall(r"^(\d): \[rank (\d)/4\] gloo process group up: slurm task (\d) \(local (\d)\) on (\S+), "
                     r"master (\S+):\d+", r["log"], re.M)
    assert sorted((int(g), int(loc), host, master) for _, g, _, loc, host, master in ups) == [
        (0, 0, "node1", "node1"), (1, 1, "node1", "node1"), (2, 0, "node2", "node1"), (3, 1, "node2", "node1")], \
        r["log"][-5000:]
    two, one = train_records(r["two"]), train_records(r["one"])
    assert [s for s, _ in two] == list(range(1, STEPS + 1)) == [s for s, _ in one]
    assert two == one  # every logged number of every step, bit for bit
    assert any(rec["train/grad_norm"] > 0 for _, rec in two), "the run trained nothing: the comparison is empty"
    final = f"step_{STEPS:06d}"
    assert assert_same_checkpoint(r["two"] / "checkpoints" / final, r["one"] / "checkpoints" / final) > 10
    assert json.loads((r["two"] / "result.json").read_text())["layout"] == dict(
        zip(("tp", "pp", "cp"), LAYOUTS[layout]), dp=4 // (LAYOUTS[layout][0] * LAYOUTS[layout][1] * LAYOUTS[layout][2]))


# ---- acceptance 2: convert.sbatch + eval.sbatch on the two-node allocation ----

def test_export_and_eval_of_the_two_node_run(multinode_cluster, runs):
    """convert.sbatch exports the two-node TP2xPP2 run's final model to HF, eval.sbatch scores that
    final model greedily; the reference is the single-node run's final model exported and scored by
    agro-convert / agro-eval directly: the same HF weights bit for bit, the same per-problem results."""
    import torch
    from safetensors.torch import load_file

    r = runs("tp2_pp2")
    work, data = r["work"], REPO / "examples" / "data" / "math_sample.jsonl"
    job = multinode_cluster.submit("convert.sbatch", "export", "--megatron", str(r["two"] / "final_model"),
                                   "--out", str(work / "hf_two"), "--quiet", sbatch_args=("--cpus-per-task=1",),
                                   cwd=work)
    info = multinode_cluster.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", f"{info}\n{tail(Path(info['StdOut']))}"
    eval_args = ["--data", str(data), "--limit", "4", "--n", "2", "--temperature", "0", "--max-new-tokens", "16",
                 "--engine", "native", "--workers", "1"]
    job = multinode_cluster.submit("eval.sbatch", *eval_args, "--model", str(r["two"] / "final_model"),
                                   "--out", str(work / "eval_two.json"), sbatch_args=("--gpus=0", "--cpus-per-task=1"),
                                   cwd=work)
    env = launcher_free_env()
    subprocess.run([sys.executable, "-m", "agro_megatron.cli.convert", "export", "--megatron",
                    str(r["one"] / "final_model"), "--out", str(work / "hf_one"), "--quiet"],
                   check=True, env=env, timeout=300, capture_output=True)
    subprocess.run([sys.executable, "-m", "agro_megatron.cli.eval", *eval_args, "--model", str(r["one"] / "final_model"),
                    "--out", str(work / "eval_one.json"), "--no-progress"], check=True, env=env, timeout=600,
                   capture_output=True)
    info = multinode_cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED", f"{info}\n{tail(Path(info['StdOut']))}"
    assert "evaluation finished" in Path(info["StdOut"]).read_text()

    def weights(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = weights(work / "hf_two"), weights(work / "hf_one")
    assert sorted(a) == sorted(b) and len(a) > 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    two, one = (json.loads((work / f).read_text()) for f in ("eval_two.json", "eval_one.json"))
    assert two["overall"] == one["overall"]
    assert two.get("problems") == one.get("problems")


# ---- acceptance 3 and 4: a node dies, a two-node job is requeued ----

def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


def assert_resumed_exactly(info: dict, run_dir: Path, k: int, ref: dict) -> None:
    """One requeue; the second run resumed at step k; every step's metrics (of both runs, the
    repeated steps included) and the final checkpoint equal the uninterrupted two-node run's."""
    log = Path(info["StdOut"]).read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info['_history']}\n{log[-5000:]}"
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(run_dir / "checkpoints" / f"step_{k:06d}"), str(k))], f"{resumed}\n{log[-5000:]}"
    expected = dict(train_records(ref["two"]))
    got = train_records(run_dir)
    assert sorted({s for s, _ in got}) == list(range(1, STEPS + 1))
    for step, rec in got:
        assert rec == expected[step], f"step {step} differs from the uninterrupted run"
    final = f"step_{STEPS:06d}"
    assert_same_checkpoint(run_dir / "checkpoints" / final, ref["two"] / "checkpoints" / final)


def test_node_fault_requeues_and_resumes_exactly(multinode_cluster, runs, start_model, tmp_path):
    """Mid-run, every process on node2 is killed (its slurmd, the step daemon, both ranks), as a
    dead host would. Policy (train.sbatch has --requeue; the cluster JobRequeue=1): Slurm marks
    node2 DOWN after SlurmdTimeout and requeues the job (NODE_FAIL); node2 comes back (slurmd
    restarted, as a rebooted host), the job runs again on both nodes and resumes from the newest
    complete checkpoint with nothing lost."""
    ref = runs("pp2")  # PP=2 across the nodes: node2 holds the second half of the layers
    run_dir = tmp_path / "run"
    job = submit_train(multinode_cluster, tmp_path, run_dir, "pp2", start_model)
    wait_for_step(multinode_cluster, job, run_dir, SAVE_EVERY + 1)  # the step-2 checkpoint is complete
    multinode_cluster.node("kill-node", "node2")
    time.sleep(3)  # a save in flight cannot complete without node2's ranks
    done = complete_checkpoints(run_dir)
    assert done and max(done) < STEPS, f"the run ended before the fault: {done}"
    k = max(done)
    end = time.monotonic() + 180  # Slurm notices the dead node (SlurmdTimeout=10 s) and requeues
    while multinode_cluster.job(job).get("Restarts", "0") == "0":
        info = multinode_cluster.job(job)
        assert time.monotonic() < end and info["JobState"] not in ("FAILED", "COMPLETED", "CANCELLED"), \
            f"not requeued after node2 died: {info}\n{tail(Path(info['StdOut']))}"
        time.sleep(0.5)
    multinode_cluster.node("start-node", "node2")
    info = multinode_cluster.wait(job, restarts=1, timeout=600)
    assert_resumed_exactly(info, run_dir, k, ref)


def test_scontrol_requeue_checkpoints_on_both_nodes_and_resumes(multinode_cluster, runs, start_model, tmp_path):
    """`scontrol requeue` of the running two-node job: Slurm sends every rank SIGTERM (SIGKILL
    only KillWait later); all four ranks, on both nodes, finish their step and save a checkpoint
    (exit 75); the requeued job resumes from exactly that checkpoint and ends as if uninterrupted."""
    ref = runs("tp2_dp2")  # DP across the nodes: both nodes' ranks hold optimizer shards
    run_dir = tmp_path / "run"
    job = submit_train(multinode_cluster, tmp_path, run_dir, "tp2_dp2", start_model)
    wait_for_step(multinode_cluster, job, run_dir, 1)
    multinode_cluster.run("scontrol", "requeue", job)
    info = multinode_cluster.wait(job, restarts=1, timeout=600)
    log = Path(info["StdOut"]).read_text(errors="replace")
    stopped = re.findall(r"stopped by signal at step (\d+); checkpoint saved", log)
    assert len(stopped) == 1, log[-5000:]
    k = int(stopped[0])
    assert 0 < k < STEPS
    ckpt = run_dir / "checkpoints" / f"step_{k:06d}"
    assert (ckpt / "COMPLETE").exists() and sorted(p.name for p in ckpt.glob("rank_*.pt")) == [
        f"rank_{r:05d}.pt" for r in range(4)]  # ranks 0-1 on node1 and 2-3 on node2 all saved
    assert_resumed_exactly(info, run_dir, k, ref)


# ---- acceptance 5: the nodes never meet ----

LATE = """#!/bin/bash
# AGRO_PYTHON for this test: node2 starts its ranks late, or cannot reach MASTER_ADDR
if [ "$(hostname)" = node2 ]; then
    case "$MODE" in
        late) sleep 600 ;;
        unreachable) export MASTER_ADDR=$DEAD_ADDR ;;  # an address on the subnet where no host answers
    esac
fi
exec python3 "$@"
"""


@pytest.mark.parametrize("mode", ["late", "unreachable"])
def test_rendezvous_failure_is_a_named_error_within_the_bound(multinode_cluster, start_model, tmp_path, mode):
    """node2's ranks start late (10 min), or look for the master at an address no host answers:
    the ranks stop with parallel.RendezvousError after parallel.rendezvous_timeout_minutes
    (0.25 here), srun ends the step, and the job fails in bounded time instead of hanging until
    its wall-clock limit."""
    wrapper = tmp_path / "python_wrapper.sh"
    wrapper.write_text(LATE)
    wrapper.chmod(0o755)
    export = f"--export=ALL,AGRO_PYTHON={wrapper},MODE={mode},DEAD_ADDR={multinode_cluster.subnet()}.250"
    t0 = time.monotonic()
    job = submit_train(multinode_cluster, tmp_path, tmp_path / "run", "tp2_dp2", start_model,
                       extra=("parallel.rendezvous_timeout_minutes=0.25",), sbatch_args=(export, "--time=15"))
    info = multinode_cluster.wait(job, timeout=400)
    elapsed = time.monotonic() - t0
    log = Path(info["StdOut"]).read_text(errors="replace")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info['_history']}\n{log[-5000:]}"
    assert "RendezvousError" in log and "parallel.rendezvous_timeout_minutes" in log, log[-5000:]
    # late: rank 0 waits for node2 in vain. unreachable: node2's ranks cannot connect and rank 0 waits
    # for them, both bounded by the same 15 s, so whichever reports first wins and srun ends the rest
    failing = "0" if mode == "late" else "[0-3]"
    assert re.search(rf"rank {failing}/4 on node\d: rendezvous at \S+ failed", log), log[-5000:]
    assert elapsed < 240, f"{elapsed:.0f} s: the failure took too long to surface"
