"""Who owns a run directory: the run whose `config.json` it holds.

A logging dir (`logging.dir`) holds one run: its config record, metrics, TensorBoard events,
checkpoints, SFT model, evaluations and final model. Every job start claims the dir here, before
any model exists, and ends in one of three ways:

    resume      the dir's record matches this config on every key that changes the run (keys
                that may change are listed in RESUMABLE_KEYS, each with why), or the user named
                the differing keys in `checkpoint.accept_changes`; the change is appended to
                config_history.jsonl and config.json becomes this config
    fresh       the dir is new or empty, or holds only inputs a run can be seeded with (an SFT
                model, a tokenizer, the pre-training evaluation: examples/compare.py copies them)
    moved aside checkpoint.resume=never: the earlier run (and an external checkpoint.dir) is
                renamed to `<dir>.old-<time>`, never deleted, and the job starts fresh in its place

Anything else stops with a RunDirError (a ConfigError: the CLI prints it on one line and exits 2)
that names the dir and the fixes. Without this, a changed config silently resumed the old run
and reported its numbers under the new config, and resume=never truncated the old run's metrics,
overwrote its results and let keep_last delete the new run's checkpoints (the old steps were
higher).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import typing

from agro_megatron.config import ConfigError, JobConfig

RECORD = "config.json"
HISTORY = "config_history.jsonl"

# Keys whose value may differ between the start of a run and a resume of it, and why each is safe.
# Every other key changes what the run trains or measures, and is compared.
RESUMABLE_KEYS = {
    "train.steps": "where the run stops; the steps done are kept (the LR schedule keeps the horizon the run "
                   "was started with: its state is restored from the checkpoint)",
    "train.max_bad_steps": "when to give up on non-finite steps; changes no step that is taken",
    "train.micro_batch_tokens": "a memory knob: the same sequences per step, split into other micro-batches "
                                "(the loss is normalised by the step's sequence count)",
    "eval.every": "the evaluation cadence: evaluations sample with their own seed and do not touch training",
    "logging.dir": "the dir itself (the same dir may be spelled relative or absolute)",
    "logging.tensorboard": "output only",
    "logging.plots": "output only",
    "logging.progress": "output only",
    "checkpoint.save_every": "when checkpoints are written, not what they hold",
    "checkpoint.keep_last": "how many checkpoints are kept, not what they hold",
    "checkpoint.resume": "how this start treats the dir, not what the run is",
    "checkpoint.accept_changes": "this start's permission to change keys",
    "parallel.timeout_minutes": "how long collectives wait; changes no result",
    "parallel.long_work_timeout_minutes": "how long ranks wait for rank 0's conversion; changes no result",
    # The layout is checked against each trainer checkpoint instead (state.CheckpointLayoutMismatch,
    # which says how to continue at another layout); the SFT model and a fresh RL start load at any layout.
    "parallel.tp": "checked against the checkpoint's recorded layout when it is loaded",
    "parallel.pp": "checked against the checkpoint's recorded layout when it is loaded",
    "parallel.cp": "checked against the checkpoint's recorded layout when it is loaded",
    "parallel.dp": "checked against the checkpoint's recorded layout when it is loaded",
    "rollout.vllm_gpu_memory_utilization": "vLLM's memory share: the KV-cache size, not the samples",
    "rollout.vllm_sleep_level": "what vLLM frees while training: memory only",
    "optim.offload_train_state": "where optimizer state waits while the engine generates: memory only",
}

# What a run writes into its dir; their presence means a run was there.
RUN_OUTPUTS = ("metrics.jsonl", "result.json", "final_model", "checkpoints", "tensorboard", "training.png",
               "eval_problems", HISTORY)


class RunDirError(ConfigError):
    """The logging dir cannot be used by this job as it stands; the message names the dir and the fixes."""


class RunConfigMismatch(RunDirError):
    """The logging dir holds a run started with another config (`changes`: key -> (run dir's, this one's))."""

    def __init__(self, message: str, changes: dict):
        super().__init__(message)
        self.changes = changes

    def __reduce__(self):  # pickled when rank 0 hands it to the other ranks
        return type(self), (str(self), self.changes)


@dataclasses.dataclass
class RunDirClaim:
    """How this job took the dir: resumed (with the listed changes), fresh, and what was moved aside."""

    log_dir: str
    resumed: bool
    changes: dict
    moved: list  # [(from, to)]


def config_keys(cls=JobConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the config dataclasses, dotted, in declaration order."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _value(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _plain(obj):
    """The JSON form (what config.json holds), so that tuples, lists and numbers compare as stored."""
    return json.loads(json.dumps(obj))


def config_changes(recorded: dict, cfg: JobConfig) -> dict:
    """{key: (recorded value, this config's value)} for every key whose value differs. A key that
    the record lacks (written by an older version) counts with its default value."""
    now, default = _plain(cfg.to_dict()), _plain(JobConfig().to_dict())
    changes = {}
    for key in config_keys():
        try:
            old = _value(recorded, key)
        except KeyError:
            old = _value(default, key)
        new = _value(now, key)
        if old != new:
            changes[key] = (old, new)
    return changes


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _show(changes: dict) -> str:
    parts = []
    for key, (old, new) in changes.items():
        if isinstance(old, dict) and isinstance(new, dict):  # e.g. model.tiny: only the entries that differ
            for k in sorted(set(old) | set(new), key=str):
                if old.get(k, "<unset>") != new.get(k, "<unset>"):
                    parts.append(f"{key}.{k}: {json.dumps(old.get(k, '<unset>'))} -> "
                                 f"{json.dumps(new.get(k, '<unset>'))}")
        else:
            parts.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return "; ".join(parts)


def aside_path(path: str, now: datetime.datetime | None = None) -> str:
    """`<path>.old-<YYYYmmdd-HHMMSS>` (with -2, -3 ... when taken): where an earlier run is moved."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{os.path.abspath(path).rstrip(os.sep)}.old-{stamp}"
    dest, k = base, 2
    while os.path.lexists(dest):
        dest, k = f"{base}-{k}", k + 1
    return dest


def _move_aside(path: str, why: str) -> tuple[str, str]:
    dest = aside_path(path)
    try:
        os.rename(path, dest)
    except OSError as e:
        raise RunDirError(f"{why}, but {path} could not be moved aside to {dest} ({e.strerror or e}): move it "
                          "yourself or choose a new logging.dir") from None
    return path, dest


def _entries(path: str) -> list[str]:
    """The dir's entries, without hidden ones (an interrupted atomic save's temporary copies)."""
    return sorted(n for n in os.listdir(path) if not n.startswith(".")) if os.path.isdir(path) else []


def _read_record(log_dir: str) -> dict | None:
    path = os.path.join(log_dir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"logging.dir={log_dir}: {path} cannot be read as a run record ({e}): choose a new "
                          "logging.dir, or repair or remove that file") from None
    if not isinstance(record, dict) or not {"model", "train", "algorithm"} <= set(record):
        raise RunDirError(f"logging.dir={log_dir}: {path} is not an agro-megatron run record (another tool's "
                          "config?): choose a new logging.dir for this run")
    return record


def _checkpoints(ckpt_dir: str) -> list[str]:
    return [n for n in _entries(ckpt_dir) if re.match(r"^step_\d{6,}$", n)]


def claim(cfg: JobConfig) -> RunDirClaim:
    """Decide how this job takes `cfg.logging.dir`, act on it and write the run record (one process:
    rank 0; `claim_run_dir` shares the outcome). Raises RunDirError."""
    log_dir, c = cfg.logging.dir, cfg.checkpoint
    external = bool(c.dir) and not os.path.abspath(c.dir).startswith(os.path.abspath(log_dir).rstrip(os.sep) + os.sep)
    unknown = [k for k in c.accept_changes if not _covered_by_key(k)]
    if unknown:
        raise RunDirError(f"checkpoint.accept_changes names {', '.join(map(str, unknown))}, which "
                          f"{'is not a config key' if len(unknown) == 1 else 'are not config keys'} "
                          "(e.g. checkpoint.accept_changes=[algorithm.beta])")
    fresh_start = c.resume == "never"
    record = _read_record(log_dir)
    outputs = [n for n in _entries(log_dir) if n in RUN_OUTPUTS]
    moved: list = []
    changes: dict = {}
    if record is not None or outputs:
        if fresh_start:
            moved.append(_move_aside(log_dir, f"checkpoint.resume=never starts a fresh run in {log_dir}"))
        elif record is None:
            raise RunDirError(
                f"logging.dir={log_dir} holds a run's outputs ({', '.join(outputs)}) but no {RECORD} to check "
                f"this config against: choose a new logging.dir, or pass checkpoint.resume=never to move it "
                f"aside (to {log_dir}.old-<time>) and start a fresh run there")
        else:
            changes = config_changes(record, cfg)
            refused = {k: v for k, v in changes.items()
                       if not _covered(k, RESUMABLE_KEYS) and not _covered(k, c.accept_changes)}
            if refused:
                keys = ",".join(refused)
                raise RunConfigMismatch(
                    f"logging.dir={log_dir} holds a run started with another config ({os.path.join(log_dir, RECORD)}); "
                    f"resuming it would report that run under this config. Differing keys (run dir -> now): "
                    f"{_show(refused)}. Fix: a fresh run dir (logging.dir={log_dir.rstrip(os.sep)}-2), or "
                    f"checkpoint.resume=never to move the old run aside (to {log_dir.rstrip(os.sep)}.old-<time>) and "
                    f"start fresh there, or continue this run with the new values: "
                    f"checkpoint.accept_changes=[{keys}]", refused)
    if external and _entries(c.dir):
        if fresh_start:
            moved.append(_move_aside(c.dir, f"checkpoint.resume=never starts a fresh run with checkpoint.dir={c.dir}"))
        elif record is None and _checkpoints(c.dir):
            raise RunDirError(
                f"checkpoint.dir={c.dir} holds checkpoints ({', '.join(_checkpoints(c.dir)[-3:])}) of a run that "
                f"logging.dir={log_dir} has no {RECORD} of, so this config cannot be checked against them: point "
                "checkpoint.dir at a new dir, or pass checkpoint.resume=never to move them aside")
    try:
        os.makedirs(log_dir, exist_ok=True)
        if changes:
            with open(os.path.join(log_dir, HISTORY), "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                                    "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
        tmp = os.path.join(log_dir, f".{RECORD}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        os.replace(tmp, os.path.join(log_dir, RECORD))
    except OSError as e:
        raise RunDirError(f"logging.dir={log_dir} cannot be written ({e.strerror or e}): choose a writable "
                          "logging.dir") from None
    for old, new in moved:
        print(f"moved the earlier run in {old} to {new} (checkpoint.resume=never); starting a fresh run", flush=True)
    return RunDirClaim(log_dir=log_dir, resumed=record is not None and not fresh_start, changes=changes,
                       moved=moved)


def _covered_by_key(name) -> bool:
    """A leaf key (algorithm.beta) or a whole section (algorithm)."""
    return isinstance(name, str) and any(k == name or k.startswith(name + ".") for k in config_keys())


def claim_run_dir(cfg: JobConfig) -> RunDirClaim:
    """`claim` on rank 0; every rank returns its outcome or raises its error (the broadcast is the
    barrier: no rank reads the dir before rank 0 has claimed it)."""
    import torch.distributed as dist

    ranks = dist.get_world_size() if dist.is_initialized() else 1
    outcome = None
    if ranks == 1 or dist.get_rank() == 0:
        try:
            outcome = claim(cfg)
        except Exception as e:  # every rank must learn it, or the others would wait in the broadcast
            outcome = e
    if ranks > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
