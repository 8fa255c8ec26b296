"""megatron-core on CPU processes (gloo). The only module that knows megatron was written for CUDA.

megatron-core 0.16 assumes CUDA in six ways; each gets one shim, applied only when CUDA is absent:

1. `torch.cuda.*` calls (current_device, streams, events, synchronize, nvtx, RNG state). We replace
   those attributes of `torch.cuda` with CPU equivalents: streams/events become no-ops (CPU work is
   synchronous), the RNG functions act on the CPU generator. This also makes megatron's
   `CudaRNGStatesTracker` and `model_parallel_cuda_manual_seed` seed the CPU generator, which they
   otherwise never touch. `torch.cuda.is_available()` stays False so other libraries are unaffected.
2. Literal `device="cuda"` / `pin_memory=True` in megatron's own modules (causal mask, schedules,
   optimizer, grad scaler, clip_grads, checkpoint exchange). Each loaded `megatron.core.*` module gets a
   thin proxy of `torch` as its module-global `torch`, whose tensor factories map the device to CPU.
   The proxy is scoped to megatron's modules; the rest of the process sees the real `torch`.
3. `Tensor.cuda()` / `Tensor.pin_memory()` return the tensor itself on CPU, and `param.type()`
   called from megatron's optimizer modules reports the 'torch.cuda.*Tensor' names their dtype
   checks expect (bf16 and distributed optimizers refuse CPU tensors otherwise).
4. megatron's private `_get/_set_cuda_rng_state` act on the CPU generator.
5. `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'`; we install an
   equivalent that scales the grads in place without the device assertion.
6. dist_checkpointing's writer gets its results queue from a "spawn" multiprocessing Manager (fork
   is unsafe once CUDA is initialised): a server process, a fresh interpreter that re-imports the
   main module (~3 s at the first save of every process, and left behind when a rank is killed).
   Our saves are synchronous: the forked writers hand their results to the saving process, which
   puts them on this queue and reads them back itself. So without CUDA a thread queue does
   (a multiprocessing.Queue does not: its put returns before a background thread has written the
   item, and the immediate get_nowait lost that race now and then).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

CPU = torch.device("cpu")


def _import_cuda_bound_modules() -> None:
    """Import the megatron modules whose literal "cuda" devices must be rewritten, before proxying,
    so the proxy reaches them. Others loaded later are covered by `proxy_loaded_megatron_modules()`
    at each apply. (megatron-core is pinned to 0.16.1, which has all of them.)"""
    import megatron.core.dist_checkpointing.exchange_utils  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.state_dict_saver  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.distributed.distributed_data_parallel  # noqa: F401
    import megatron.core.distributed.param_and_grad_buffer  # noqa: F401
    import megatron.core.inference.contexts.static_context  # noqa: F401
    import megatron.core.models.common.embeddings.rotary_pos_embedding  # noqa: F401
    import megatron.core.models.common.language_module.language_module  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.optimizer.clip_grads  # noqa: F401
    import megatron.core.optimizer.distrib_optimizer  # noqa: F401
    import megatron.core.optimizer.grad_scaler  # noqa: F401
    import megatron.core.optimizer.optimizer  # noqa: F401
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.pipeline_parallel.p2p_communication  # noqa: F401
    import megatron.core.pipeline_parallel.schedules  # noqa: F401
    import megatron.core.pipeline_parallel.utils  # noqa: F401
    import megatron.core.tensor_parallel.cross_entropy  # noqa: F401
    import megatron.core.tensor_parallel.data  # noqa: F401
    import megatron.core.tensor_parallel.layers  # noqa: F401
    import megatron.core.tensor_parallel.mappings  # noqa: F401
    import megatron.core.tensor_parallel.random  # noqa: F401
    import megatron.core.transformer.utils  # noqa: F401
    import megatron.core.utils  # noqa: F401


# ---------------------------------------------------------------------------------------------
# 1. torch.cuda stand-ins
# ---------------------------------------------------------------------------------------------
class _NoOpStream:
    """A CUDA stream on a device where every op completes before the call returns."""

    def __init__(self, *args, **kwargs):
        self.device = CPU

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        import time

        self._t = None
        self._clock = time.perf_counter

    def record(self, stream=None):
        self._t = self._clock()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end) -> float:
        return 1000.0 * ((end._t or 0.0) - (self._t or 0.0))


def _noop(*args, **kwargs):
    return None


def _distinct(fn, name):
    if isinstance(fn, type):
        return fn

    def shim(*args, **kwargs):
        return fn(*args, **kwargs)

    shim.__name__ = shim.__qualname__ = f"cpu_{name}"
    return shim


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    replacements = {
        "current_device": lambda: "cpu",
        "set_device": _noop,
        "synchronize": _noop,
        "empty_cache": _noop,
        "Stream": _NoOpStream,
        "ExternalStream": _NoOpStream,
        "Event": _NoOpEvent,
        "current_stream": lambda *a, **k: _NoOpStream(),
        "default_stream": lambda *a, **k: _NoOpStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": _noop,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "memory_stats": lambda *a, **k: {},
        "reset_peak_memory_stats": _noop,
    }
    for name, fn in replacements.items():
        # A distinct function object per name: torch._dynamo indexes torch.cuda's functions and
        # rejects one object registered under two names.
        setattr(cuda, name, _distinct(fn, name))
    nvtx = types.SimpleNamespace(range_push=_distinct(_noop, "range_push"),
                                 range_pop=_distinct(_noop, "range_pop"),
                                 mark=_distinct(_noop, "mark"),
                                 range=lambda *a, **k: contextlib.nullcontext())
    cuda.nvtx = nvtx


# ---------------------------------------------------------------------------------------------
# 2. module-scoped torch proxy that maps device="cuda" to the CPU
# ---------------------------------------------------------------------------------------------
_FACTORIES = frozenset({
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "empty_strided", "scalar_tensor",
})


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


class _CpuAutocast(torch.autocast):
    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class _TorchOnCpu(types.ModuleType):
    """Looks like `torch`; tensor factories put "cuda" tensors on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _cpu_factory(attr)
        elif name == "autocast":
            attr = _CpuAutocast
        setattr(self, name, attr)  # cache: later lookups are plain attribute reads
        return attr


