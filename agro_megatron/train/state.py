"""Resumable trainer checkpoints: atomic, sharded, with every rank's RNG and the data position.

Layout of `<dir>/step_000123/`:
    state/                 megatron dist_checkpointing (torch_dist) of {"model", "optimizer"}: one tree,
                           as megatron expects (the optimizer's sharding refers to the model's)
    rank_00003.pt          per-rank state of every Stateful component (CheckpointManager's `states`):
                           progress counters, scheduler, sample source, RNG, metrics history
    trainer_checkpoint.json  the model's layer spec ("local/sdpa", "te/te"): load refuses another spec
    COMPLETE               written last; a directory without it is not a checkpoint
Saves go to a hidden `.step_000123.tmp-<token>` (checkpoint/atomic.py) and are renamed by rank 0
after every rank finished, so a kill at any moment leaves the previous checkpoint intact (the
stale temporary directory is removed at the next save).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from agro_megatron.checkpoint.atomic import atomic_dir, remove_stale
from agro_megatron.checkpoint.errors import IncompatibleCheckpointError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
META_NAME = "trainer_checkpoint.json"


class CheckpointSpecMismatch(IncompatibleCheckpointError):
    """A trainer checkpoint written by a model of another layer spec (TransformerEngine vs local)."""


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        st["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:
        pass
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "megatron_tracker" in st:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(st["megatron_tracker"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first."""
    if not root or not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, "COMPLETE")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str) -> str | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _optimizer_sharded_state(optimizer, model_sd: dict, is_loading: bool) -> dict:
    """The DistributedOptimizer needs the DP-reshardable layout on CPU/gloo; others take no option."""
    import inspect

    inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    kwargs = {}
    if "sharding_type" in inspect.signature(inner.sharded_state_dict).parameters:
        kwargs["sharding_type"] = "dp_reshardable"
    if is_loading:
        _allocate_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)


def _allocate_adam_state(optimizer) -> None:
    """Give a fresh torch Adam/AdamW inside a megatron optimizer its (zero) state before a load.

    Without apex or TransformerEngine, megatron-core 0.16.1's DistributedOptimizer reads the step
    count out of the inner optimizer's per-parameter state while building the sharded state dict
    to load into (distrib_optimizer.py: `assert len(steps) == 1`), and a fresh optimizer has none:
    every resume with the distributed optimizer (DP > 1) failed there. Every value set here is
    overwritten by the load (the moments by the sharded state, the step by the saved param groups).
    """
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or len(inner.state):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Each parameter's Adam step count, as saved, in a tensor of its own.

    Without apex or TransformerEngine, megatron-core 0.16.1's DistributedOptimizer keeps torch
    Adam's per-parameter `step` out of its sharded parameter state ("read from param_groups"), but
    its dp_reshardable load then writes back the step tensor the state held when the load was
    prepared, and the one it set from the param groups before that is shared by every parameter
    (torch's Adam increments each counter in place). Either way the bias correction after a resume
    was wrong; the saved param groups hold the true count.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    # a ChainedOptimizer of several keeps each one's state under its index (optimizer.py)
    states = [loaded] if len(chained) == 1 else [loaded.get(i, loaded.get(str(i), {})) for i in range(len(chained))]
    for opt, state in zip(chained, states):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        steps = {g["step"] for g in state.get("optimizer", {}).get("param_groups", []) if "step" in g}
        if len(steps) == 1:
            step = float(steps.pop())
            for st in inner.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)


def model_sharded_state(model: torch.nn.Module) -> dict:
    return model.sharded_state_dict()


