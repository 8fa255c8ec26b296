"""A whole job's configuration (the defaults are the tiny CPU demo, examples/tiny_cpu.yaml): dataclasses, loaded from YAML with dotted `key=value` overrides.

Validation happens up front (`JobConfig.validate`), before any process group or model exists, and
every error names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


# Keys of earlier releases: a config using one gets the new name, not a generic "unknown key".
RENAMED_KEYS = {"algorithm.lr_baseline": "algorithm.ratio_baseline", "algorithm.lr_coef": "algorithm.ratio_coef"}


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    """Where the starting policy (= the frozen reference) comes from."""
    megatron_checkpoint: str | None = None   # dir written by `agro-convert import`
    hf_checkpoint: str | None = None         # HF dir; converted in-process at start-up
    tokenizer: str | None = None             # tokenizer dir (default: the checkpoint's)
    # Built from scratch when no checkpoint is given (the CPU demo): a tiny Llama-3 shape.
    tiny: dict = field(default_factory=lambda: dict(hidden_size=128, intermediate_size=384, num_layers=4,
                                                    num_heads=4, num_kv_heads=2, head_dim=32))
    dtype: str = "fp32"                      # fp32 | bf16


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int | None = None                    # None: world_size // (tp * pp * cp)
    # Process-group timeout: how long any collective (barrier, all-reduce) waits for the slowest rank
    # before the job fails. Applied when the process group is created (setup_job).
    timeout_minutes: float = 30.0
    # Bound for work that rank 0 does alone while the others wait on the filesystem instead of in a
    # collective (start-up conversion of model.hf_checkpoint: a 70B model can take well over
    # timeout_minutes); past it the waiting ranks stop with RankZeroWorkTimeout.
    long_work_timeout_minutes: float = 360.0


@dataclass
class DataConfig:
    train: str = "synthetic"                 # "synthetic" or a path / hub spec for load_problems
    heldout: str | None = "synthetic"
    synthetic_levels: list = field(default_factory=lambda: [1])
    synthetic_train_size: int = 70
    synthetic_heldout_size: int = 30
    max_prompt_tokens: int = 256
    system_prompt: str | None = None         # "default": data.prompt.SYSTEM_PROMPT; None: no system turn
    skip_malformed: bool = False
    seed: int = 0


@dataclass
class RolloutConfig:
    engine: str = "native"                   # native | vllm
    n: int = 8                               # responses per prompt (>= 2)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 24
    vllm_tp: int = 1
    vllm_gpu_memory_utilization: float = 0.4
    vllm_sleep_level: int = 2


@dataclass
class AlgorithmConfig:
    estimator: str = "agro_on"               # agro_on | agro_off | rloo | kl_pg | pg
    token_estimator: str = "vanilla"         # vanilla | causal | local_kl
    beta: float = 0.1
    ratio_baseline: str = "loo_var"          # agro_on's likelihood-ratio baseline: loo_var | none | loo_sq
    ratio_coef: float = 1.0                  # agro_on's likelihood-ratio coefficient c (c/(2 beta))
    logratio_reduction: str = "sum"          # sum | mean
    regime: str = "on_policy"                # on_policy | offline | replay | stale
    replay_p: float = 0.5                    # replay: probability a fresh sample is swapped for a stored one
    replay_capacity: int = 512
    staleness: int = 0                       # stale: rollouts generated k policy versions behind
    offline_data: str | None = None          # offline: responses from pi_ref stored on disk
    epochs_per_batch: int = 1                # optimizer steps per rollout batch (PPO-style)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"               # constant | cosine | linear
    # Share (0..1) of this rank's optimizer state (fp32 master + Adam moments) that lives and is
    # updated on the host for the whole run: megatron-core's optimizer_cpu_offload (its
    # HybridDeviceOptimizer inside the precision-aware distributed optimizer, also at DP=1); what
    # `agro-plan --optimizer-offload-fraction` models. 0: off. Needs model.dtype=bf16.
    offload_fraction: float = 0.0
    # Free the gradient buffers and park the (device part of the) optimizer state in host memory
    # while the rollout engine generates and takes the new weights; back before scoring and
    # training (train/offload.py). What `agro-plan --offload-train-state` models.
    offload_train_state: bool = False


@dataclass
class TrainConfig:
    steps: int = 60
    prompts_per_step: int = 8
    micro_batch_tokens: int = 4096           # sequence-length budget per micro-batch
    seed: int = 1234
    max_bad_steps: int = 3                   # consecutive NaN/inf steps before the run stops


@dataclass
class SFTConfig:
    """Supervised warm-up on reference solutions (the paper starts from an SFT model)."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3


@dataclass
class EvalConfig:
    every: int = 10                          # 0: only before and after training
    n: int = 16
    temperature: float = 1.0                 # 0 = greedy; the paper evaluates at the training temperature
    max_problems: int = 64


