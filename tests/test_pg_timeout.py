"""parallel.timeout_minutes reaches the process group, and rank 0's long start-up conversion of
model.hf_checkpoint does not sit behind a collective: the other ranks wait on the filesystem
(parallel.run_on_rank0), bounded by parallel.long_work_timeout_minutes, and stop with a named
error when the conversion fails."""
import os
import subprocess
import sys
import time

import pytest

from agro_megatron.config import ConfigError, JobConfig
from agro_megatron.testing.distributed import free_port, launcher_free_env, run_distributed

# One rank of a 2-process job, started as torchrun would start it (RANK, WORLD_SIZE, MASTER_*):
# import_hf is wrapped to sleep first (a 70B conversion, in miniature) and, in mode "fail", to raise.
RANK_SCRIPT = r"""
import json, sys, time
mode, sleep_s, hf, log_dir, timeout_min = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
from agro_megatron.checkpoint import convert
real_import_hf = convert.import_hf

def slow_import_hf(*args, **kwargs):
    time.sleep(sleep_s)
    if mode == "fail":
        raise convert.ConversionError("simulated conversion failure")
    return real_import_hf(*args, **kwargs)

convert.import_hf = slow_import_hf
import torch
import torch.distributed as dist
from agro_megatron.testing.train_checks import tiny_config
from agro_megatron.train.run import setup_job

cfg = tiny_config(log_dir, **{"model.hf_checkpoint": hf, "parallel.timeout_minutes": timeout_min,
                              "parallel.long_work_timeout_minutes": 5})
ctx = setup_job(cfg)
backend = dist.group.WORLD._get_backend(torch.device("cpu"))  # gloo: its options hold the timeout
print("SETUP_OK " + json.dumps({"rank": dist.get_rank(), "pg_timeout_s": backend.options._timeout.total_seconds()}),
      flush=True)
dist.destroy_process_group()
"""


def _launch(mode: str, sleep_s: float, hf, log_dir, timeout_min: float, limit_s: float = 240) -> list:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = launcher_free_env() | dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                                         PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, mode, str(sleep_s), str(hf), str(log_dir),
                                       str(timeout_min)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=limit_s)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from agro_megatron.testing.tiny_llama import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("hf") / "hf", vocab_size=300, hidden=64, layers=2, heads=4,
                            kv_heads=2, tokenizer=True)


def test_timeout_keys_are_validated():
    for key in ("timeout_minutes", "long_work_timeout_minutes", "rendezvous_timeout_minutes"):
        with pytest.raises(ConfigError, match=rf"parallel.{key}=0.0 is out of range: it must be .*> 0"):
            JobConfig.load(None, [f"parallel.{key}=0"]).validate()
    cfg = JobConfig.load(None, ["parallel.timeout_minutes=0.05"]).validate()
    assert cfg.parallel.timeout_minutes == 0.05 and cfg.parallel.long_work_timeout_minutes > 30


@pytest.mark.slow
@pytest.mark.distributed
def test_slow_rank0_conversion_outlasts_a_short_pg_timeout(hf, tmp_path):
    # process-group timeout 15 s; rank 0's conversion takes > 25 s: before the fix rank 1 sat in a
    # barrier and gloo timed out
    results = _launch("slow", 25, hf, tmp_path / "run", timeout_min=0.25)
    for rank, (rc, stdout, stderr) in enumerate(results):
        assert rc == 0 and "SETUP_OK" in stdout, f"rank {rank} rc={rc}\n{stdout}\n{stderr[-4000:]}"
        line = next(ln for ln in stdout.splitlines() if ln.startswith("SETUP_OK"))
        assert '"pg_timeout_s": 15.0' in line, line  # parallel.timeout_minutes reached the process group
    assert "[rank 1] waiting for rank 0 to convert" in results[1][1]  # the progress message
    assert (tmp_path / "run" / "converted" / "agro_checkpoint.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_rank0_conversion_failure_stops_the_waiting_rank_with_a_named_error(hf, tmp_path):
    start = time.monotonic()
    (rc0, _, err0), (rc1, out1, err1) = _launch("fail", 2, hf, tmp_path / "run", timeout_min=0.1, limit_s=120)
    assert rc0 != 0 and "simulated conversion failure" in err0
    assert rc1 != 0
    assert "RankZeroWorkFailed" in err1 and "simulated conversion failure" in err1, err1[-4000:]
    assert time.monotonic() - start < 100  # not the 5-minute bound
    assert (tmp_path / "run" / "converted.FAILED").exists() and not (tmp_path / "run" / "converted").exists()


def _helper_bound_and_failure(root: str) -> dict:
    """Inside 2 gloo ranks: run_on_rank0's bound, and a failure reported to the waiting rank."""
    import torch.distributed as dist

    from agro_megatron import parallel

    me, out = dist.get_rank(), {}
    done, failed = os.path.join(root, "done"), os.path.join(root, "failed")

    def slow_work():
        time.sleep(4)
        open(done, "w").close()

    try:  # limit 0.6 s: rank 1 gives up with the named timeout while rank 0 still works
        parallel.run_on_rank0(slow_work, done=done, failed=failed, what="to do slow work", limit_minutes=0.01,
                              poll_s=0.1)
        out["bound"] = "returned"
    except parallel.RankZeroWorkTimeout as e:
        out["bound"] = str(e)
        dist.barrier()  # rank 0's closing barrier
    os.remove(done) if me == 0 else None
    dist.barrier()

    def failing_work():
        raise OSError("disk full")

    try:
        parallel.run_on_rank0(failing_work, done=done, failed=failed, what="to do work", limit_minutes=5, poll_s=0.1)
    except (OSError, parallel.RankZeroWorkFailed) as e:
        out["failure"] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_run_on_rank0_bound_and_failure_marker(tmp_path):
    r0, r1 = run_distributed(_helper_bound_and_failure, 2, args=(str(tmp_path),))
    assert r0["bound"] == "returned"
    assert "waited 0.01 min for rank 0 to do slow work" in r1["bound"]
    assert "parallel.long_work_timeout_minutes" in r1["bound"]
    assert r0["failure"] == "OSError: disk full"
    assert r1["failure"].startswith("RankZeroWorkFailed: rank 1: rank 0 failed to do work: OSError: disk full")
