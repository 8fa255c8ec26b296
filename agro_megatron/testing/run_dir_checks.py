"""Worker functions for tests/test_run_dir.py (run inside a gloo rank by run_distributed): one run
dir reused by a changed config, by checkpoint.resume=never, and by a resume after a kill."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os

from agro_megatron.testing import train_checks as tc


def snapshot(root: str) -> dict:
    """{relative path: sha256} of every file under root (what "nothing changed / nothing lost" compares)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def changed_config_then_allowed_keys(log_dir: str) -> dict:
    """A 2-step run; the same dir with another algorithm (refused, nothing touched); with only
    RESUMABLE_KEYS changed (resumes to step 3); with algorithm.beta accepted explicitly (to step 4)."""
    from agro_megatron.train.run_dir import RunConfigMismatch

    out = {"first": tc.run(log_dir, "length_reward", {"train.steps": 2})}
    before = snapshot(log_dir)
    try:
        tc.run(log_dir, "length_reward", {"train.steps": 2, "algorithm.estimator": "rloo", "algorithm.beta": 0.5})
        out["changed"] = None
    except RunConfigMismatch as e:
        out["changed"] = {"message": str(e), "changes": e.changes}
    out["untouched"] = snapshot(log_dir) == before
    allowed = {"train.steps": 3, "eval.every": 1, "checkpoint.keep_last": 2, "checkpoint.save_every": 2,
               "parallel.timeout_minutes": 20, "logging.tensorboard": False, "train.micro_batch_tokens": 2048}
    out["allowed"] = tc.run(log_dir, "length_reward", allowed)
    out["accepted"] = tc.run(log_dir, "length_reward", {**allowed, "train.steps": 4, "algorithm.beta": 0.5,
                                                         "checkpoint.accept_changes": ["algorithm.beta"]})
    with open(os.path.join(log_dir, "config_history.jsonl")) as f:
        out["history_file"] = f.read()
    with open(os.path.join(log_dir, "config.json")) as f:
        out["record"] = f.read()
    for name in ("first", "allowed", "accepted"):
        out[name].pop("weights", None)
    return out


def resume_never_in_a_used_dir(root: str) -> dict:
    """A finished 3-step run, then a 2-step run with checkpoint.resume=never in the same dir."""
    log_dir = os.path.join(root, "run")
    first = tc.run(log_dir, "length_reward", {"train.steps": 3})
    before = snapshot(log_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        second = tc.run(log_dir, "length_reward", {"train.steps": 2, "checkpoint.resume": "never"})
    aside = sorted(n for n in os.listdir(root) if n != "run")
    return {"first_steps": first["steps"], "before": before, "second_steps": second["steps"],
            "second_history": second["history"], "aside": aside,
            "aside_files": {n: snapshot(os.path.join(root, n)) for n in aside},
            "checkpoints": sorted(n for n in os.listdir(os.path.join(log_dir, "checkpoints")) if n.startswith("step_")),
            "printed": printed.getvalue()}


_calls = {"n": 0}


def exit_on_fifth_reward_call(responses, truths):
    """Dies abruptly (os._exit, like SIGKILL) when step 4 asks for rewards: after step 3 was logged."""
    _calls["n"] += 1  # calls: eval before training, then one per step
    if _calls["n"] == 5:
        os._exit(9)
    return tc.length_reward(responses, truths)


def run_killed_in_step_4(log_dir: str, overrides: dict) -> None:
    from agro_megatron.train.run import run_job

    _calls["n"] = 0
    run_job(tc.tiny_config(log_dir, **overrides), reward_fn=exit_on_fifth_reward_call)


def resume_then_rerun(log_dir: str, overrides: dict) -> dict:
    """Resume the killed run to its end, then run the finished run's command once more."""
    resumed = tc.run(log_dir, "length_reward", overrides)
    again = tc.run(log_dir, "length_reward", overrides)
    return {"resumed_steps": resumed["steps"], "again_steps": again["steps"]}
