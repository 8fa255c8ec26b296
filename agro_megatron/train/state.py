"""Resumable trainer checkpoints: atomic, sharded, with every rank's RNG and the data position.

Layout of `<dir>/step_000123/`:
    state/                 megatron dist_checkpointing (torch_dist) of {"model", "optimizer"}: one tree,
                           as megatron expects (the optimizer's sharding refers to the model's)
    rank_00003.pt          per-rank state of every Stateful component (CheckpointManager's `states`):
                           progress counters, scheduler, sample source, RNG, metrics history
    trainer_checkpoint.json  the model's layer spec ("local/sdpa", "te/te"): load refuses another spec
    CHECKSUMS.json         size and SHA-256 of every file above (checkpoint/manifest.py), verified at load
    COMPLETE               written last; a directory without it is not a checkpoint
Saves go to a hidden `.step_000123.tmp-<token>` (checkpoint/atomic.py) and are renamed by rank 0
after every rank finished, so a kill at any moment leaves the previous checkpoint intact (a
complete copy left under a temp name is put back before the next resume or save, an incomplete
one is removed). What the user can rely on:
* nothing complete is deleted before its replacement is complete, and a step this process already
  saved or resumed from is not written again (a re-run of a finished command writes nothing);
* a resume verifies the checksums first; a damaged newest checkpoint is reported and the newest
  intact one is used instead (CorruptCheckpointError when none is intact);
* `keep_last` deletes only checkpoints older than the one just saved (and verified);
* a save that fails for lack of space or permission raises CheckpointWriteError, saying so.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from agro_megatron.checkpoint import manifest
from agro_megatron.checkpoint.atomic import atomic_dir, fault_point, recover_interrupted, remove_stale
from agro_megatron.checkpoint.errors import CheckpointWriteError, CorruptCheckpointError, IncompatibleCheckpointError
from agro_megatron.platform.lifetime import die_with_parent

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
META_NAME = "trainer_checkpoint.json"
MARKER = "COMPLETE"


class CheckpointSpecMismatch(IncompatibleCheckpointError):
    """A trainer checkpoint written by a model of another layer spec (TransformerEngine vs local)."""


class CheckpointLayoutMismatch(IncompatibleCheckpointError):
    """A trainer checkpoint written by another number of processes or TP x PP x CP x DP layout."""


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _say(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def step_of(path: str) -> int:
    """The step number of a `step_NNNNNN` checkpoint directory."""
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


# -- checksums, hashed by every rank (a share of the files each) ------------------------------------
def _write_checksums(directory: str) -> None:
    """CHECKSUMS.json for every file the ranks wrote into `directory` (call on every rank, after all
    finished writing): each rank hashes a share of the files, rank 0 writes the manifest."""
    _barrier()
    names = [manifest.checkpoint_files(directory) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    mine = manifest.digest_files(directory, names[0][_rank()::_world()])
    parts = [mine]
    if dist.is_initialized() and _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, mine)
    if _rank() == 0:
        manifest.write_manifest(directory, {k: v for part in parts for k, v in part.items()})


def verify_checkpoint(path: str) -> list[str] | None:
    """Problems with `path`'s files against its CHECKSUMS.json (empty: intact; None: it has none,
    an older writer's). Collective: call on every rank; each hashes a share, all get every problem."""
    expected = manifest.read_manifest(path)
    if expected is None:
        return None
    names = sorted(expected)
    problems = manifest.check_files(path, expected, names[_rank()::_world()])
    if dist.is_initialized() and _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, problems)
        problems = sorted(p for part in parts for p in part)
    return problems


def _verified_or_raise(path: str, what: str = "checkpoint") -> None:
    if not os.path.exists(os.path.join(path, MARKER)):
        raise CorruptCheckpointError(f"{path} is not a complete {what} (no {MARKER} marker: its save was "
                                     "interrupted); choose another, or remove it and run again")
    problems = verify_checkpoint(path)
    if problems:
        raise CorruptCheckpointError(
            f"{what} {path} is damaged: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. "
            "Nothing was loaded from it. Restore it from a copy, or move it aside (e.g. mv "
            f"{path} {path}.damaged) and run again")


# -- named errors for a save that cannot be written ----------------------------------------------
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first OSError with a write-failure errno in `exc`'s causes (and a torch.distributed
    CheckpointException's per-rank failures), depth first."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _dir_bytes(directory: str | None) -> int:
    total = 0
    for base, _, files in os.walk(directory) if directory else ():
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