@dataclass
class LoggingConfig:
    dir: str = "runs/tiny_cpu"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    dir: str | None = None                   # default: <logging.dir>/checkpoints
    save_every: int = 10                     # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    resume: str = "auto"                     # auto | never | <path>


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | None = None, overrides: list[str] | None = None) -> "JobConfig":
        raw: dict = _read_yaml(path) if path else {}
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=10)")
            key, value = item.split("=", 1)
            node = raw
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node[parts[-1]] = yaml.safe_load(value)
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- validation ------------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "JobConfig":
        # the choices and the algorithm's rules live with the code that implements them
        from agro_megatron.losses import (ESTIMATORS, LOGRATIO_REDUCTIONS, RATIO_BASELINES, TOKEN_ESTIMATORS,
                                          validate_algorithm)
        from agro_megatron.rollout import ENGINE_KINDS
        from agro_megatron.sources import REGIMES, source_class

        a, r, p = self.algorithm, self.rollout, self.parallel
        _one_of("algorithm.estimator", a.estimator, ESTIMATORS)
        _one_of("algorithm.token_estimator", a.token_estimator, TOKEN_ESTIMATORS)
        _one_of("algorithm.ratio_baseline", a.ratio_baseline, RATIO_BASELINES)
        _one_of("algorithm.logratio_reduction", a.logratio_reduction, LOGRATIO_REDUCTIONS)
        _one_of("algorithm.regime", a.regime, REGIMES)
        _one_of("rollout.engine", r.engine, ENGINE_KINDS)
        _one_of("model.dtype", self.model.dtype, ("fp32", "bf16"))
        _one_of("optim.schedule", self.optim.schedule, ("constant", "cosine", "linear"))
        if not 0.0 <= self.optim.offload_fraction <= 1.0 or (self.optim.offload_fraction > 0
                                                              and self.model.dtype != "bf16"):
            raise ConfigError(f"optim.offload_fraction={self.optim.offload_fraction} must be in [0, 1], and > 0 "
                              "needs model.dtype=bf16 (megatron-core's optimizer CPU offload keeps fp32 masters "
                              "of 16-bit weights; it cannot take an fp32 model's parameters)")
        if r.n < 2:
            raise ConfigError(f"rollout.n={r.n}: AGRO's leave-one-out baseline needs at least 2 "
                              "responses per prompt; set rollout.n >= 2")
        # the algorithm's rules live with the code that implements them: the sample source's for
        # the regime, the losses' for beta and the estimator pairings (so what validates here trains)
        source = source_class(a)
        try:
            source.check_config(a)
            validate_algorithm(a.estimator, a.beta, token_estimator=a.token_estimator,
                               ratio_baseline=a.ratio_baseline, logratio_reduction=a.logratio_reduction,
                               on_policy_samples=source.samples_are_on_policy)
        except ValueError as err:
            raise ConfigError(f"algorithm (regime={a.regime}, estimator={a.estimator}, beta={a.beta}, "
                              f"token_estimator={a.token_estimator}): {err}") from None
        if r.temperature < 0:
            raise ConfigError(f"rollout.temperature={r.temperature} must be >= 0")
        for key, value in (("model.megatron_checkpoint", self.model.megatron_checkpoint),
                           ("model.hf_checkpoint", self.model.hf_checkpoint),
                           ("model.tokenizer", self.model.tokenizer)):
            if value and not os.path.exists(value):
                raise ConfigError(f"{key}={value!r} does not exist: fix the path")
        for key in ("train", "heldout"):
            v = getattr(self.data, key)
            if v and v != "synthetic" and not os.path.exists(v) and "/" in v and os.path.sep in v:
                raise ConfigError(f"data.{key}={v!r} does not exist: fix the path")
        if min(p.tp, p.pp, p.cp) < 1:
            raise ConfigError("parallel.tp/pp/cp must all be >= 1")
        for key in ("timeout_minutes", "long_work_timeout_minutes"):
            if not getattr(p, key) > 0:
                raise ConfigError(f"parallel.{key}={getattr(p, key)} must be > 0 (minutes)")
        if world_size is not None:
            mp = p.tp * p.pp * p.cp
            dp = p.dp if p.dp is not None else world_size // mp
            if mp * dp != world_size:
                raise ConfigError(
                    f"parallel: TP x PP x CP x DP = {p.tp}x{p.pp}x{p.cp}x{dp} = {mp * dp} != world size "
                    f"{world_size}; launch {mp * dp} processes (torchrun --nproc-per-node) or change parallel.*")
            if self.train.prompts_per_step % dp:
                raise ConfigError(f"train.prompts_per_step={self.train.prompts_per_step} is not divisible "
                                  f"by DP={dp}: every data-parallel rank needs the same number of prompts")
        return self


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    """A YAML config; a top-level `base: other.yaml` (relative to this file) is merged underneath."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found: pass an existing YAML file")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: `base:` includes form a cycle")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base:
        parent = _read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base),
                            seen + (os.path.abspath(path),))
        raw = _deep_merge(parent, raw)
    return raw


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_of(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    for key in sorted(unknown):
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"config key {prefix}{key} was renamed to {RENAMED_KEYS[prefix + key]}: rename it "
                              "in your YAML or override")
    if unknown:
        key = sorted(unknown)[0]
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(names))}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value, hint = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value, hint, key):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key} cannot be null")
    if origin in (typing.Union, types.UnionType) and args:
        hint = args[0]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint in (int, str, bool) and not isinstance(value, hint):
        if hint is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected {hint.__name__}")
    if hint in (dict, list) and not isinstance(value, hint):
        raise ConfigError(f"{key}={value!r}: expected a {hint.__name__}")
    return value
