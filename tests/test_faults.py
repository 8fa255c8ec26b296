"""Faults during checkpointing: nothing that was complete before the fault is lost, and every run
either resumes exactly or stops with a named error.

Faults come from outside the trainer, as they would in production: SIGKILL at a named point of a
save (the inert AGRO_FAULT_KILL_AT hook of checkpoint/atomic.py) or at a moment picked by polling,
SIGTERM during SFT, bytes flipped or cut off on disk, a tmpfs that fills up or turns read-only
(root; otherwise a file-size limit and chmod). "Resumes exactly" is checked against an
uninterrupted run of the same tiny job: the weight and optimizer files of the final checkpoint
must be byte-identical (SHA-256 of every .distcp file).
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from agro_megatron.checkpoint import manifest
from agro_megatron.testing import fault_checks as fc
from agro_megatron.testing.distributed import launcher_free_env
from agro_megatron.train import state as ckpt

FINAL = "step_000004"
SEED = int(os.environ.get("AGRO_FAULT_SEED", "20240917"))  # which save phases the random kill test picks


def _ckpts(log_dir) -> str:
    return os.path.join(log_dir, "checkpoints")


def _temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n) if os.path.isdir(directory) else []


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# --------------------------------------------------------------------------------------------------
# atomic_dir: a kill between any two steps of a directory swap
# --------------------------------------------------------------------------------------------------
_SWAP = """
import sys
from pathlib import Path
from agro_megatron.checkpoint.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1]), marker=sys.argv[3] or None) as tmp:
    (tmp / "data").write_text(sys.argv[2])
"""


# (phase killed at, a previous complete copy existed, marker) -> what the directory holds afterwards
_SWAP_CASES = [
    ("written", True, "COMPLETE", "old"),       # the new copy was incomplete: the old one stays
    ("written", False, "COMPLETE", None),       # nothing was complete: nothing appears
    ("marked", True, "COMPLETE", "old"),        # both complete, the old one in place: kept
    ("marked", False, "COMPLETE", "new"),       # a complete temp copy and no final: recovered
    ("moved-aside", True, "COMPLETE", "new"),   # between the renames: no final, both copies aside
    ("moved-aside", True, "", "new"),           # the same without a marker (conversion outputs)
    ("swapped", True, "COMPLETE", "new"),       # the old copy not yet deleted
]


@pytest.mark.parametrize("phase,existing,marker,expected", _SWAP_CASES)
def test_kill_at_any_phase_of_a_directory_swap_loses_nothing_complete(tmp_path, phase, existing, marker, expected):
    final = tmp_path / "step_000004"
    if existing:
        final.mkdir()
        (final / "data").write_text("old")
        if marker:
            (final / marker).touch()
    env = {**launcher_free_env(), "AGRO_FAULT_KILL_AT": f"{phase}@{final.name}"}
    proc = subprocess.run([sys.executable, "-c", _SWAP, str(final), "new", marker], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    from agro_megatron.checkpoint.atomic import remove_stale

    remove_stale(tmp_path, marker=marker or None)  # what the next save (or resume) does first
    assert _temps(tmp_path) == []
    if expected:
        assert (final / "data").read_text() == expected
    else:
        assert not final.exists()


# --------------------------------------------------------------------------------------------------
# checksums and keep_last, without a trainer
# --------------------------------------------------------------------------------------------------
def test_manifest_finds_flipped_truncated_and_missing_files(tmp_path):
    import hashlib

    files = {"a.bin": os.urandom(100_000), "sub/b.bin": os.urandom(3_000), "c.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    names = manifest.checkpoint_files(tmp_path)
    assert names == sorted(files)
    manifest.write_manifest(tmp_path, manifest.digest_files(tmp_path, names))
    recorded = manifest.read_manifest(tmp_path)
    assert recorded == {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    assert manifest.verify(tmp_path) == []

    flipped = bytearray(files["a.bin"])
    flipped[54_321] ^= 0x01  # one bit
    (tmp_path / "a.bin").write_bytes(bytes(flipped))
    (tmp_path / "sub/b.bin").write_bytes(files["sub/b.bin"][:-1])
    (tmp_path / "c.json").unlink()
    problems = manifest.verify(tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith("a.bin: contents differ")
    assert problems[1].startswith("c.json: No such file")
    assert problems[2].startswith("sub/b.bin: 2999 bytes, 3000 were written")
    (tmp_path / manifest.MANIFEST_NAME).write_text("{not json")
    assert manifest.verify(tmp_path)[0].startswith(f"{manifest.MANIFEST_NAME}: unreadable")


def test_keep_last_deletes_only_older_than_the_new_checkpoint(tmp_path):
    for step in (2, 4, 6, 9):
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        (d / "COMPLETE").touch()
    # step 6 was just saved after a resume from 4 (9 is damaged or another run's): with keep_last=2
    # the one before it stays, older ones go, and the newer 9 is not the pruner's to delete
    ckpt._prune(str(tmp_path), 6, keep_last=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == [
        "step_000004", "step_000006", "step_000009"]
    ckpt._prune(str(tmp_path), 6, keep_last=1)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_000006", "step_000009"]


# --------------------------------------------------------------------------------------------------
# the trainer, as a user runs it
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny job: checkpoints at steps 2 and 4 (the final step)."""
    log_dir = tmp_path_factory.mktemp("reference")
    _ok(fc.agro_train(log_dir))
    final = os.path.join(_ckpts(log_dir), FINAL)
    assert ckpt.verify_checkpoint(final) == []
    return {"dir": str(log_dir), "digests": fc.state_digests(final),
            "bytes": sum(manifest.digest_files(final, manifest.checkpoint_files(final))[n]["size"]
                         for n in manifest.checkpoint_files(final))}


