"""The study spec YAML: a base agro-train config, overrides, axes, seeds, named arms and resources.

    name: cpu_paper
    base: ../tiny_cpu.yaml            # any agro-train config; relative to this file
    overrides: [train.steps=60]       # applied to every cell
    seeds: [1, 2, 3]                  # each sets every key in seed_keys (default: train.seed)
    baseline: agro_on                 # the arm paired comparisons are made against
    max_attempts: 3                   # FAILED cells are retried until they have failed this often
    axes:                             # each axis: a list of points; a point: "k=v" or a list of them
      beta: [algorithm.beta=0.01, algorithm.beta=0.1]
      size: {small: [model.tiny.hidden_size=64], big: [model.tiny.hidden_size=256]}  # named points
    combine: product                  # product | zip (zip: all axes the same length)
    resources: {nodes: 1, procs_per_node: 1, time_limit: "00:30:00"}
    arms:
      agro_on: {overrides: [algorithm.estimator=agro_on]}
      big:
        overrides: [...]
        axes: {...}                   # an arm's own axes replace the study's
        resources: {plan: {model: llama3-70b, gpu: H100, nodes: 4}}   # layout from agro-plan

A string value starting with `cell:` names a file inside the cell's own directory (e.g.
`algorithm.offline_data=cell:offline.jsonl`: each cell generates and keeps its own pi_ref data).

Everything is checked when the spec is read (`load_spec`), before a cell is resolved, and every
error is a SpecError naming the file, the key and the fix. Resolving the cells (cells.py) then
checks each cell's config with the trainer's own loader and validation.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field

import yaml


class SpecError(ValueError):
    """A study spec problem; the message names the file, the key and how to fix it."""


TOP_KEYS = {"name", "base", "overrides", "seeds", "seed_keys", "baseline", "max_attempts", "heartbeat_timeout_s",
            "axes", "combine", "resources", "arms", "slurm"}
ARM_KEYS = {"overrides", "axes", "combine", "resources", "seeds"}
RESOURCE_KEYS = {"nodes", "gpus_per_node", "procs_per_node", "cpus_per_task", "time_limit", "partition", "plan"}
PLAN_KEYS = {"model", "gpu", "nodes", "gpus_per_node", "prompt_len", "offload_train_state", "recompute"}
SLURM_KEYS = {"max_parallel", "extra_args", "setup", "report_time_limit"}
COMBINE = ("product", "zip")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class PlanRequest:
    """Ask agro-plan for the layout: the best fitting TP x PP of `model` on nodes x gpus_per_node `gpu`."""
    model: str                       # a Llama-3 preset (llama3-8b, ...) or an HF config.json path
    gpu: str = "H100"                # a GPU preset name (agro-plan --gpu)
    nodes: int = 1
    gpus_per_node: int = 8
    prompt_len: int = 512            # prompt tokens assumed by the memory model
    offload_train_state: bool = False
    recompute: bool | None = None    # None: searched with and without


@dataclass(frozen=True)
class Resources:
    """What one cell of an arm needs. procs_per_node: trainer ranks per node (default: the GPUs, else 1)."""
    nodes: int = 1
    gpus_per_node: int = 0           # 0: CPU-only (gloo)
    procs_per_node: int | None = None
    cpus_per_task: int = 1           # Slurm --cpus-per-task (per rank)
    time_limit: str = "01:00:00"     # Slurm --time of one attempt ([D-]HH:MM:SS)
    partition: str | None = None
    plan: PlanRequest | None = None  # layout and GPU count from agro-plan (resolved per cell)

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or (self.gpus_per_node if self.gpus_per_node > 0 else 1)

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def group_key(self) -> tuple:
        """Cells with equal keys share one Slurm job array."""
        return (self.nodes, self.gpus_per_node, self.ranks_per_node, self.cpus_per_task, self.time_limit,
                self.partition)

    def label(self) -> str:
        dev = f"{self.gpus_per_node}gpu" if self.gpus_per_node else "cpu"
        return f"{self.nodes}n_{self.ranks_per_node}r_{dev}_{self.time_limit.replace(':', '')}"


@dataclass(frozen=True)
class Arm:
    """A named treatment: overrides on top of the study's, its axes (points) and resources."""
    name: str
    overrides: tuple[str, ...] = ()
    points: tuple[tuple[str, tuple[str, ...]], ...] = (("", ()),)  # (label, overrides) per axis point
    resources: Resources = Resources()
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class SlurmOptions:
    """Study-wide Slurm settings."""
    max_parallel: int = 8            # the %K of --array=...%K: tasks of one array running at once
    extra_args: tuple[str, ...] = ()  # more #SBATCH options, e.g. ["--account=abc"]
    setup: str = ""                  # shell run before each task (venv, module load)
    report_time_limit: str = "00:30:00"