def save_model_checkpoint(path: str, model: torch.nn.Module) -> None:
    """Model weights only (e.g. the SFT result that becomes the reference), atomically."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        remove_stale(os.path.dirname(path), os.path.basename(path))
    with atomic_dir(path, collective=True, marker="COMPLETE") as tmp:
        tmp = str(tmp)
        dist_checkpointing.save(model_sharded_state(model), tmp)
        _write_layer_spec(tmp, model)


def load_model_checkpoint(path: str, model: torch.nn.Module) -> None:
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"{path} is not a complete model checkpoint (no COMPLETE marker)")
    check_layer_spec(path, model)
    state = dist_checkpointing.load(model_sharded_state(model), path)
    model.load_state_dict(state, strict=True)


def save_trainer_checkpoint(root: str, step: int, model: torch.nn.Module, optimizer, *, rank_state: dict,
                    keep_last: int) -> str:
    """Save model + optimizer (sharded) + this rank's state for `step`; return the final path."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, f"step_{step:06d}")
    if _rank() == 0:
        remove_stale(root)  # leftovers of an interrupted save
    with atomic_dir(final, collective=True, marker="COMPLETE") as tmp:
        tmp = str(tmp)
        model_sd = model_sharded_state(model)
        opt_sd = _optimizer_sharded_state(optimizer, model_sd, is_loading=False)
        if _rank() == 0:
            os.makedirs(os.path.join(tmp, "state"))
        _barrier()
        dist_checkpointing.save({"model": model_sd, "optimizer": opt_sd}, os.path.join(tmp, "state"))
        torch.save(rank_state, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
        _write_layer_spec(tmp, model)
    if _rank() == 0:
        for old in list_checkpoints(root)[:-max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_layer_spec(directory: str, model: torch.nn.Module) -> None:
    """Record the model's layer spec beside its sharded weights (rank 0; see check_layer_spec)."""
    if _rank() == 0:
        from agro_megatron.models import llama

        with open(os.path.join(directory, META_NAME), "w") as f:
            json.dump({"layer_spec": llama.layer_spec_kind(model)}, f)


def check_layer_spec(path: str, model: torch.nn.Module) -> None:
    """Raise CheckpointSpecMismatch unless `model` has the layer spec the checkpoint at `path` was saved with.

    The local and the TransformerEngine spec name the model's sharded keys differently (TE fuses the
    RMSNorm weights into linear_qkv / linear_fc1) and may order the parameters differently in the
    gradient buffer, which the distributed optimizer's dp_reshardable state follows. Only the spec
    part ("te" / "local") is compared: the attention cores have no parameters or state.
    """
    from agro_megatron.models import llama

    meta_path = os.path.join(path, META_NAME)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)["layer_spec"]
        recorded = "recorded"
    else:  # written before the record existed: every earlier run was CPU-only, i.e. the local spec
        saved, recorded = "local", f"assumed: no {META_NAME}, written by an older agro-megatron (CPU runs only)"
    running = llama.layer_spec_kind(model)
    if saved.split("/")[0] != running.split("/")[0]:
        raise CheckpointSpecMismatch(
            f"{path} was saved by a model built with the {saved!r} layer spec ({recorded}), but this run's "
            f"model uses {running!r} ('te': TransformerEngine, on a GPU with transformer-engine installed; "
            "'local': megatron-core's torch layers). Parameter names and the distributed optimizer's buffer "
            "layout differ between the specs, so the run cannot resume from it. Resume on the same software "
            "stack as the run that wrote it, or start a fresh RL run from the spec-independent final_model "
            "(<logging.dir>/final_model, or `agro-convert import` of its HF export) with "
            "model.megatron_checkpoint=<it> and checkpoint.resume=never (an sft_model: run the SFT stage "
            "again in a fresh logging.dir). Nothing was loaded.")


def load_trainer_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore model and optimizer from `path`; return this rank's saved state."""
    from megatron.core import dist_checkpointing

    check_layer_spec(path, model)  # before anything is read into the model or the optimizer
    with torch.no_grad():  # the distributed optimizer's fp32 shards are views of the parameters
        model_sd = model_sharded_state(model)
        opt_sd = _optimizer_sharded_state(optimizer, model_sd, is_loading=True)
        loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, os.path.join(path, "state"))
        model.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    if not os.path.exists(rank_file):
        raise RuntimeError(f"{path} was written by a job with fewer ranks (no {os.path.basename(rank_file)}); "
                           "resume with the same world size")
    return torch.load(rank_file, weights_only=False)


# -- what a trainer checkpoint holds besides the model and the optimizer ---------------------------
class Stateful(Protocol):
    """A component with resume state: the checkpoint manager saves and restores the set of them."""

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class RNGState:
    """This rank's random generators (python, numpy, torch, megatron's tracker, CUDA)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class CheckpointManager:
    """Trainer checkpoints under `root`: the model and the optimizer (sharded, megatron's
    dist_checkpointing) plus every component in `states`, each under its own name in the per-rank
    file. Components declare their state (`Stateful`); nothing else decides what is saved."""

    def __init__(self, root: str, *, model: torch.nn.Module, optimizer, states: dict[str, Stateful],
                 keep_last: int):
        self.root, self.model, self.optimizer, self.states, self.keep_last = root, model, optimizer, states, keep_last

    def save(self, step: int) -> str:
        rank_state = {name: component.state_dict() for name, component in self.states.items()}
        return save_trainer_checkpoint(self.root, step, self.model, self.optimizer,
                               rank_state=rank_state, keep_last=self.keep_last)

    def latest(self) -> str | None:
        return latest_checkpoint(self.root)

    def load(self, path: str) -> None:
        saved = load_trainer_checkpoint(path, self.model, self.optimizer)
        missing = sorted(set(self.states) - set(saved))
        if missing:
            raise IncompatibleCheckpointError(
                f"{path} holds no state for {', '.join(missing)} (written by another version of agro-megatron "
                "or another regime): resume with the code and config that wrote it, or start a fresh run "
                "(checkpoint.resume=never, or a new logging.dir)")
        for name, component in self.states.items():
            component.load_state_dict(saved[name])