def _expected_bytes(root: str, model: torch.nn.Module, target: str) -> int:
    """About how many bytes the save of `target` writes: the size of the newest complete
    checkpoint beside it (the same state), else 3x the model's weights on this rank (weights and
    Adam's two moments; the mixed-precision master copy adds more)."""
    previous = latest_checkpoint(root) if _STEP_DIR.match(os.path.basename(target)) else None
    if previous:
        return _dir_bytes(previous)
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def _write_error(exc: BaseException, target: str, root: str, *, written: str | None = None,
                 expected: int = 0) -> CheckpointWriteError | None:
    """A CheckpointWriteError saying why `target` could not be saved, or None for other failures.

    The writer's own message often hides the cause: torch's zip writer reports a full disk as
    "unexpected pos 704 vs 598", without an errno. So the disk also counts as full when the rest
    of the checkpoint (`expected` bytes, less what is already `written` into the temp directory)
    does not fit in the free space, or under 1 MiB is left.
    """
    if isinstance(exc, CheckpointWriteError):
        return exc
    found = _os_error_in(exc)
    code = found.errno if found is not None else None
    free = _free_bytes(root)
    if code is None and free is not None and (free < (1 << 20) or free < expected - _dir_bytes(written)):
        code = errno.ENOSPC
    if code is None:
        return None
    previous = latest_checkpoint(root) if _STEP_DIR.match(os.path.basename(target)) else None
    kept = (f"the previous checkpoint {previous} is intact" if previous and previous != target
            else "nothing saved earlier is affected")
    reason = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        need = f", the checkpoint needs about {expected} bytes" if expected else ""
        where = f"{free} bytes free in {root}{need}" if free is not None else root
        fix = ("free disk space (or lower checkpoint.keep_last), or set checkpoint.dir to a disk with room, "
               "then run the same command: it resumes from the newest complete checkpoint")
    else:
        where = getattr(found, "filename", None) or root
        fix = (f"make {root} writable, or set checkpoint.dir to a writable directory, then run the same "
               "command: it resumes from the newest complete checkpoint")
    err = CheckpointWriteError(f"{reason} while saving checkpoint {target} ({where}): it was not saved, "
                               f"{kept}. To go on: {fix}")
    err.errno = code
    return err