@dataclass(frozen=True)
class StudySpec:
    """A parsed study: every path absolute, every arm with its expanded axis points."""
    path: str                        # the spec file
    name: str
    base: str | None                 # the agro-train config every cell starts from
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    arms: tuple[Arm, ...]
    baseline: str | None
    max_attempts: int = 3
    heartbeat_timeout_s: float = 300.0  # a RUNNING cell silent this long is requeued
    slurm: SlurmOptions = SlurmOptions()

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)


def load_spec(path: str) -> StudySpec:
    """Read and check a study spec (SpecError on any problem, before anything runs)."""
    if not os.path.exists(path):
        raise SpecError(f"study spec {path!r} not found: pass an existing YAML file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: not valid YAML ({e})") from None
    return parse_spec(raw, path)


def parse_spec(raw: dict, path: str) -> StudySpec:
    """A StudySpec from the YAML's mapping; `path` names the file in errors and anchors relative paths."""
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the top level must be a mapping (name, base, arms, ...)")
    _no_unknown(raw, TOP_KEYS, path, "")
    here = os.path.dirname(os.path.abspath(path))
    base = raw.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise SpecError(f"{path}: base must be the path of an agro-train config YAML")
        base = os.path.normpath(os.path.join(here, base))
        if not os.path.exists(base):
            raise SpecError(f"{path}: base config {base!r} not found (base is relative to the spec file)")
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SpecError(f"{path}: name {name!r} may only use letters, digits, '_', '.', '-'")
    overrides = _overrides(raw.get("overrides", []), path, "overrides")
    seeds = _seeds(raw.get("seeds", [None]), path, "seeds")
    seed_keys = tuple(_str_list(raw.get("seed_keys", ["train.seed"]), path, "seed_keys"))
    if not seed_keys:
        raise SpecError(f"{path}: seed_keys is empty; list the config keys a seed sets, e.g. [train.seed]")
    max_attempts = raw.get("max_attempts", 3)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise SpecError(f"{path}: max_attempts={max_attempts!r} must be an integer >= 1")
    hb = raw.get("heartbeat_timeout_s", 300.0)
    if not isinstance(hb, (int, float)) or isinstance(hb, bool) or hb <= 0:
        raise SpecError(f"{path}: heartbeat_timeout_s={hb!r} must be a number of seconds > 0")
    study_points = _points(raw.get("axes"), raw.get("combine", "product"), path, "axes")
    study_res = _resources(raw.get("resources", {}), path, "resources", Resources())
    arms_raw = raw.get("arms")
    if arms_raw is None:
        arms_raw = {"default": {}}
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise SpecError(f"{path}: arms must be a non-empty mapping of arm name -> {{overrides, axes, resources}}")
    arms = []
    for arm_name, arm_raw in arms_raw.items():
        if not isinstance(arm_name, str):  # YAML reads on/off/yes/no as booleans, 1 as an integer
            raise SpecError(f"{path}: arm name {arm_name!r} is not a string; quote it (e.g. 'on': ...)")
        key = f"arms.{arm_name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", arm_name):
            raise SpecError(f"{path}: arm name {arm_name!r} may only use letters, digits, '_', '.', '-'")
        arm_raw = arm_raw or {}
        if not isinstance(arm_raw, dict):
            raise SpecError(f"{path}: {key} must be a mapping (overrides, axes, resources, seeds)")
        _no_unknown(arm_raw, ARM_KEYS, path, key + ".")
        points = (_points(arm_raw["axes"], arm_raw.get("combine", "product"), path, key + ".axes")
                  if "axes" in arm_raw else study_points)
        res = _resources(arm_raw.get("resources", {}), path, key + ".resources", study_res)
        arm_seeds = _seeds(arm_raw["seeds"], path, key + ".seeds") if "seeds" in arm_raw else seeds
        arms.append(Arm(arm_name, tuple(_overrides(arm_raw.get("overrides", []), path, key + ".overrides")),
                        points, res, arm_seeds))
    baseline = raw.get("baseline")
    if baseline is not None and str(baseline) not in arms_raw:
        raise SpecError(f"{path}: baseline {baseline!r} is not an arm; choose one of {', '.join(map(str, arms_raw))}")
    return StudySpec(path=os.path.abspath(path), name=name, base=base, overrides=tuple(overrides), seeds=seeds,
                     seed_keys=seed_keys, arms=tuple(arms), baseline=None if baseline is None else str(baseline),
                     max_attempts=max_attempts, heartbeat_timeout_s=float(hb),
                     slurm=_slurm(raw.get("slurm", {}), path))


