"""Hardware platform adaptation. `apply()` is called once per process before megatron-core runs.

On machines with CUDA nothing is changed. Without CUDA, `platform.cpu` makes megatron-core's
CUDA-only call sites work on CPU tensors with the gloo backend. Nothing outside this package
knows those shims exist.
"""
from __future__ import annotations

import torch

_APPLIED = False


def device() -> torch.device:
    """The device that model tensors live on in this process."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend(cuda: bool | None = None) -> str:
    """The backend of the default process group: the one rule for where communicated tensors live.

    With CUDA it is ``"cpu:gloo,cuda:nccl"``: CUDA tensors (gradients, activations, logits) go
    over NCCL and CPU tensors over gloo. A plain ``"nccl"`` group accepts CUDA tensors only and
    fails with "No backend type associated with device type cpu" on the small CPU tensors the
    trainer, the engines and eval communicate (flags, counters, metric sums); with both backends
    registered no call site has to move its tensors. megatron-core's groups are created with
    ``backend=None`` and so inherit both. Object collectives and barriers use the CPU side
    (torch picks "cpu" when a group has one), so they need no CUDA device either.

    `cuda` overrides the detection: the tests ask what a CUDA machine would use.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def backend_device_types(backend: str) -> frozenset[str]:
    """Device types a process-group backend string accepts tensors on ("nccl" -> {"cuda"})."""
    single = {"gloo": "cpu", "nccl": "cuda", "ucc": "cuda", "mpi": "cpu"}
    backend = str(backend).lower()
    if ":" not in backend:
        return frozenset({single.get(backend, backend)})
    return frozenset(pair.split(":", 1)[0].strip() for pair in backend.split(","))


def apply() -> None:
    """Make megatron-core usable on this machine (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    if not torch.cuda.is_available():
        from agro_megatron.platform import cpu

        cpu.apply()
    _APPLIED = True


def is_cpu() -> bool:
    return not torch.cuda.is_available()
