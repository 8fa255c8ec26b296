"""`optim.offload_train_state`: the policy's training state off the accelerator while the rollout
engine generates and takes the new weights (`agro-plan --offload-train-state` models exactly this).

What leaves the device between one optimizer step and the next training pass:

- the DDP gradient buffers (`DistributedDataParallel.buffers[*].grad_data`). Their values are dead
  after `optimizer.step()`: every training pass starts with `zero_grad_buffer()`. So they are not
  copied anywhere, only freed, with megatron-core's own `offload_grad_buffers()` /
  `restore_grad_buffers()` (distributed_data_parallel.py:575/595: the buffer's storage is resized
  to 0 and back, so every `param.main_grad` / bucket view stays valid; restore zeroes it).
- the optimizer state: Adam moments, fp32 master params (when they are copies, bf16 models), and
  megatron's HybridDeviceOptimizer's device half (`optim.offload_fraction`; its host half is on the
  host already). Each distinct device storage is copied into a (pinned) host buffer and resized to
  0; `restore` reallocates it and copies the bytes back, so every tensor object, view and
  optimizer-state reference is the one the optimizer had, and the values are bit-identical.

Never moved: model parameters and anything sharing their storage (megatron's DDP parameter buffer,
the FP32Optimizer's params, which are the model's own, the distributed optimizer's fp32 shards,
which are views of them). megatron-core's `MegatronOptimizer.offload_to_cpu()` (optimizer.py:344)
moves `optimizer.param_groups` with `p.data = p.data.cpu()`: for an fp32 model or the
HybridDeviceOptimizer those are the model's weights (or views of its buffer), which it would detach
from the model; hence this module.

Use (the training loop): `offload()` before the rollout and again after the last optimizer step of a
step (before the weight sync), `restore()` after the rollout, before scoring / training, and
`with resident():` around a checkpoint save. Both calls are idempotent and are no-ops when disabled.
Host buffers are kept between steps (pinned allocation is slow) and reused by size.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from agro_megatron import platform
from agro_megatron.models import unwrap_model


@dataclasses.dataclass
class _Parked:
    owner: torch.Tensor       # a tensor on the storage (keeps the storage alive and reachable)
    nbytes: int
    host: torch.Tensor        # uint8 [nbytes] on the host


def _bytes_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    n = storage.nbytes()
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (n,), (1,))


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron optimizer (ChainedOptimizer, DistributedOptimizer,
    Float16/FP32Optimizer), with a HybridDeviceOptimizer's host and device sub-optimizers."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is None:  # a stub optimizer (no parameters on this rank)
            continue
        out.append(inner)
        out.extend(getattr(inner, "sub_optimizers", ()))
    return out


def host_split(optimizer) -> tuple[int, int, int] | None:
    """`optim.offload_fraction`: (elements the host Adam updates, elements the device Adam updates,
    parameters with a host copy) over megatron's HybridDeviceOptimizers; None if there is none."""
    hdos = [o for o in torch_optimizers(optimizer) if hasattr(o, "cpu_optimizers") and hasattr(o, "gpu_optimizer")]
    if not hdos:
        return None
    host = sum(p.numel() for h in hdos for o in h.cpu_optimizers for g in o.param_groups for p in g["params"])
    device = sum(p.numel() for h in hdos if h.gpu_optimizer is not None
                 for g in h.gpu_optimizer.param_groups for p in g["params"])
    return host, device, sum(len(h.gpu_params_map_cpu_copy) for h in hdos)


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer holds: the params it updates and its state values."""
    out = []
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            out.extend(p for p in group["params"] if torch.is_tensor(p))
        for state in opt.state.values():
            out.extend(v for v in state.values() if torch.is_tensor(v))
    return out


class TrainStateOffload:
    """Frees the grad buffers and parks the optimizer state on the host; restores both."""

    def __init__(self, ddp, optimizer, *, enabled: bool = True):
        self.ddp = ddp
        self.optimizer = optimizer
        self.enabled = enabled
        self.device = platform.device()
        self.offloaded = False
        self.parked: list[_Parked] = []
        self._pool: dict[int, list[torch.Tensor]] = {}
        self.freed_grad_bytes = 0     # last offload: gradient-buffer bytes released
        self.parked_bytes = 0         # last offload: optimizer bytes copied to the host

    # -- what moves ---------------------------------------------------------------------------
    def _buffers(self) -> list:
        return list(getattr(self.ddp, "buffers", [])) + list(getattr(self.ddp, "expert_parallel_buffers", []))

    def _protected(self) -> set:
        """Storages that belong to the model: its parameters and the DDP param / grad buffers."""
        keys = {p.untyped_storage()._cdata for p in unwrap_model(self.ddp).parameters()}
        for buf in self._buffers():
            for t in (getattr(buf, "param_data", None), getattr(buf, "grad_data", None)):
                if t is not None:
                    keys.add(t.untyped_storage()._cdata)
        return keys

    def optimizer_storages(self) -> list[torch.Tensor]:
        """One tensor per distinct, non-empty device storage of optimizer-only state."""
        protected, seen, out = self._protected(), set(), []
        for t in optimizer_tensors(self.optimizer):
            if t.device != self.device:
                continue  # on the host already (the HybridDeviceOptimizer's host half; 'step' counters)
            s = t.untyped_storage()
            key = s._cdata
            if key in protected or key in seen or s.nbytes() == 0:
                continue
            seen.add(key)
            out.append(t)
        return out

    # -- moving ---------------------------------------------------------------------------------
    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        free = self._pool.get(nbytes)
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=torch.cuda.is_available())

    def offload(self) -> None:
        """Free the grad buffers and park the optimizer state (no-op if disabled or parked)."""
        if not self.enabled or self.offloaded:
            return
        owners = self.optimizer_storages()  # before the grad buffers shrink: their storages are protected
        self.freed_grad_bytes = sum(b.grad_data.untyped_storage().nbytes() for b in self._buffers()
                                    if getattr(b, "grad_data", None) is not None)
        self.ddp.offload_grad_buffers(synchronize=True, empty_cache=False)
        parked = []
        for t in owners:
            s = t.untyped_storage()
            host = self._host_buffer(s.nbytes())
            host.copy_(_bytes_view(s, t.device), non_blocking=True)
            parked.append(_Parked(t, s.nbytes(), host))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies have landed before the device memory goes
        for p in parked:
            p.owner.untyped_storage().resize_(0)
        self.parked = parked
        self.parked_bytes = sum(p.nbytes for p in parked)
        self.offloaded = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def restore(self) -> None:
        """Reallocate the optimizer state with its exact bytes and the (zeroed) grad buffers."""
        if not self.enabled or not self.offloaded:
            return
        for p in self.parked:
            s = p.owner.untyped_storage()
            s.resize_(p.nbytes)
            _bytes_view(s, p.owner.device).copy_(p.host, non_blocking=True)
        self.ddp.restore_grad_buffers(synchronize=True)  # synchronizes the copies above too
        for p in self.parked:
            self._pool.setdefault(p.nbytes, []).append(p.host)
        self.parked = []
        self.offloaded = False

    @contextlib.contextmanager
    def resident(self):
        """The state on the device inside the block (a checkpoint save), parked again after it if it was."""
        was = self.offloaded
        self.restore()
        try:
            yield
        finally:
            if was:
                self.offload()

    def host_bytes(self) -> int:
        """Host memory this object holds (parked state and its reusable buffers)."""
        return sum(p.nbytes for p in self.parked) + sum(h.numel() for v in self._pool.values() for h in v)