# ---------------------------------------------------------------------------------------------- parts
def _no_unknown(raw: dict, valid: set, path: str, prefix: str) -> None:
    unknown = sorted(set(map(str, raw)) - valid)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        raise SpecError(f"{path}: unknown key {prefix}{unknown[0]}; {hint}")


def _str_list(value, path: str, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{path}: {key} must be a list of strings, got {value!r}")
    return value


def _overrides(value, path: str, key: str) -> list[str]:
    """A list of `dotted.key=value` strings (a point may also be one string of several, space-separated)."""
    items = _str_list(value, path, key)
    for item in items:
        k = item.split("=", 1)[0]
        if "=" not in item or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k):
            raise SpecError(f"{path}: {key}: {item!r} is not a dotted key=value override (e.g. algorithm.beta=0.1)")
        if k in ("logging.dir", "checkpoint.dir", "checkpoint.resume"):
            raise SpecError(f"{path}: {key}: {k} is set by agro-study (each cell runs and resumes in its own "
                            "directory); remove the override")
    return items


def _seeds(value, path: str, key: str) -> tuple:
    if value == [None]:
        return (None,)
    if not isinstance(value, list) or not value:
        raise SpecError(f"{path}: {key} must be a non-empty list of integers, e.g. [1, 2, 3]")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise SpecError(f"{path}: {key}={value!r}: every seed must be an integer")
    if len(set(value)) != len(value):
        raise SpecError(f"{path}: {key}={value!r} repeats a seed; list each once")
    return tuple(value)


def _point(item, path: str, key: str) -> tuple[str, ...]:
    if isinstance(item, str):
        item = item.split()
    if not isinstance(item, list) or not item:
        raise SpecError(f"{path}: {key}: a point must be 'k=v' or a non-empty list of them, got {item!r}")
    return tuple(_overrides(item, path, key))


def _label(point: tuple[str, ...]) -> str:
    return ",".join(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in point)


def _points(axes, combine, path: str, key: str) -> tuple:
    """The axis points as (label, overrides): the product or the zip of the axes."""
    if axes is None:
        return (("", ()),)
    if combine not in COMBINE:
        raise SpecError(f"{path}: combine={combine!r} next to {key} is not valid; choose one of {', '.join(COMBINE)}")
    if not isinstance(axes, dict) or not axes:
        raise SpecError(f"{path}: {key} must be a non-empty mapping of axis name -> list of points")
    lists = []
    for name, values in axes.items():
        if not isinstance(values, (list, dict)):
            raise SpecError(f"{path}: {key}.{name} must be a list of points (k=v strings or lists of them) or a "
                            "mapping of point name -> overrides")
        if not values:
            raise SpecError(f"{path}: {key}.{name} is empty; give it at least one point or remove the axis")
        if isinstance(values, dict):  # named points: the label is axis=name
            pts = [(f"{name}={label}", _point(v, path, f"{key}.{name}.{label}")) for label, v in values.items()]
        else:
            pts = [(None, _point(v, path, f"{key}.{name}")) for v in values]
        if len({p for _, p in pts}) != len(pts):
            raise SpecError(f"{path}: {key}.{name} repeats a point; list each once")
        lists.append(pts)
    if combine == "zip":
        lengths = {len(v) for v in lists}
        if len(lengths) > 1:
            raise SpecError(f"{path}: {key} is zipped but the axes have different lengths "
                            f"({', '.join(f'{n}: {len(v)}' for n, v in zip(axes, lists))}); make them equal "
                            "or use combine: product")
        combos = list(zip(*lists))
    else:
        combos = list(itertools.product(*lists))
    out = []
    for combo in combos:
        flat = tuple(o for _, p in combo for o in p)
        out.append((",".join(label or _label(p) for label, p in combo), flat))
    return tuple(out)


