"""A cell: one fully resolved agro-train config, its id, its directory and its status file.

The id is a hash of the resolved config (canonical JSON, without the cell's own directory), so
the same config always lands in the same directory and any change of config, seed or code default
that reaches the config makes a new cell. The directory holds:

    config.yaml      the resolved config, exactly what the trainer runs (`agro-train config.yaml`)
    cell.json        arm, axis point, seed, resources: what the report groups by
    status.json      state, attempts, host, start/end, exit code, last heartbeat, error tail
    attempt_<k>.log  the trainer's output of attempt k
    run/             the trainer's logging.dir: checkpoints, metrics.jsonl, eval_problems/, result.json

The trainer resumes from run/checkpoints by itself (checkpoint.resume=auto), so rerunning a cell
continues it. A directory whose stored config differs from the cell's is refused
(CellDirConflict), never reused. Every write is atomic (temp file + rename): a killed runner
leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass

import yaml

from agro_megatron.study.spec import CellRequest, Resources, StudySpec, cell_requests

PENDING, RUNNING, DONE, FAILED = "PENDING", "RUNNING", "DONE", "FAILED"
STATES = (PENDING, RUNNING, DONE, FAILED)
# Paths that may name files which do not exist yet at plan time (checkpoints to be converted).
PATH_KEYS = (("model", "megatron_checkpoint", None), ("model", "hf_checkpoint", None), ("model", "tokenizer", None),
             ("data", "train", "synthetic"), ("data", "heldout", None))
CELL_TOKEN = "cell:"  # a config string starting with it names a file in the cell's directory


class CellConfigError(ValueError):
    """A cell's config fails the trainer's own loading or validation; names the cell and the fix."""


class CellDirConflict(RuntimeError):
    """A cell directory holds a different config than the cell's: it is never reused."""


@dataclass(frozen=True)
class Cell:
    """A resolved cell: `config` is the trainer's JobConfig as a dict (logging.dir inside the cell)."""
    id: str
    request: CellRequest
    config: dict
    resources: Resources
    dir: str
    notes: tuple[str, ...] = ()      # plan-time remarks (e.g. a checkpoint that must exist at run time)

    @property
    def config_path(self) -> str:
        return os.path.join(self.dir, "config.yaml")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.dir, "run")

    @property
    def status_path(self) -> str:
        return os.path.join(self.dir, "status.json")


@dataclass
class CellStatus:
    """status.json. attempts: launches so far; failures: attempts that ended FAILED (bounded by
    max_attempts); a stop with exit 75 (preemption, USR1) or a stale heartbeat is not a failure."""
    state: str = PENDING
    attempts: int = 0
    failures: int = 0
    host: str | None = None
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    exit_code: int | None = None
    heartbeat: float | None = None
    error: str | None = None         # the tail of the failed attempt's log, or why it was requeued
    slurm_job: str | None = None     # <array job>_<task> of the latest submission

    @classmethod
    def from_dict(cls, d: dict) -> "CellStatus":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(config: dict) -> str:
    """The cell id: sha256 of the canonical config without the paths that derive from the id."""
    d = json.loads(canonical_json(config))
    d.get("logging", {}).pop("dir", None)
    d.get("checkpoint", {}).pop("dir", None)
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()[:16]


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- resolution
def resolve_cells(spec: StudySpec, study_dir: str, *, require_paths: bool = True) -> list[Cell]:
    """Every cell of the study, each config loaded and validated by the trainer's own code.

    require_paths=False (plan): checkpoint paths that do not exist yet are noted, not fatal.
    Two requests that resolve to the same config are one cell: CellConfigError names both.
    """
    cells, seen = [], {}
    for req in cell_requests(spec):
        cell = resolve_cell(spec, req, study_dir, require_paths=require_paths)
        if cell.id in seen:
            other = seen[cell.id]
            raise CellConfigError(
                f"{spec.path}: cells {other.group} seed={other.seed} and {req.group} seed={req.seed} resolve to the "
                "same config; make the arms or axis points differ in some config key")
        seen[cell.id] = req
        cells.append(cell)
    return cells


def resolve_cell(spec: StudySpec, req: CellRequest, study_dir: str, *, require_paths: bool = True) -> Cell:
    from agro_megatron.config import ConfigError, JobConfig

    where = f"{spec.path}: cell {req.group} seed={req.seed}"
    overrides = list(req.overrides)
    resources = req.resources
    try:
        cfg = JobConfig.load(spec.base, overrides)
        if resources.plan is not None:
            extra, resources = plan_layout(cfg, resources)
            overrides += extra
            cfg = JobConfig.load(spec.base, overrides)
        notes = _validate(cfg, resources.world, require_paths)
    except ConfigError as e:
        raise CellConfigError(f"{where}: {e}") from None
    except ValueError as e:  # the planner's errors
        raise CellConfigError(f"{where}: agro-plan: {e}") from None
    config = cfg.to_dict()
    config["checkpoint"]["dir"] = None
    config["checkpoint"]["resume"] = "auto"
    cell_id = config_hash(config)
    cell_dir = os.path.join(os.path.abspath(study_dir), "cells", cell_id)
    config["logging"]["dir"] = os.path.join(cell_dir, "run")
    for section in config.values():
        for key, value in section.items():
            if isinstance(value, str) and value.startswith(CELL_TOKEN):
                section[key] = os.path.join(cell_dir, value[len(CELL_TOKEN):])
    return Cell(cell_id, req, config, resources, cell_dir, notes)


