"""Device-strict collectives: record every torch.distributed call and check it against the GPU rule.

Why: on a CUDA machine the default process group is `platform.distributed_backend(cuda=True)`, and
a backend accepts tensors only on the device types it has an entry for: a plain "nccl" group
fails with "No backend type associated with device type cpu" on a CPU tensor. On a CPU machine
every collective goes over gloo, so such a call passes every CPU test and crashes on the first
cluster run. This mode replays the GPU rule on CPU: while it is active every tensor collective is
recorded with its caller, its tensors' devices and the backend its group would have on a GPU
machine (the platform layer's CUDA backend for the default group and for groups created with
`backend=None`, which inherit it; the explicit backend for groups created with one, such as
megatron's gloo groups), and a tensor whose device type that backend does not accept is a
violation.

The projection is conservative: a tensor on the CPU here is taken to be on the CPU there too.
That is exactly right for the small tensors the trainer, the engines and eval build themselves
(flags, counters, metric sums); model tensors would be on the GPU there, which every backend we
project accepts. Object collectives and barriers are recorded but not checked: torch picks their
device from the group itself.

    with StrictCollectives() as strict:
        ...                                  # set up process groups, train, evaluate
    strict.assert_clean()                    # raises with every violation and its caller
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from agro_megatron import platform

_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                       "reduce_scatter", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                       "send", "recv", "isend", "irecv")
_UNCHECKED = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../agro_megatron
_TESTING = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


@dataclasses.dataclass
class Call:
    function: str
    caller: str                     # file:line of the nearest frame outside torch and this module
    our_caller: str | None          # file:line of the nearest agro_megatron frame (None: not ours)
    devices: tuple[str, ...]        # device types of the tensors passed
    backend: str                    # the group's backend on a CUDA machine
    violation: bool


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)


def _callers() -> tuple[str, str | None]:
    frame = sys._getframe(2)
    first = ours = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        here = f"{os.path.relpath(path, os.path.dirname(_PACKAGE)) if path.startswith(_PACKAGE) else path}:{frame.f_lineno}"
        if not path.startswith(_TORCH) and path != os.path.abspath(__file__):
            first = first or here
            if path.startswith(_PACKAGE) and not path.startswith(_TESTING):
                ours = here
                break
        frame = frame.f_back
    return first or "?", ours


class StrictCollectives:
    """Context manager: records torch.distributed calls (see the module docstring).

    `backend`: the default group's backend to project (default: what the platform layer uses
    with CUDA). Enter it before megatron's process groups are created, so their explicit
    backends are known; groups created earlier are taken to inherit the default.
    """

    def __init__(self, backend: str | None = None):
        self.backend = backend or platform.distributed_backend(cuda=True)
        self.calls: list[Call] = []
        self._explicit: dict[int, str] = {}
        self._saved: dict[str, object] = {}

    # -- recording -------------------------------------------------------------------------------
    def _group_backend(self, group) -> str:
        if group is None or group is dist.group.WORLD:
            return self.backend
        return self._explicit.get(id(group), self.backend)

    def _wrap(self, name, fn, checked: bool):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:  # positional group: the argument after the tensor(s) and src/dst/op
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            backend = self._group_backend(group)
            devices = tuple(t.device.type for t in _tensors(list(args) + list(kwargs.values())))
            allowed = platform.backend_device_types(backend)
            bad = checked and any(d not in allowed for d in devices)
            first, ours = _callers()
            self.calls.append(Call(name, first, ours, devices, backend, bad))
            return fn(*args, **kwargs)

        return recorded

    def _new_group(self, fn):
        def recorded(*args, **kwargs):
            group = fn(*args, **kwargs)
            backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
            if backend is not None and group is not None and not isinstance(group, int):
                self._explicit[id(group)] = str(backend)
            return group

        return recorded

    def __enter__(self) -> "StrictCollectives":
        for name in _TENSOR_COLLECTIVES + _UNCHECKED + ("new_group",):
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
        for name, fn in self._saved.items():
            wrapped = self._new_group(fn) if name == "new_group" else self._wrap(name, fn, name in _TENSOR_COLLECTIVES)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    # -- results ---------------------------------------------------------------------------------
    @property
    def violations(self) -> list[Call]:
        return [c for c in self.calls if c.violation]

    def callers(self) -> set[str]:
        """agro_megatron modules (file paths without line) that made or caused a recorded call."""
        return {c.our_caller.rsplit(":", 1)[0] for c in self.calls if c.our_caller}

    def assert_clean(self) -> None:
        bad = self.violations
        if bad:
            lines = [f"  {c.function} on {'/'.join(c.devices)} tensors, group backend {c.backend!r}: "
                     f"{c.caller} (ours: {c.our_caller})" for c in bad[:40]]
            raise AssertionError(f"{len(bad)} collective call(s) pass tensors on a device their process group "
                                 "would not accept on a CUDA machine:\n" + "\n".join(lines))
