"""A whole job's configuration (the defaults are the tiny CPU demo, examples/tiny_cpu.yaml): dataclasses, loaded from YAML with dotted `key=value` overrides.

Validation happens up front (`JobConfig.validate`), before any process group or model exists, and
every error names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
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


# model.tiny's keys: the shape every tiny model needs, and the optional ones with their defaults
# (train/model_setup.py arch_for_job builds the LlamaArch from exactly these).
TINY_REQUIRED = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
TINY_OPTIONAL = {"rope_theta": 500000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False}


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
    # Rendezvous bound: how long the ranks wait for each other to start and reach MASTER_ADDR's
    # store (a node that starts late or cannot reach the first node) before every rank stops with
    # parallel.RendezvousError, instead of waiting out timeout_minutes.
    rendezvous_timeout_minutes: float = 10.0


@dataclass
class DataConfig:
    train: str = "synthetic"                 # "synthetic" or a path / hub spec for load_problems
    # synthetic (with train=synthetic) | split:<fraction or count> of data.train | <file> | none: see heldout_choice
    heldout: str | None = "synthetic"
    synthetic_levels: list = field(default_factory=lambda: [1])
    # None: the mixed MATH-like kinds; ["sums"]: a + b with up to `level` digits each (data/synthetic.py)
    synthetic_kinds: list | None = None
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
    # Where log pi of the batch comes from, for a batch drawn entirely from the current policy
    # (first epoch; other batches always recompute):
    #   recompute: the trainer runs the policy and the reference side by side (exact; also measures
    #              the full-vocabulary KL and entropy logged as train/kl_full_vocab, train/entropy);
    #   engine:    the sampler's own log-probs of the sampled tokens (the same quantity: the native
    #              sampler's agree with the trainer's to ~1e-6 in fp32; vLLM's to its kernels' bf16
    #              precision) and the reference runs alone: one forward pass less per step. Trades
    #              the full-vocabulary KL/entropy metrics (train/kl, the sampled log-ratio, stays)
    #              and that last bit of exactness for speed. Not with a token estimator that reads the
    #              full-vocabulary KL.
    logprobs: str = "recompute"
    # The trainer's log-prob, entropy and KL passes and the RL and SFT losses take the policy's (and
    # the reference's) final hidden states and vocab-parallel output weight, and compute in token x
    # vocab tiles (ops/fused_output.py): the [tokens, V/TP] logits are never materialised, per
    # micro-batch and per model. Trades one more output-layer matmul in the backward (the tiles are
    # recomputed) for that memory; the values equal the logits path's to floating-point rounding
    # (fp32 runs agree to float32 rounding; bf16 logits are rounded as the bf16 output layer rounds
    # them). The sampler still gets logits. The model runs without sequence parallelism (none is
    # configurable); a sequence-parallel output layer is refused by models/hidden_head.py.
    fused_output: bool = False


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
    # auto: continue the run in logging.dir (its config.json must match this config, train/run_dir.py);
    # never: a fresh run, the earlier one moved aside to <logging.dir>.old-<time>; <path>: from that checkpoint
    resume: str = "auto"
    # Keys (or whole sections) allowed to differ from the run dir's config.json on this resume,
    # e.g. [algorithm.beta]; the keys that may always change are train/run_dir.py's RESUMABLE_KEYS
    accept_changes: list = field(default_factory=list)


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
            try:
                node[parts[-1]] = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                                  "or fix it (e.g. model.tiny='{hidden_size: 64}')") from None
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- validation ------------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "JobConfig":
        # the choices and the algorithm's rules live with the code that implements them
        from agro_megatron.losses import (ESTIMATORS, FULL_VOCAB_KL_TOKEN_ESTIMATORS, LOGRATIO_REDUCTIONS,
                                          RATIO_BASELINES, TOKEN_ESTIMATORS, validate_algorithm)
        from agro_megatron.rollout import ENGINE_KINDS
        from agro_megatron.sources import REGIMES, source_class

        a, r, p = self.algorithm, self.rollout, self.parallel
        _one_of("algorithm.estimator", a.estimator, ESTIMATORS)
        _one_of("algorithm.token_estimator", a.token_estimator, TOKEN_ESTIMATORS)
        _one_of("algorithm.ratio_baseline", a.ratio_baseline, RATIO_BASELINES)
        _one_of("algorithm.logratio_reduction", a.logratio_reduction, LOGRATIO_REDUCTIONS)
        _one_of("algorithm.regime", a.regime, REGIMES)
        _one_of("rollout.engine", r.engine, ENGINE_KINDS)
        _one_of("train.logprobs", self.train.logprobs, ("recompute", "engine"))
        if self.train.logprobs == "engine" and a.token_estimator in FULL_VOCAB_KL_TOKEN_ESTIMATORS:
            raise ConfigError(f"train.logprobs=engine cannot serve algorithm.token_estimator={a.token_estimator}: "
                              "its advantages need the full-vocabulary KL, which only the paired pass measures; "
                              "set train.logprobs=recompute or another token estimator")
        _one_of("model.dtype", self.model.dtype, ("fp32", "bf16"))
        _one_of("optim.schedule", self.optim.schedule, ("constant", "cosine", "linear"))
        if not 0.0 <= self.optim.offload_fraction <= 1.0 or (self.optim.offload_fraction > 0
                                                              and self.model.dtype != "bf16"):
            raise ConfigError(f"optim.offload_fraction={self.optim.offload_fraction} must be in [0, 1], and > 0 "
                              "needs model.dtype=bf16 (megatron-core's optimizer CPU offload keeps fp32 masters "
                              "of 16-bit weights; it cannot take an fp32 model's parameters)")
        _check_numbers(self)
        _check_tiny(self.model.tiny)
        heldout_choice(self.data)
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
        for key in ("timeout_minutes", "long_work_timeout_minutes", "rendezvous_timeout_minutes"):
            if not getattr(p, key) > 0:
                raise ConfigError(f"parallel.{key}={getattr(p, key)} must be > 0 (minutes)")
        if world_size is not None:
            mp = p.tp * p.pp * p.cp
            dp = p.dp if p.dp is not None else world_size // mp
            if p.dp is None and dp == 0:
                raise ConfigError(
                    f"parallel: TP x PP x CP = {p.tp}x{p.pp}x{p.cp} needs {mp} processes per model replica, but "
                    f"the world size is {world_size}; launch a multiple of {mp} processes (torchrun "
                    f"--nproc-per-node {mp}) or lower parallel.tp/pp/cp so their product divides {world_size}")
            if mp * dp != world_size:
                raise ConfigError(
                    f"parallel: TP x PP x CP x DP = {p.tp}x{p.pp}x{p.cp}x{dp} = {mp * dp} != world size "
                    f"{world_size}; launch {mp * dp} processes (torchrun --nproc-per-node) or change parallel.*")
            if self.train.prompts_per_step % dp:
                raise ConfigError(f"train.prompts_per_step={self.train.prompts_per_step} is not divisible "
                                  f"by DP={dp}: every data-parallel rank needs the same number of prompts")
        return self


SPLIT_PREFIX = "split:"
HELDOUT_FORMS = "data.heldout=split:0.1 (hold out a share of data.train), data.heldout=<file>, or data.heldout=none"


def heldout_choice(d: "DataConfig") -> tuple[str, object]:
    """("synthetic" | "none" | "split" | "file", detail): what data.heldout asks for; raises
    ConfigError for a value that is none of them, or a combination that would give nothing
    (train/inputs.py select_problems does what it says)."""
    value = d.heldout
    if value is None or value.strip().lower() == "none":
        return "none", None
    if value == "synthetic":
        if d.train != "synthetic":
            raise ConfigError(f"data.heldout=synthetic only goes with data.train=synthetic; with data.train="
                              f"{d.train!r} it would give an empty held-out set. Choose {HELDOUT_FORMS}")
        return "synthetic", None
    if value.startswith(SPLIT_PREFIX):
        spec = value[len(SPLIT_PREFIX):].strip()
        try:
            share: float | int = int(spec) if spec.isdigit() else float(spec)
        except ValueError:
            share = -1
        if isinstance(share, float) and not 0.0 < share < 1.0 or isinstance(share, int) and share < 1:
            raise ConfigError(f"data.heldout={value!r}: write split:<fraction in (0, 1)> or split:<count >= 1>, "
                              "e.g. split:0.1 or split:500")
        return "split", share
    return "file", value


def check_writable_dir(key: str, path: str) -> None:
    """Create `path` if needed and prove a file can be written in it, or raise ConfigError naming
    `key`: a run must not fail at its first save, after SFT and the first evaluation. Every rank
    calls it, before the process group exists, so no rank waits for one that already stopped."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={path!r} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                          f"choose a writable directory, e.g. {key}=runs/my_run") from None


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    """A YAML config; a top-level `base: other.yaml` (relative to this file) is merged underneath."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found: pass an existing YAML file")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: pass a YAML file (e.g. examples/tiny_cpu.yaml)")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: `base:` includes form a cycle")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}); fix the file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read ({err.strerror or err}); fix its permissions "
                          "or pass another file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base:
        parent = _read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base),
                            seen + (os.path.abspath(path),))
        raw = _deep_merge(parent, raw)
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line, with the 1-based line and column where it has them."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_of(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


def _in(lo=None, hi=None, *, lo_open=False, hi_open=False, null_ok=False):
    """A range test for a number: finite, between lo and hi (open or closed ends); bools never pass."""
    def test(v):
        if v is None:
            return null_ok
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)
    return test


# Every number in the config and the values it may take, checked by `validate` before anything starts
# (a zero, negative, nan or inf that passed here used to fail after SFT, or be silently accepted).
# key -> (test, what the value must be, and why / the fix)
NUMBER_RULES = {
    "parallel.tp": (_in(1), ">= 1"),
    "parallel.pp": (_in(1), ">= 1"),
    "parallel.cp": (_in(1), ">= 1"),
    "parallel.dp": (_in(1, null_ok=True), "an integer >= 1, or null (world size // (tp*pp*cp))"),
    "parallel.timeout_minutes": (_in(0, lo_open=True), "a finite number of minutes > 0"),
    "parallel.long_work_timeout_minutes": (_in(0, lo_open=True), "a finite number of minutes > 0"),
    "parallel.rendezvous_timeout_minutes": (_in(0, lo_open=True), "a finite number of minutes > 0"),
    "data.synthetic_train_size": (_in(1), ">= 1 (problems generated for training)"),
    "data.synthetic_heldout_size": (_in(0), ">= 0"),
    "data.max_prompt_tokens": (_in(1), ">= 1 (tokens in a prompt; longer rows are rejected when data loads)"),
    "rollout.temperature": (_in(0, lo_open=True), "a finite number > 0: training samples and scores at this "
                            "temperature, and 0 (greedy) has no log-probabilities to train on; greedy evaluation "
                            "is eval.temperature=0"),
    "rollout.top_p": (_in(0, 1, lo_open=True), "in (0, 1]; 1 keeps the whole distribution"),
    "rollout.top_k": (_in(0), ">= 0; 0 keeps every token"),
    "rollout.max_new_tokens": (_in(1), ">= 1 (response length in tokens)"),
    "rollout.vllm_tp": (_in(1), ">= 1"),
    "rollout.vllm_gpu_memory_utilization": (_in(0, 1, lo_open=True), "a share of GPU memory in (0, 1]"),
    "rollout.vllm_sleep_level": (lambda v: v in (0, 1, 2) and not isinstance(v, bool), "0, 1 or 2"),
    "algorithm.beta": (_in(0), "a finite number >= 0 (the KL coefficient)"),
    "algorithm.ratio_coef": (_in(0), "a finite number >= 0 (1: the paper's agro_on; 0 drops the ratio term)"),
    "algorithm.replay_p": (_in(0, 1), "a probability in [0, 1]"),
    "algorithm.replay_capacity": (_in(1), ">= 1"),
    "algorithm.staleness": (_in(0), ">= 0 (policy versions behind)"),
    "algorithm.epochs_per_batch": (_in(1), ">= 1"),
    "optim.lr": (_in(0, lo_open=True), "a finite learning rate > 0 (e.g. 1e-4)"),
    "optim.min_lr": (_in(0), "a finite number >= 0, at most optim.lr (and sft.lr when SFT runs)"),
    "optim.weight_decay": (_in(0), "a finite number >= 0"),
    "optim.adam_beta1": (_in(0, 1, hi_open=True), "in [0, 1)"),
    "optim.adam_beta2": (_in(0, 1, hi_open=True), "in [0, 1)"),
    "optim.clip_grad": (_in(0), "a finite number >= 0 (0: no clipping)"),
    "optim.warmup_steps": (_in(0), ">= 0"),
    "optim.offload_fraction": (_in(0, 1), "in [0, 1]"),
    "train.steps": (_in(0), ">= 0 (RL steps)"),
    "train.prompts_per_step": (_in(1), ">= 1"),
    "train.micro_batch_tokens": (_in(1), ">= 1"),
    "train.max_bad_steps": (_in(1), ">= 1 (consecutive non-finite steps before the run stops)"),
    "sft.steps": (_in(0), ">= 0 (0: no SFT warm-up)"),
    "sft.batch_size": (_in(1), ">= 1"),
    "sft.lr": (_in(0, lo_open=True), "a finite learning rate > 0"),
    "eval.every": (_in(0), ">= 0 (0: evaluate only before and after training)"),
    "eval.n": (_in(1), ">= 1 (samples per held-out problem)"),
    "eval.temperature": (_in(0), "a finite number >= 0 (0: greedy)"),
    "eval.max_problems": (_in(1), ">= 1 (held-out problems evaluated)"),
    "checkpoint.save_every": (_in(0), ">= 0 (0: only at the end and on SIGTERM/SIGUSR1)"),
    "checkpoint.keep_last": (_in(1), ">= 1 (checkpoints kept)"),
}


def _check_numbers(cfg: "JobConfig") -> None:
    for key, (test, must) in NUMBER_RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not test(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {must}")
    o = cfg.optim
    for key, lr in (("optim.lr", o.lr), ("sft.lr", cfg.sft.lr if cfg.sft.steps > 0 else None)):
        if lr is not None and o.min_lr > lr:
            raise ConfigError(f"optim.min_lr={o.min_lr} is above {key}={lr}: the schedule decays towards min_lr, "
                              f"so set optim.min_lr <= {lr}")
    levels = cfg.data.synthetic_levels
    if cfg.data.train == "synthetic" and not all(isinstance(v, int) and not isinstance(v, bool) for v in levels):
        raise ConfigError(f"data.synthetic_levels={levels!r}: expected a list of integer levels, e.g. [1, 2]")


def _check_tiny(tiny: dict) -> None:
    """model.tiny: exactly the known keys (a misspelled one would silently fall back to a default)."""
    import difflib

    known = TINY_REQUIRED + tuple(TINY_OPTIONAL)
    for key in tiny:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean model.tiny.{close[0]}?" if close else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown key model.tiny.{key}: {hint}")
    missing = [k for k in TINY_REQUIRED if k not in tiny]
    if missing:
        raise ConfigError(f"model.tiny is missing {', '.join(missing)}: a tiny model needs all of "
                          f"{', '.join(TINY_REQUIRED)}")
    for key in TINY_REQUIRED + ("max_position_embeddings",):
        v = tiny.get(key, TINY_OPTIONAL.get(key))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model.tiny.{key}={v!r}: expected an integer >= 1")
    theta = tiny.get("rope_theta", TINY_OPTIONAL["rope_theta"])
    if not _in(0, lo_open=True)(theta):
        raise ConfigError(f"model.tiny.rope_theta={theta!r}: expected a finite number > 0")
    if not isinstance(tiny.get("tie_word_embeddings", False), bool):
        raise ConfigError(f"model.tiny.tie_word_embeddings={tiny['tie_word_embeddings']!r}: expected true or false")
    if tiny["num_heads"] % tiny["num_kv_heads"]:
        raise ConfigError(f"model.tiny: num_heads={tiny['num_heads']} is not a multiple of num_kv_heads="
                          f"{tiny['num_kv_heads']} (grouped-query attention shares each KV head among whole "
                          "groups of query heads)")


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
    if isinstance(value, bool) and hint is not bool:  # YAML reads true/yes/on as a bool: never a number or a name
        what = {int: "a number", float: "a number", str: "a string", dict: "a mapping", list: "a list"}.get(hint, hint)
        raise ConfigError(f"{key}={value!r}: expected {what}, got a boolean (YAML reads true/false/yes/no/on/off "
                          f"as booleans); write {'the number' if hint in (int, float) else 'the value in quotes'}")
    if hint is float and isinstance(value, (int, float)):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if hint in (int, str, bool) and not isinstance(value, hint):
        if hint is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected {hint.__name__}")
    if hint in (dict, list) and not isinstance(value, hint):
        raise ConfigError(f"{key}={value!r}: expected a {hint.__name__}")
    return value
