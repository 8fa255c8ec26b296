"""Helpers for the fault tests (tests/test_faults.py): `agro-train` runs as a user starts them,
the tiny configuration they share, and a trainer whose checkpoint writers are slow.

Faults are injected from outside the trainer (SIGKILL/SIGTERM at a moment the test chooses,
bytes changed on disk, a tmpfs that fills up or turns read-only) or through the inert hook of
checkpoint/atomic.py (AGRO_FAULT_KILL_AT=PHASE@NAME, see `fault_point`), which kills the trainer
between two named steps of a save.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from agro_megatron.checkpoint import manifest
from agro_megatron.testing.distributed import launcher_free_env

TINY = [
    "logging.progress=false", "logging.plots=false", "logging.tensorboard=false",
    "model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
    "data.synthetic_levels=[1, 2]", "data.synthetic_train_size=64", "data.synthetic_heldout_size=8",
    "data.system_prompt=null", "rollout.n=2", "rollout.max_new_tokens=8", "train.steps=4",
    "train.prompts_per_step=4", "sft.steps=0", "eval.max_problems=4", "eval.n=2", "eval.every=0",
    "optim.lr=1e-3",
    # the README demo's shape: the last step is a multiple of save_every
    "checkpoint.save_every=2", "checkpoint.keep_last=2",
]
"""A seconds-long agro-train job: 4 RL steps, checkpoints at steps 2 and 4."""

SLOW_WRITER_PIDS = "AGRO_TEST_SLOW_WRITER_PIDS"


def script(name: str) -> str:
    """The installed console script (beside this interpreter), as a user runs it."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


def train_command(log_dir, *overrides: str) -> list[str]:
    return [script("agro-train"), *TINY, f"logging.dir={log_dir}", *overrides]


def agro_train(log_dir, *overrides: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `agro-train` on the tiny job to the end (or to its death); stdout and stderr captured."""
    return subprocess.run(train_command(log_dir, *overrides), capture_output=True, text=True, timeout=timeout,
                          env={**launcher_free_env(), **(env or {})})


def state_digests(checkpoint: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of the weight and optimizer files of a checkpoint (`state/` of a trainer checkpoint,
    or a model checkpoint's top level): equal digests mean bit-identical model and optimizer state.
    The `.metadata` index is left out (it records the directory it was written to)."""
    base = os.path.join(checkpoint, "state") if os.path.isdir(os.path.join(checkpoint, "state")) else checkpoint
    return {name: manifest.digest_file(os.path.join(base, name))["sha256"] for name in sorted(os.listdir(base))
            if name.endswith(".distcp") or name == "common.pt"}


def wait_for(predicate, timeout: float, interval: float = 0.02):
    """Poll `predicate()` until it returns something true (returned) or `timeout` seconds pass (None)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _slow_writer_main(argv: list[str]) -> int:
    """agro-train with megatron's checkpoint writer processes stalled: each forked writer appends
    its pid to $AGRO_TEST_SLOW_WRITER_PIDS and sleeps 120 s before writing, so a test can kill the
    trainer while they exist."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from agro_megatron.cli.train import main

    writer = filesystem_async.FileSystemWriterAsync
    real = writer.write_preloaded_data

    def stalled(*args, **kwargs):
        with open(os.environ[SLOW_WRITER_PIDS], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(120)
        return real(*args, **kwargs)

    writer.write_preloaded_data = staticmethod(stalled)
    return main(argv)


if __name__ == "__main__":
    sys.exit(_slow_writer_main(sys.argv[1:]))