def _validate(cfg, world: int, require_paths: bool) -> tuple[str, ...]:
    notes = []
    check = cfg
    if not require_paths:
        check = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data))
        for section, key, stand_in in PATH_KEYS:
            value = getattr(getattr(cfg, section), key)
            if value and value != "synthetic" and "/" in value and not os.path.exists(value):
                notes.append(f"{section}.{key}={value!r} does not exist yet: it must exist when the cell runs")
                setattr(getattr(check, section), key, stand_in)
    check.validate(world_size=world)
    return tuple(notes)


def plan_layout(cfg, resources: Resources) -> tuple[list[str], Resources]:
    """agro-plan's best fitting layout for this cell: parallel.* overrides and the GPU resources."""
    from agro_megatron.cli.plan import load_arch
    from agro_megatron.plan import Layout, PlanInput, TrainOptions, Workload, get_gpu, search
    from agro_megatron.plan.spec import RolloutOptions

    p = resources.plan
    arch, name = load_arch(p.model)
    rollout = RolloutOptions(engine=cfg.rollout.engine)
    inp = PlanInput(arch, get_gpu(p.gpu), Layout(p.nodes, p.gpus_per_node),
                    Workload(cfg.train.prompts_per_step, cfg.rollout.n, p.prompt_len, cfg.rollout.max_new_tokens,
                             1, cfg.algorithm.epochs_per_batch),
                    TrainOptions(offload_train_state=p.offload_train_state or cfg.optim.offload_train_state),
                    rollout, model_name=name).validate()
    recompute = (False, True) if p.recompute is None else (bool(p.recompute),)
    fits, _ = search(inp, top=1, recompute_options=recompute)
    if not fits:
        raise ValueError(f"no layout of {p.model} fits on {p.nodes} x {p.gpus_per_node} {p.gpu}: raise "
                         "resources.plan.nodes or set offload_train_state: true")
    lay = fits[0].inp.layout
    extra = [f"parallel.tp={lay.tp}", f"parallel.pp={lay.pp}", f"parallel.cp={lay.cp}"]
    return extra, dataclasses.replace(resources, nodes=p.nodes, gpus_per_node=p.gpus_per_node, procs_per_node=None)


# --------------------------------------------------------------------------------------- directories
def prepare_cell_dir(cell: Cell) -> CellStatus:
    """Create the cell's directory (or check the existing one holds the same config); its status."""
    stored_path = cell.config_path
    if os.path.exists(stored_path):
        with open(stored_path) as f:
            stored = yaml.safe_load(f)
        if canonical_json(stored) != canonical_json(cell.config):
            diff = _first_difference(stored, cell.config)
            raise CellDirConflict(
                f"{cell.dir} holds a different config than cell {cell.request.group} seed={cell.request.seed} "
                f"({diff}); it is never reused: move that directory away or use another study directory")
        return read_status(cell.dir)
    os.makedirs(cell.dir, exist_ok=True)
    atomic_write(os.path.join(cell.dir, "cell.json"), json.dumps(
        {"id": cell.id, "arm": cell.request.arm, "point": cell.request.point, "group": cell.request.group,
         "seed": cell.request.seed, "overrides": list(cell.request.overrides),
         "resources": dataclasses.asdict(cell.resources)}, indent=2))
    status = read_status(cell.dir)
    write_status(cell.dir, status)
    atomic_write(stored_path, yaml.safe_dump(cell.config, sort_keys=True))  # last: marks the dir complete
    return status


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: stored {a!r}, now {b!r}"


def read_status(cell_dir: str) -> CellStatus:
    path = os.path.join(cell_dir, "status.json")
    if not os.path.exists(path):
        return CellStatus()
    with open(path) as f:
        return CellStatus.from_dict(json.load(f))


def write_status(cell_dir: str, status: CellStatus) -> None:
    atomic_write(os.path.join(cell_dir, "status.json"), json.dumps(dataclasses.asdict(status), indent=2))


# ------------------------------------------------------------------------------------------ resume
RUN, SKIP_DONE, SKIP_RUNNING, SKIP_EXHAUSTED = "run", "done", "running", "exhausted"


def next_action(status: CellStatus, *, max_attempts: int, heartbeat_timeout_s: float,
                now: float | None = None) -> str:
    """What a new `run` does with a cell: DONE is skipped; RUNNING with a fresh heartbeat is left
    to its runner, with a stale one requeued; FAILED is retried while failures < max_attempts."""
    now = time.time() if now is None else now
    if status.state == DONE:
        return SKIP_DONE
    if status.state == RUNNING:
        fresh = status.heartbeat is not None and now - status.heartbeat < heartbeat_timeout_s
        return SKIP_RUNNING if fresh else RUN
    if status.state == FAILED:
        return RUN if status.failures < max_attempts else SKIP_EXHAUSTED
    return RUN


def host_name() -> str:
    return socket.gethostname()


def load_cell(cell_dir: str) -> Cell:
    """A prepared cell back from its directory (what a Slurm task gets: the id, not the spec)."""
    from agro_megatron.study.spec import PlanRequest

    cfg_path, meta_path = os.path.join(cell_dir, "config.yaml"), os.path.join(cell_dir, "cell.json")
    if not (os.path.exists(cfg_path) and os.path.exists(meta_path)):
        raise CellConfigError(f"{cell_dir} is not a prepared cell (no config.yaml / cell.json): run "
                              "`agro-study run` or `plan` on the spec first")
    with open(cfg_path) as f:
        config = yaml.safe_load(f)
    with open(meta_path) as f:
        meta = json.load(f)
    res = dict(meta["resources"])
    if res.get("plan"):
        res["plan"] = PlanRequest(**res["plan"])
    req = CellRequest(meta["arm"], meta.get("point", ""), meta.get("seed"), tuple(meta.get("overrides", ())),
                      Resources(**res))
    return Cell(meta["id"], req, config, req.resources, os.path.abspath(cell_dir))
