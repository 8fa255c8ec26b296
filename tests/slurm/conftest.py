"""A real one-node Slurm for the `slurm` test tier (started by tests/slurm/cluster.sh).

The session fixture starts munged, slurmctld and slurmd in a temp dir (installing Debian's
packages first if they are missing) and stops them at the end, after cancelling every job. Where
that cannot work (not root, no apt-get, packages unavailable) every test of the tier is skipped
with cluster.sh's reason. Jobs are watched with `scontrol show job` (no accounting, so no sacct);
`sbatch --wait` is avoided because it polls at up to 30 s intervals.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
CANNOT_RUN = 77  # cluster.sh: "cannot run a Slurm cluster here", with the reason on stderr
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmCluster:
    dir: Path
    env: dict = field(repr=False)
    submitted: list = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def submit(self, script: str, *script_args: str, sbatch_args: tuple = (), cwd: Path) -> str:
        """sbatch REPO/slurm/<script> with the test's options; returns the job id."""
        out = self.run("sbatch", "--parsable", f"--chdir={cwd}", f"--output={cwd}/%x-%j.out",
                       *sbatch_args, str(REPO / "slurm" / script), *script_args).stdout.strip()
        job = out.split(";")[0]
        self.submitted.append(job)
        return job

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, Reason, StdOut, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout.strip()
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def wait(self, job_id: str, *, timeout: float, restarts: int = 0, settle: float = 2.0,
             poll: float = 0.5) -> dict:
        """Until the job is in a final state after at least `restarts` requeues (or has ended
        without them: the caller's assertions say so), unchanged for `settle` seconds: while
        Slurm requeues a job its state can read COMPLETED for a moment before PENDING. A requeued
        job is made eligible after 3 s (Slurm itself holds it back ~2 min via its BeginTime).
        The returned dict's "_history" lists the (state, restarts) seen, for failure messages."""
        end = time.monotonic() + timeout
        history: list[tuple[str, int]] = []
        final_since = requeued_at = None
        while True:
            info = self.job(job_id)
            state, n = info.get("JobState", "?"), int(info.get("Restarts", "0"))
            if not history or history[-1] != (state, n):
                history.append((state, n))
                final_since = None
            info["_history"] = history
            if state in TERMINAL:
                final_since = final_since or time.monotonic()
                if time.monotonic() - final_since >= (settle if n >= restarts else max(settle, 10.0)):
                    return info
            if state == "PENDING" and n > 0:
                requeued_at = requeued_at or time.monotonic()
                # not sooner: slurmd refuses ("Job credential revoked") a launch in the same second
                # as the old allocation's revocation; Slurm's own 2 min delay exists for this
                if info.get("Reason") == "BeginTime" and time.monotonic() - requeued_at > 3:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {history} {info}\n"
                                     f"{tail(Path(info.get('StdOut', '')))}")
            time.sleep(poll)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def _start(cluster_dir: Path) -> str:
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        pytest.skip("the slurm tier needs Linux and bash (Debian's slurm packages)")
    p = subprocess.run(["bash", str(CLUSTER_SH), "start", str(cluster_dir)], capture_output=True, text=True,
                       timeout=900)
    if p.returncode == CANNOT_RUN:
        pytest.skip(f"slurm tier skipped: {p.stderr.strip().splitlines()[-1]}")
    if p.returncode != 0:
        logs = "\n".join(f"--- {f}\n{tail(f, 15)}" for f in sorted(cluster_dir.glob("**/*.log")))
        pytest.fail(f"tests/slurm/cluster.sh start failed (exit {p.returncode}):\n{p.stderr}\n{logs}", pytrace=False)
    m = re.search(r"^export SLURM_CONF=(\S+)$", p.stdout, re.M)
    assert m, f"cluster.sh printed no SLURM_CONF line: {p.stdout!r}"
    return m.group(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    # Under /tmp with mode 755 (cluster.sh sets it): munged runs as user munge and must reach its
    # socket; pytest's own tmp dirs are 0700.
    cluster_dir = Path(tempfile.mkdtemp(prefix="agro-slurm-"))
    started = False
    try:
        conf = _start(cluster_dir)
        started = True
        env = dict(os.environ, SLURM_CONF=conf,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        yield SlurmCluster(dir=cluster_dir, env=env)
    finally:
        if started:  # cancels every job, waits for them, then stops the daemons it started (pid files)
            p = subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cluster_dir)], capture_output=True,
                               text=True, timeout=180)
            if p.returncode != 0:
                print(f"cluster.sh stop: {p.stderr}", file=sys.stderr)
        if not os.environ.get("AGRO_SLURM_KEEP"):
            shutil.rmtree(cluster_dir, ignore_errors=True)


MULTINODE_SH = Path(__file__).resolve().parent / "multinode_cluster.sh"


@dataclass
class MultiNodeCluster(SlurmCluster):
    """A SlurmCluster whose nodes (node1, node2, ...) are separate hosts: network + UTS namespaces."""

    def node(self, op: str, node: str) -> str:
        """multinode_cluster.sh kill-node / start-node NODE: a host dying or coming back."""
        p = subprocess.run(["bash", str(MULTINODE_SH), op, str(self.dir), node], capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"multinode_cluster.sh {op} {node} exited {p.returncode}: {p.stderr}")
        return p.stderr.strip()

    def subnet(self) -> str:
        """The cluster's 10.77.X prefix (node I is 10.77.X.(I+1); 10.77.X.1 is the controller)."""
        return re.search(r"^SUBNET=(\S+)$", (self.dir / "cluster.env").read_text(), re.M).group(1)


@pytest.fixture(scope="session")
def multinode_cluster():
    """Two Slurm nodes on one machine (tests/slurm/multinode_cluster.sh), torn down at the end even
    when a test failed; skipped with the script's reason where namespaces or Slurm cannot be had."""
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        pytest.skip("the multi-node slurm tier needs Linux and bash")
    cluster_dir = Path(tempfile.mkdtemp(prefix="agro-slurm2-"))
    p = subprocess.run(["bash", str(MULTINODE_SH), "start", str(cluster_dir), "2"], capture_output=True,
                       text=True, timeout=900)
    try:
        if p.returncode == CANNOT_RUN:
            pytest.skip(f"multi-node slurm tier skipped: {p.stderr.strip().splitlines()[-1]}")
        if p.returncode != 0:
            logs = "\n".join(f"--- {f}\n{tail(f, 15)}" for f in sorted(cluster_dir.glob("**/*.log")))
            pytest.fail(f"tests/slurm/multinode_cluster.sh start failed (exit {p.returncode}):\n{p.stderr}\n{logs}",
                        pytrace=False)
        m = re.search(r"^export SLURM_CONF=(\S+)$", p.stdout, re.M)
        assert m, f"multinode_cluster.sh printed no SLURM_CONF line: {p.stdout!r}"
        env = dict(os.environ, SLURM_CONF=m.group(1),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        yield MultiNodeCluster(dir=cluster_dir, env=env)
    finally:
        # cancels every job, kills what is left on the nodes, deletes namespaces, bridge and host files
        if (cluster_dir / "cluster.env").exists():
            s = subprocess.run(["bash", str(MULTINODE_SH), "stop", str(cluster_dir)], capture_output=True,
                               text=True, timeout=180)
            if s.returncode != 0:
                print(f"multinode_cluster.sh stop: {s.stderr}", file=sys.stderr)
        if not os.environ.get("AGRO_SLURM_KEEP"):
            shutil.rmtree(cluster_dir, ignore_errors=True)
