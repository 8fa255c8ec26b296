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


def distributed_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


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