def _resources(raw, path: str, key: str, default: Resources) -> Resources:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: {key} must be a mapping ({', '.join(sorted(RESOURCE_KEYS))})")
    _no_unknown(raw, RESOURCE_KEYS, path, key + ".")
    kw = {}
    for k in ("nodes", "gpus_per_node", "procs_per_node", "cpus_per_task"):
        if k in raw:
            v = raw[k]
            low = 0 if k == "gpus_per_node" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise SpecError(f"{path}: {key}.{k}={v!r} must be an integer >= {low}")
            kw[k] = v
    if "time_limit" in raw:
        t = str(raw["time_limit"])
        if not _TIME.match(t):
            raise SpecError(f"{path}: {key}.time_limit={t!r} is not a Slurm time ([D-]HH:MM:SS, e.g. '02:00:00')")
        kw["time_limit"] = t
    if "partition" in raw:
        kw["partition"] = str(raw["partition"])
    if "plan" in raw:
        p = raw["plan"]
        if not isinstance(p, dict) or "model" not in p:
            raise SpecError(f"{path}: {key}.plan must be a mapping with at least `model` (e.g. llama3-8b)")
        _no_unknown(p, PLAN_KEYS, path, key + ".plan.")
        for k in ("nodes", "gpus_per_node", "prompt_len"):
            if k in p and (not isinstance(p[k], int) or isinstance(p[k], bool) or p[k] < 1):
                raise SpecError(f"{path}: {key}.plan.{k}={p[k]!r} must be an integer >= 1")
        kw["plan"] = PlanRequest(**{k: p[k] for k in p})
    return dataclasses.replace(default, **kw)


def _slurm(raw, path: str) -> SlurmOptions:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: slurm must be a mapping ({', '.join(sorted(SLURM_KEYS))})")
    _no_unknown(raw, SLURM_KEYS, path, "slurm.")
    kw = {}
    if "max_parallel" in raw:
        v = raw["max_parallel"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"{path}: slurm.max_parallel={v!r} must be an integer >= 1")
        kw["max_parallel"] = v
    if "extra_args" in raw:
        kw["extra_args"] = tuple(_str_list(raw["extra_args"], path, "slurm.extra_args"))
    if "setup" in raw:
        kw["setup"] = str(raw["setup"])
    if "report_time_limit" in raw:
        t = str(raw["report_time_limit"])
        if not _TIME.match(t):
            raise SpecError(f"{path}: slurm.report_time_limit={t!r} is not a Slurm time ([D-]HH:MM:SS)")
        kw["report_time_limit"] = t
    return SlurmOptions(**kw)


@dataclass(frozen=True)
class CellRequest:
    """One cell before resolution: arm x axis point x seed, and the overrides that make its config."""
    arm: str
    point: str                       # the axis point's label ("" without axes)
    seed: int | None
    overrides: tuple[str, ...] = field(default=())
    resources: Resources = Resources()

    @property
    def group(self) -> str:
        """What the report aggregates over seeds: the arm and the axis point."""
        return self.arm if not self.point else f"{self.arm}[{self.point}]"


def cell_requests(spec: StudySpec) -> list[CellRequest]:
    """Every (arm, point, seed), in spec order; later overrides win (study < arm < point < seed)."""
    out = []
    for arm in spec.arms:
        for label, point in arm.points:
            for seed in arm.seeds or spec.seeds:
                seed_ov = () if seed is None else tuple(f"{k}={seed}" for k in spec.seed_keys)
                out.append(CellRequest(arm.name, label, seed, spec.overrides + arm.overrides + point + seed_ov,
                                       arm.resources))
    return out
