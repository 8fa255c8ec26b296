"""Fast checks (no cluster) of what slurm/train.sbatch relies on in the package: srun's task
variables mapped to torch.distributed's, the rendezvous host and port, agro-train's exit 75."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from agro_megatron import parallel

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NODELISTS = {  # compressed Slurm node list -> its first host, enumerated by hand
    "localhost": "localhost",
    "gpu-[003-010,012],cpu1": "gpu-003",
    "rack[1-2]-n[01-04]": "rack1-n01",
    "a1,a2": "a1",
    "node[7]": "node7",
    "n[1,3-4]": "n1",
    "big[0098-0101]": "big0098",
}


@pytest.fixture
def clean_env(monkeypatch):
    saved = {k: os.environ.get(k) for k in LAUNCH_VARS}
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
              "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    # parallel._env_from_slurm writes os.environ itself: undo that too, or later tests (and the
    # subprocesses they start) would try to rendezvous with this test's made-up job. monkeypatch
    # first: a setenv after _env_from_slurm recorded the value it wrote and would put it back.
    monkeypatch.undo()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("nodelist", sorted(NODELISTS))
def test_first_host_without_scontrol(nodelist, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert parallel._first_host(nodelist) == NODELISTS[nodelist]


def test_first_host_fallback_agrees_with_scontrol(slurm_cluster, monkeypatch, tmp_path):
    """Our pure-Python host-list expansion against scontrol's own (installed by the slurm_cluster
    fixture: a collection-time `which scontrol` skipped this test on every fresh machine)."""
    import os

    conf = tmp_path / "slurm.conf"  # scontrol wants some configuration even to expand host lists
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for nodelist in NODELISTS:
        ref = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, env=env).stdout.split()[0]
        with monkeypatch.context() as m:
            m.setattr(shutil, "which", lambda name: None)
            assert parallel._first_host(nodelist) == ref
        monkeypatch.setenv("SLURM_CONF", str(conf))
        assert parallel._first_host(nodelist) == ref  # the scontrol path itself


def test_srun_task_is_mapped(clean_env):
    import os

    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "16")
    clean_env.setenv("SLURM_LOCALID", "5")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu-[003-004]")
    clean_env.setenv("SLURM_STEP_NODELIST", "gpu-[003-004]")
    assert parallel._env_from_slurm()
    assert {k: os.environ[k] for k in LAUNCH_VARS} == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu-003",
        "MASTER_PORT": str(20000 + 456 * 10 + 0)}


def test_ports_differ_between_steps_and_jobs():
    ports = {parallel._slurm_port(str(job), str(step)) for job in range(1000, 1100) for step in range(3)}
    assert len(ports) == 300 and all(20000 <= p < 30000 for p in ports)


def test_batch_shell_is_not_mapped(clean_env):
    """sbatch's own shell has SLURM_PROCID=0 and the job's SLURM_NTASKS but is one process."""
    import os

    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_JOB_NODELIST", "localhost")
    assert not parallel._env_from_slurm()
    assert not any(k in os.environ for k in LAUNCH_VARS)


def test_explicit_launcher_variables_win(clean_env):
    import os

    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_JOB_NODELIST", "localhost")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    assert parallel._env_from_slurm()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "29500")
    clean_env.setenv("RANK", "0")  # torchrun inside srun: its variables are left alone
    assert not parallel._env_from_slurm()


def test_partial_launcher_environment_is_refused_with_the_fix(clean_env):
    clean_env.setenv("RANK", "1")  # e.g. left over in a shell; torch would only say WORLD_SIZE is missing
    with pytest.raises(RuntimeError, match=r"is set, but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*unset RANK"):
        parallel.init_distributed()


def test_agro_train_exit_status(monkeypatch):
    """75 when the run stopped on a signal with a checkpoint (train.sbatch requeues on it), else 0."""
    from agro_megatron.cli import train as cli
    from agro_megatron.train import run

    for result, code in (({"stopped": True, "steps": 3}, 75), ({"steps": 5}, 0)):
        monkeypatch.setattr(run, "run_job", lambda cfg, result=result: result)
        assert cli.main(["rollout.n=2"]) == code