@contextlib.contextmanager
def _named_write_errors(target: str, root: str, *, written: str | None = None, expected: int = 0):
    """Turn a save's failure for lack of space or permission into a CheckpointWriteError (inside
    the temp directory's block, `written`, so that its partial files still count)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        named = _write_error(e, target, root, written=written, expected=expected)
        if named is None or named is e:
            raise
        raise named from e


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
    """Model weights only (e.g. the SFT result that becomes the reference), atomically, with checksums."""
    from megatron.core import dist_checkpointing

    die_with_parent()  # megatron's forked writers must not outlive a killed trainer
    parent = os.path.dirname(os.path.abspath(path))
    with _named_write_errors(path, parent):
        if _rank() == 0:
            remove_stale(parent, os.path.basename(path), marker=MARKER)
        with atomic_dir(path, collective=True, marker=MARKER) as tmp:
            with _named_write_errors(path, parent, written=str(tmp), expected=_expected_bytes(parent, model, path)):
                tmp = str(tmp)
                dist_checkpointing.save(model_sharded_state(model), tmp)
                _write_layer_spec(tmp, model)
                _write_checksums(tmp)


def recover_model_checkpoint(path: str) -> None:
    """Put back a complete `path` that a kill in the middle of its save left under a temp name
    (rank 0, then every rank waits)."""
    if _rank() == 0:
        recover_interrupted(os.path.dirname(os.path.abspath(path)), os.path.basename(path), marker=MARKER)
    _barrier()


def load_model_checkpoint(path: str, model: torch.nn.Module) -> None:
    """Load weights saved by save_model_checkpoint, its checksums verified first (collective)."""
    from megatron.core import dist_checkpointing

    _verified_or_raise(path, "model checkpoint")  # CorruptCheckpointError, nothing loaded
    check_layer_spec(path, model)
    state = dist_checkpointing.load(model_sharded_state(model), path)
    model.load_state_dict(state, strict=True)


def save_trainer_checkpoint(root: str, step: int, model: torch.nn.Module, optimizer, *, rank_state: dict,
                    keep_last: int) -> str:
    """Save model + optimizer (sharded) + this rank's state for `step`; return the final path."""
    from megatron.core import dist_checkpointing

    die_with_parent()  # megatron's forked writers must not outlive a killed trainer
    final = os.path.join(root, f"step_{step:06d}")
    with _named_write_errors(final, root):
        if _rank() == 0:
            remove_stale(root, marker=MARKER)  # leftovers of an interrupted save (complete ones are put back)
        with atomic_dir(final, collective=True, marker=MARKER) as tmp:
            with _named_write_errors(final, root, written=str(tmp), expected=_expected_bytes(root, model, final)):
                tmp = str(tmp)
                model_sd = model_sharded_state(model)
                opt_sd = _optimizer_sharded_state(optimizer, model_sd, is_loading=False)
                if _rank() == 0:
                    os.makedirs(os.path.join(tmp, "state"))
                _barrier()
                dist_checkpointing.save({"model": model_sd, "optimizer": opt_sd}, os.path.join(tmp, "state"))
                fault_point("state-written", os.path.basename(final))
                torch.save(rank_state, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
                _write_layer_spec(tmp, model)
                _write_checksums(tmp)
    if _rank() == 0:
        fault_point("before-prune", os.path.basename(final))
        _prune(root, step, keep_last)
    _barrier()
    return final


def _prune(root: str, step: int, keep_last: int) -> None:
    """keep_last: delete checkpoints older than `step` (just saved, its checksums computed from the
    files on disk) beyond the newest keep_last - 1 of them. Newer ones are never deleted here: they
    are damaged ones a resume skipped, or another run's, and a later save of their step replaces them."""
    older = [c for c in list_checkpoints(root) if step_of(c) < step]
    for old in older[:max(len(older) - (max(keep_last, 1) - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _write_layer_spec(directory: str, model: torch.nn.Module) -> None:
    """Record the model's layer spec beside its sharded weights (rank 0; see check_layer_spec)."""
    if _rank() == 0:
        from agro_megatron.models import llama

        with open(os.path.join(directory, META_NAME), "w") as f:
            json.dump({"layer_spec": llama.layer_spec_kind(model), "layout": process_layout()}, f)


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


def process_layout() -> dict:
    """This job's world size and megatron's TP x PP x CP x DP (world size only before megatron's set-up)."""
    from megatron.core import parallel_state as ps

    layout = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                      cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size())
    return layout


def _layout_text(layout: dict) -> str:
    n = layout["world_size"]
    parts = " ".join(f"{k}={layout[k]}" for k in ("tp", "pp", "cp", "dp") if k in layout)
    return f"{n} process{'es' if n != 1 else ''}" + (f" ({parts})" if parts else "")


def check_layout(path: str) -> None:
    """Raise CheckpointLayoutMismatch unless this job has the world size and layout that saved `path`.

    A trainer checkpoint holds each rank's data position, RNG and sample-source state (rank_*.pt)
    and the distributed optimizer's shards of that layout: at another layout the load failed deep
    inside torch.distributed.checkpoint (2 DP ranks' optimizer shards at DP=1), and had it loaded,
    the ranks' data positions and random states would not have been the saved run's. Checked
    before anything is read; checkpoints from before the layout record by their rank-file count.
    """
    meta_path = os.path.join(path, META_NAME)
    saved = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f).get("layout")
    how = "recorded"
    if saved is None:
        saved = {"world_size": len([n for n in os.listdir(path) if re.match(r"^rank_\d+\.pt$", n)])}
        how = f"counted from its rank files: no layout in {META_NAME}, written by an older agro-megatron"
    running = process_layout()
    if all(saved[k] == running[k] for k in saved if k in running):
        return
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    step = int(m.group(1)) if m else None
    n = saved["world_size"]
    relaunch = (f"launch {_layout_text({'world_size': n})}, e.g. torchrun --nproc-per-node {n} -m agro_megatron.train "
                "..., with" + "".join(f" parallel.{k}={saved[k]}" for k in ("tp", "pp", "cp") if k in saved))
    finish = f"train.steps={step}" if step is not None else "train.steps=<its step>"
    raise CheckpointLayoutMismatch(
        f"{path} was saved by {_layout_text(saved)} ({how}), but this job runs {_layout_text(running)}. A trainer "
        "checkpoint holds each rank's data position, random state and optimizer shard for the layout that wrote "
        f"it and cannot be resharded. Resume with the saved layout ({relaunch}). To go on at the new layout, "
        f"finish the run at the saved layout now ({finish}, which writes <logging.dir>/final_model) and start a "
        "new run from it in a fresh logging.dir: model.megatron_checkpoint=<old logging.dir>/final_model loads at any "
        "TP x PP (agro-convert export --megatron <it> gives HF); its optimizer state and data order start "
        "afresh and it becomes the new run's KL reference. Nothing was loaded.")


def load_trainer_checkpoint(path: str, model: torch.nn.Module, optimizer, *, verified: bool = False) -> dict:
    """Restore model and optimizer from `path`; return this rank's saved state. Its checksums are
    verified first (CorruptCheckpointError, nothing loaded), unless the caller just did (`verified`)."""
    from megatron.core import dist_checkpointing

    if not verified:
        _verified_or_raise(path)  # checksums first: nothing is read from a damaged checkpoint
    check_layer_spec(path, model)  # before anything is read into the model or the optimizer
    check_layout(path)
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
        self._in_sync: tuple[int, str] | None = None  # (step, checkpoint) equal to the live state

    def save(self, step: int) -> str:
        """Save `step`, unless the live state is the checkpoint this manager just saved or loaded
        for that step (a final save right after a periodic one, a re-run of a finished command):
        that complete checkpoint is kept as it is, not rewritten."""
        final = os.path.join(self.root, f"step_{step:06d}")
        if self._in_sync == (step, final) and os.path.exists(os.path.join(final, MARKER)):
            return final
        rank_state = {name: component.state_dict() for name, component in self.states.items()}
        path = save_trainer_checkpoint(self.root, step, self.model, self.optimizer,
                                       rank_state=rank_state, keep_last=self.keep_last)
        self._in_sync = (step, path)
        return path

    def recover(self) -> None:
        """Put back complete checkpoints that a kill in the middle of a save left under temp names."""
        if _rank() == 0:
            for path in recover_interrupted(self.root, marker=MARKER):
                print(f"recovered the complete checkpoint {path}, left under a temporary name by an interrupted save",
                      flush=True)
        _barrier()

    def latest(self) -> str | None:
        """The newest complete checkpoint, after `recover` (collective)."""
        self.recover()
        return latest_checkpoint(self.root)

    def load_newest(self) -> str | None:
        """Load the newest intact checkpoint; return its path (None: there is none to resume from).

        A damaged one (checksums differ, a file missing or cut short) is skipped, saying so on
        stdout; when every checkpoint is damaged, CorruptCheckpointError lists them and nothing is
        loaded. Collective."""
        self.recover()
        damaged = []
        for path in reversed(list_checkpoints(self.root)):
            problems = verify_checkpoint(path)
            if not problems:
                if damaged:
                    _say(f"resuming from {path}, the newest intact checkpoint: " + "; ".join(damaged))
                self.load(path, verified=True)
                return path
            damaged.append(f"{path} is damaged ({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}) "
                           "and was skipped")
        if damaged:
            raise CorruptCheckpointError(
                f"no intact checkpoint to resume from in {self.root}: {'; '.join(damaged)}. Nothing was loaded or "
                "deleted. Restore them from a copy, or move them aside to start the run over")
        return None

    def load(self, path: str, *, verified: bool = False) -> None:
        """Restore every component from `path` (its checksums verified first, unless `verified`)."""
        try:
            saved = load_trainer_checkpoint(path, self.model, self.optimizer, verified=verified)
        except (EOFError, pickle.UnpicklingError, OSError, RuntimeError) as e:
            if manifest.read_manifest(path) is not None:
                raise  # its files are intact (verified first): not damage
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it was written without checksums, "
                f"so the damage cannot be located. Move it aside (e.g. mv {path} {path}.damaged) and run again: "
                "the run resumes from the newest remaining checkpoint") from e
        missing = sorted(set(self.states) - set(saved))
        if missing:
            raise IncompatibleCheckpointError(
                f"{path} holds no state for {', '.join(missing)} (written by another version of agro-megatron "
                "or another regime): resume with the code and config that wrote it, or start a fresh run "
                "(checkpoint.resume=never, or a new logging.dir)")
        for name, component in self.states.items():
            component.load_state_dict(saved[name])
        name = os.path.basename(os.path.normpath(path))
        ours = _STEP_DIR.match(name) and os.path.realpath(os.path.dirname(os.path.normpath(path))) == os.path.realpath(self.root)
        self._in_sync = (step_of(name), os.path.join(self.root, name)) if ours else None