def _copy(reference, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(reference["dir"], out)
    return out


def _assert_same_final_state(log_dir, reference) -> None:
    final = os.path.join(_ckpts(log_dir), FINAL)
    assert ckpt.verify_checkpoint(final) == []
    assert fc.state_digests(final) == reference["digests"], "the resumed run did not reach the reference's state"


@pytest.mark.slow
def test_rerun_of_a_finished_run_rewrites_no_checkpoint(reference, tmp_path):
    # Before: the final save deleted step_000004 and renamed its rewrite into place; a kill between
    # the two (here at the first rename) left no complete checkpoint, and the next run started over.
    log_dir = _copy(reference, tmp_path)
    root = _ckpts(log_dir)
    before = {n: os.stat(os.path.join(root, n, "COMPLETE")).st_ino for n in os.listdir(root)}
    proc = _ok(fc.agro_train(log_dir, env={"AGRO_FAULT_KILL_AT": f"moved-aside@{FINAL}"}))
    assert f"resumed from {os.path.join(root, FINAL)} at step 4" in proc.stdout
    assert {n: os.stat(os.path.join(root, n, "COMPLETE")).st_ino for n in os.listdir(root)} == before
    _assert_same_final_state(log_dir, reference)


_PHASES = [("state-written", "step_000002"), ("written", FINAL), ("marked", FINAL), ("swapped", FINAL),
           ("before-prune", FINAL), ("state-written", FINAL), ("marked", "step_000002")]


@pytest.mark.slow
@pytest.mark.parametrize("phase,name", random.Random(SEED).sample(_PHASES, 2))
def test_sigkill_at_a_random_phase_of_a_save_resumes_exactly(reference, tmp_path, phase, name):
    log_dir = str(tmp_path / "run")
    root = _ckpts(log_dir)
    killed = fc.agro_train(log_dir, env={"AGRO_FAULT_KILL_AT": f"{phase}@{name}"})
    assert killed.returncode == -signal.SIGKILL, f"seed {SEED}: " + killed.stderr[-3000:]
    if name == FINAL:  # the checkpoint of step 2 was complete before the fault: it is still there
        assert os.path.join(root, "step_000002") in ckpt.list_checkpoints(root)
        assert ckpt.verify_checkpoint(os.path.join(root, "step_000002")) == []
    resumed = _ok(fc.agro_train(log_dir))
    complete = name == FINAL and phase in ("marked", "swapped", "before-prune")  # a complete step 4 existed
    start = FINAL if complete else "step_000002" if name == FINAL else None
    if start:
        assert f"resumed from {os.path.join(root, start)}" in resumed.stdout, f"seed {SEED}: {resumed.stdout}"
    assert _temps(root) == []
    _assert_same_final_state(log_dir, reference)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_of_a_save_resumes_exactly(reference, tmp_path):
    log_dir = str(tmp_path / "run")
    root = _ckpts(log_dir)
    proc = subprocess.Popen(fc.train_command(log_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=launcher_free_env())
    try:
        saving = fc.wait_for(lambda: _temps(root), timeout=600, interval=0.002)
        assert saving, "no save was seen"
        os.kill(proc.pid, signal.SIGKILL)  # somewhere inside the first save (state, rank file, checksums, ...)
    finally:
        proc.kill()
        proc.wait()
    _ok(fc.agro_train(log_dir))
    assert _temps(root) == []
    _assert_same_final_state(log_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(reference, tmp_path, damage):
    log_dir = _copy(reference, tmp_path)
    root = _ckpts(log_dir)
    final = os.path.join(root, FINAL)
    if damage == "flip":  # one bit inside the weights: loaded without complaint before
        victim = os.path.join(final, "state", sorted(n for n in os.listdir(os.path.join(final, "state"))
                                                     if n.endswith(".distcp"))[0])
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0x10
        open(victim, "wb").write(bytes(data))
        env = {}
    else:  # a copy cut short: EOFError naming no checkpoint before
        victim = os.path.join(final, "rank_00000.pt")
        os.truncate(victim, os.path.getsize(victim) // 3)
        # and a kill while the damaged step is being replaced: both copies are under temp names then
        env = {"AGRO_FAULT_KILL_AT": f"moved-aside@{FINAL}"}
    proc = fc.agro_train(log_dir, env=env)
    out = proc.stdout
    if env:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert not os.path.exists(final) and len(_temps(root)) == 2
        proc = _ok(fc.agro_train(log_dir))
        assert f"recovered the complete checkpoint {final}" in proc.stdout
        assert f"resumed from {final} at step 4" in proc.stdout
    else:
        _ok(proc)
    rel = os.path.relpath(victim, final)
    assert f"resuming from {os.path.join(root, 'step_000002')}, the newest intact checkpoint" in out, out
    assert f"{final} is damaged ({rel}:" in out
    _no_traceback(proc)
    assert _temps(root) == []
    _assert_same_final_state(log_dir, reference)


@pytest.mark.slow
def test_no_intact_checkpoint_is_a_named_error_and_nothing_is_deleted(reference, tmp_path):
    log_dir = _copy(reference, tmp_path)
    root = _ckpts(log_dir)
    for name in ("step_000002", FINAL):
        victim = os.path.join(root, name, "rank_00000.pt")
        os.truncate(victim, 100)
    proc = fc.agro_train(log_dir)
    assert proc.returncode == 1
    _no_traceback(proc)
    assert "agro-train: CorruptCheckpointError: no intact checkpoint to resume from" in proc.stderr
    for name in ("step_000002", FINAL):
        assert f"{os.path.join(root, name)} is damaged (rank_00000.pt: 100 bytes" in proc.stderr
    assert sorted(os.listdir(root)) == ["step_000002", FINAL]


# -- disk full and read-only directories -------------------------------------------------------------
class _Tmpfs:
    """A small tmpfs at `path` (root only); None where it cannot be mounted."""

    def __init__(self, path, size: int):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        ok = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path], capture_output=True).returncode == 0
        self.mounted = ok

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", self.path], check=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], check=False)


@pytest.fixture
def small_disk(tmp_path, reference):
    """Room for one and a half checkpoints of the tiny job: the save of step 4 (step 2 kept,
    keep_last=2) runs out of space. None where no tmpfs can be mounted (not root)."""
    disk = _Tmpfs(tmp_path / "disk", size=reference["bytes"] * 3 // 2)
    yield disk if disk.mounted else None
    if disk.mounted:
        disk.close()


def _stop_after_first_save(log_dir, ckpt_dir) -> subprocess.Popen:
    """agro-train stopped (SIGSTOP) right after its save of step 2: the test changes the disk, then SIGCONT."""
    env = {**launcher_free_env(), "AGRO_FAULT_KILL_AT": "swapped@step_000002", "AGRO_FAULT_SIGNAL": "SIGSTOP"}
    proc = subprocess.Popen(fc.train_command(log_dir, f"checkpoint.dir={ckpt_dir}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    stopped = fc.wait_for(lambda: open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 600, 0.05)
    assert stopped, "the run did not reach its first save"
    return proc


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_disk_full_during_a_save_is_a_named_error_and_the_previous_checkpoint_survives(reference, tmp_path,
                                                                                        small_disk):
    log_dir = str(tmp_path / "run")
    if small_disk is not None:
        ckpt_dir = small_disk.path
        proc = _finish(_stop_after_first_save(log_dir, ckpt_dir))
        reason = "No space left on device"
    else:  # not root: a file-size limit on the stopped trainer (its writers inherit it) fails the next save
        ckpt_dir = str(tmp_path / "ckpts")
        proc = _stop_after_first_save(log_dir, ckpt_dir)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        proc = _finish(proc)
        reason = "File too large"
    assert proc.returncode == 1, proc.stderr[-4000:]
    _no_traceback(proc)
    assert f"agro-train: CheckpointWriteError: {reason} while saving checkpoint {os.path.join(ckpt_dir, FINAL)}" \
        in proc.stderr
    previous = os.path.join(ckpt_dir, "step_000002")
    assert f"the previous checkpoint {previous} is intact" in proc.stderr
    assert ckpt.list_checkpoints(ckpt_dir) == [previous] and ckpt.verify_checkpoint(previous) == []
    assert _temps(ckpt_dir) == []  # the partial save was removed: the space is free again
    if small_disk is not None:
        small_disk.remount(f"size={reference['bytes'] * 3}")
    resumed = _ok(fc.agro_train(log_dir, f"checkpoint.dir={ckpt_dir}"))
    assert f"resumed from {previous} at step 2" in resumed.stdout
    assert fc.state_digests(os.path.join(ckpt_dir, FINAL)) == reference["digests"]


@pytest.mark.slow
def test_read_only_checkpoint_dir_is_a_named_error_and_the_previous_checkpoint_survives(reference, tmp_path):
    log_dir = str(tmp_path / "run")
    disk = _Tmpfs(tmp_path / "disk", size=reference["bytes"] * 4)
    if os.geteuid() == 0 and not disk.mounted:
        pytest.skip("root without mount(2): no way to make a directory read-only for root")
    ckpt_dir = disk.path
    try:
        proc = _stop_after_first_save(log_dir, ckpt_dir)
        if disk.mounted:
            disk.remount("ro")
        else:
            os.chmod(ckpt_dir, 0o555)
        proc = _finish(proc)
        assert proc.returncode == 1, proc.stderr[-4000:]
        _no_traceback(proc)
        reason = "Read-only file system" if disk.mounted else "Permission denied"
        assert f"agro-train: CheckpointWriteError: {reason} while saving checkpoint " \
               f"{os.path.join(ckpt_dir, FINAL)}" in proc.stderr
        previous = os.path.join(ckpt_dir, "step_000002")
        assert f"the previous checkpoint {previous} is intact" in proc.stderr
        assert ckpt.list_checkpoints(ckpt_dir) == [previous] and ckpt.verify_checkpoint(previous) == []
        if disk.mounted:
            disk.remount("rw")
        else:
            os.chmod(ckpt_dir, 0o755)
        resumed = _ok(fc.agro_train(log_dir, f"checkpoint.dir={ckpt_dir}"))
        assert f"resumed from {previous} at step 2" in resumed.stdout
        assert fc.state_digests(os.path.join(ckpt_dir, FINAL)) == reference["digests"]
    finally:
        disk.close()


# -- SIGTERM during SFT, and the checkpoint writer's processes ---------------------------------------
SFT = ["sft.steps=4", "sft.batch_size=8", "train.steps=1"]


@pytest.mark.slow
def test_sigterm_during_sft_saves_its_state_exits_75_and_resumes_exactly(tmp_path):
    plain = tmp_path / "plain"
    uninterrupted = _ok(subprocess.run([fc.script("agro-sft"), *fc.TINY, *SFT, f"logging.dir={plain}"],
                                       capture_output=True, text=True, env=launcher_free_env(), timeout=600))
    split = tmp_path / "split"
    # a real SIGTERM, delivered to the trainer by itself after SFT step 2 (as Slurm would, from outside)
    stopped = fc.agro_train(split, *SFT, env={"AGRO_FAULT_KILL_AT": "sft-step@step_000002",
                                              "AGRO_FAULT_SIGNAL": "SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr[-4000:]  # was 143, without a word
    saved = split / "checkpoints" / "sft" / "step_000002"
    assert f"SFT stopped by signal at step 2 of 4; its state is saved in {saved}" in stopped.stdout
    assert ckpt.verify_checkpoint(str(saved)) == []
    assert not (split / "sft_model").exists()
    resumed = _ok(subprocess.run([fc.script("agro-sft"), *fc.TINY, *SFT, f"logging.dir={split}"],
                                 capture_output=True, text=True, env=launcher_free_env(), timeout=600))
    assert f"SFT resumed from {saved} at step 2 of 4" in resumed.stdout
    assert fc.state_digests(split / "sft_model") == fc.state_digests(plain / "sft_model")

    def losses(proc):  # "SFT done: loss <first> -> <last>; saved <path>"
        return [ln.split(";")[0] for ln in proc.stdout.splitlines() if ln.startswith("SFT done")]

    assert losses(resumed) == losses(uninterrupted) and len(losses(resumed)) == 1
    assert not (split / "checkpoints" / "sft").exists()  # superseded by the SFT model


@pytest.mark.slow
def test_checkpoint_writer_processes_die_with_a_killed_trainer(tmp_path):
    # megatron's writer processes, forked by the trainer for every save, outlived a `kill -9` of it
    # (a blocked queue) and kept the reward sandbox's pipes open
    pids = tmp_path / "writers"
    proc = subprocess.Popen([sys.executable, "-m", "agro_megatron.testing.fault_checks", *fc.TINY,
                             f"logging.dir={tmp_path / 'run'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**launcher_free_env(), fc.SLOW_WRITER_PIDS: str(pids)})
    writers = []
    try:
        assert fc.wait_for(lambda: pids.exists() and pids.read_text().split(), timeout=600), "no save started"
        fc.wait_for(lambda: len(pids.read_text().split()) >= 2, timeout=5)  # megatron forks two per save here
        writers = [int(p) for p in pids.read_text().split()]
        assert all(fc.pid_alive(p) for p in writers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone = fc.wait_for(lambda: not any(fc.pid_alive(p) for p in writers), timeout=10)
        assert gone, f"writer processes {[p for p in writers if fc.pid_alive(p)]} outlived the killed trainer"
    finally:
        proc.kill()
        for p in writers:
            if fc.pid_alive(p):
                os.kill(p, signal.SIGKILL)