_PROXY = _TorchOnCpu()


def proxy_loaded_megatron_modules() -> int:
    """Point every loaded megatron.core module's global `torch` at the CPU proxy."""
    count = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("megatron.core") or mod is None:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = _PROXY
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# 3-4. tensor methods and clip_grads
# ---------------------------------------------------------------------------------------------
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale grads so their global norm is at most max_norm (megatron semantics, any device)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            g.detach().mul_(clip_coeff)


_ORIGINAL_TYPE = torch.Tensor.type


def _type_as_seen_by_megatron_optimizer(self, dtype=None, non_blocking=False, **kwargs):
    """`param.type()` for megatron's optimizers, which accept only 'torch.cuda.*Tensor' names.

    Only a no-argument call from a megatron.core.optimizer module sees the CUDA name; every other
    caller gets torch's own answer.
    """
    if dtype is None and not kwargs and not self.is_cuda:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core.optimizer"):
            name = _ORIGINAL_TYPE(self)
            return "torch.cuda." + name[len("torch."):]
    if dtype is None and not kwargs:
        return _ORIGINAL_TYPE(self)
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


def _patch_tensor_methods() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.type = _type_as_seen_by_megatron_optimizer


def _patch_megatron_rng() -> None:
    """megatron's RNG tracker reads/writes CUDA generator state directly: use the CPU generator."""
    import megatron.core.tensor_parallel.random as rnd

    rnd._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    torch.cuda.random.manual_seed = torch.cuda.manual_seed


def _patch_clip_grads() -> None:
    import megatron.core.optimizer.clip_grads
    import megatron.core.optimizer.optimizer

    for mod in (megatron.core.optimizer.clip_grads, megatron.core.optimizer.optimizer):
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32


def _in_process_checkpoint_results_queue() -> None:
    import queue

    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs

    if getattr(fs, "_results_queue", "absent") is None:  # not created yet (and the attribute exists)
        fs._results_queue = queue.Queue()


def _patch_hybrid_device_optimizer() -> None:
    """megatron's HybridDeviceOptimizer on CPU processes (idempotent; a no-op with CUDA).

    `HybridDeviceOptimizer._get_sub_optimizer_param_groups` splits its parameters by
    `param.is_cuda`: the first `offload_fraction` of the device parameters get host copies
    (`param.detach().clone().cpu().pin_memory()`, then `.float()`), which a host AdamW updates and
    copies back after each step; the rest (as fp32 `.clone().float()` masters of bf16 shards) stay
    with the device Adam. On CPU nothing is_cuda: it finds no device parameter, puts every one in a
    host group without a device twin, and its first step fails with a KeyError
    (hybrid_optimizer.py:101). While that method runs (and only then), the tensors handed to the
    optimizer count as device tensors, the copies it makes with `.cpu()` / `.pin_memory()` count as
    host tensors, and `.clone()` / `.detach()` / `.float()` of a host tensor stay host tensors.
    Nothing else reads `is_cuda` in that module, so the split is the one a GPU would get.
    """
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer as cls

    original = cls._get_sub_optimizer_param_groups
    if getattr(original, "_agro_cpu_standin", False):
        return
    T, base = torch.Tensor, torch._C.TensorBase

    def split(self, offload_fraction):
        host: set[int] = set()
        made: list[torch.Tensor] = []   # keeps the host copies alive, so their ids stay theirs

        def host_copy(real):
            def method(t, *args, **kwargs):
                out = real(t, *args, **kwargs)
                host.add(id(out))
                made.append(out)
                return out
            return method

        def follows(name):
            def method(t, *args, **kwargs):
                out = getattr(base, name)(t, *args, **kwargs)
                if id(t) in host:
                    host.add(id(out))
                    made.append(out)
                return out
            return method

        patch = {"is_cuda": property(lambda t: id(t) not in host),
                 "cpu": host_copy(base.cpu), "pin_memory": host_copy(lambda t, *a, **k: t),  # no pinning without CUDA
                 "clone": follows("clone"), "detach": follows("detach"), "float": follows("float")}
        saved = {name: T.__dict__[name] for name in patch if name in T.__dict__}
        for name, value in patch.items():
            setattr(T, name, value)
        try:
            return original(self, offload_fraction)
        finally:
            for name in patch:
                if name in saved:
                    setattr(T, name, saved[name])
                else:
                    delattr(T, name)

    split._agro_cpu_standin = True
    cls._get_sub_optimizer_param_groups = split


def apply() -> None:
    """Install every shim. Call before building megatron models (idempotent)."""
    _patch_torch_cuda()
    _patch_tensor_methods()
    _import_cuda_bound_modules()
    _patch_clip_grads()
    _patch_megatron_rng()
    _in_process_checkpoint_results_queue()
    _patch_hybrid_device_optimizer()
    proxy_loaded_megatron_modules()
