"""Worker functions for tests/test_offload.py (run inside gloo ranks by run_distributed).

Two trainer options, each compared with the plain optimizer on the same weights and batches:

- `optim.offload_fraction` (megatron-core's optimizer CPU offload, HybridDeviceOptimizer): the
  bf16 parameters after a few real training steps (forward, backward, DP reduction, clipping,
  Adam) against the plain distributed / mixed-precision optimizer's.
- `optim.offload_train_state` (train/offload.py): the same steps with the grad buffers freed and
  the optimizer state parked between them; parameters and optimizer state must be bit-identical,
  and while parked every optimizer storage and grad buffer must really be released.

`hybrid_optimizer_cpu_standin()` is the CPU stand-in megatron's HybridDeviceOptimizer needs (see
its docstring); it belongs in platform/cpu.py next to the other shims.
"""
from __future__ import annotations


import torch

from agro_megatron.config import JobConfig
from agro_megatron.testing.platform_checks import ARCH, _load_full

def hybrid_optimizer_cpu_standin() -> None:
    """platform/cpu.py's stand-in for megatron's HybridDeviceOptimizer split (idempotent)."""
    from agro_megatron.platform import cpu

    if not torch.cuda.is_available():
        cpu._patch_hybrid_device_optimizer()


# ---------------------------------------------------------------------------------------------
def _weights() -> dict:
    """Seeded full (TP=1) weights, the same on every rank: N(0, 0.02), norms 1 + N(0, 0.02)."""
    from agro_megatron.models.llama import build_model

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, p in build_model(ARCH, dtype="fp32", tp=1, pp=1, pre_process=True, post_process=True).named_parameters():
        noise = 0.02 * torch.randn(p.shape, generator=g)
        out[name] = noise + 1.0 if "norm" in name else noise
    return out


def _bundle(weights: dict, dtype: str, fraction: float = 0.0, train_state: bool = False,
            distributed_optimizer: bool | None = None):
    """build_policy as the trainer calls it, then identical starting weights (and masters)."""
    from agro_megatron.train.model_setup import build_policy

    cfg = JobConfig.load(None, [f"model.dtype={dtype}", f"optim.offload_fraction={fraction}",
                                f"optim.offload_train_state={str(train_state).lower()}", "optim.lr=1e-2",
                                "optim.clip_grad=1.0", "optim.weight_decay=0.01"]).validate()
    bundle = build_policy(cfg, ARCH, lr=cfg.optim.lr, total_steps=10, with_reference=False,
                          distributed_optimizer=distributed_optimizer)
    _load_full(bundle.module, weights)
    bundle.optimizer.reload_model_params()  # the masters follow the loaded weights
    return bundle


def _micro_batches(step: int):
    """A seeded batch per (step, DP rank): 4 sequences of different lengths."""
    from megatron.core import parallel_state as ps

    from agro_megatron.train.layout import make_micro_batches

    g = torch.Generator().manual_seed(1000 * step + ps.get_data_parallel_rank())
    seqs = [torch.randint(1, ARCH.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 20, 11)]
    return make_micro_batches(seqs, [3, 4, 5, 2], pad_id=0, max_tokens=48, uniform=False)


def _train_step(bundle, step: int) -> tuple[float, float]:
    """One trainer-style step: zero grads, forward/backward over the micro-batches, optimizer step."""
    from agro_megatron.ops import vocab_parallel_logprobs
    from agro_megatron.train.pipeline import run_micro_batches

    def loss_fn(logits, mb):
        st = vocab_parallel_logprobs(logits, mb.labels, compute_entropy=False, vocab_size=ARCH.vocab_size)
        loss = -(st.logprobs * mb.loss_mask).sum() / 64.0
        return loss, {"loss": loss.detach()}

    bundle.policy.zero_grad_buffer()
    bundle.optimizer.zero_grad()
    stats = run_micro_batches(bundle.policy, _micro_batches(step), loss_fn, forward_only=False)
    ok, grad_norm, _ = bundle.optimizer.step()
    assert ok
    bundle.scheduler.step(increment=1)
    return sum(float(s["loss"]) for s in stats), float(grad_norm)


def _params(bundle) -> dict:
    return {k: v.detach().clone() for k, v in bundle.module.named_parameters()}


# ---------------------------------------------------------------------------------------------
def optimizer_offload_compare(fractions: list, steps: int) -> dict:
    """Per run: the optimizer kinds, host/device split, losses, grad norms and the bf16 parameters
    after every step. Runs: "plain" (the trainer's optimizer without offload), "plain_dist" (the same
    with the distributed optimizer, which the offload needs, forced at DP=1), and each fraction."""
    from agro_megatron.train.offload import host_split, torch_optimizers

    weights = _weights()
    try:  # before the stand-in: build_policy must refuse a HybridDeviceOptimizer that split nothing
        _bundle(weights, "bf16", 0.5)
        refused = None
    except RuntimeError as e:
        refused = str(e)
    hybrid_optimizer_cpu_standin()
    runs = {"plain": (0.0, None), "plain_dist": (0.0, True), **{f: (f, None) for f in fractions}}
    out = {}
    for name, (f, dist_opt) in runs.items():
        b = _bundle(weights, "bf16", f, distributed_optimizer=dist_opt)
        kinds = sorted({type(o).__name__ for o in getattr(b.optimizer, "chained_optimizers", [b.optimizer])})
        inner = sorted({type(o).__name__ for o in torch_optimizers(b.optimizer)})
        largest = max(p.numel() for p in b.module.parameters())
        hist, params = [], []
        for s in range(steps):
            hist.append(_train_step(b, s))
            params.append(_params(b))
        out[name] = {"kinds": kinds, "inner": inner, "split": host_split(b.optimizer), "largest": largest,
                     "losses": [h[0] for h in hist], "norms": [h[1] for h in hist], "params": params}
    out["refused_without_standin"] = refused
    return out


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _planner_state(dtype: str, dist_opt: bool):
    """agro-plan's exact per-rank bytes for this model and layout (plan/params.py)."""
    from megatron.core import parallel_state as ps

    from agro_megatron.plan.params import rank_params, rank_state

    params = rank_params(ARCH, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                         ps.get_pipeline_model_parallel_rank(), dtype_bytes=2 if dtype == "bf16" else 4,
                         spec="local")
    return rank_state(params, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                      distributed_optimizer=dist_opt, grad_reduce_in_fp32=True, bucket_size=None)


def _offload_and_check(bundle, dtype: str, fraction: float, step: int) -> dict:
    """With the state resident: offload -> assert everything left the device storage -> restore ->
    assert it is back, bit for bit."""
    from megatron.core import parallel_state as ps

    from agro_megatron.train.offload import optimizer_tensors

    ts = bundle.train_state
    assert ts.enabled and not ts.offloaded
    params_before = _params(bundle)
    param_bytes = {k: _storage_bytes(p) for k, p in bundle.module.named_parameters()}
    owners = ts.optimizer_storages()
    has_state = step > 0  # torch's Adam creates its moments at the first step
    assert owners or not has_state, "no optimizer storage to park"
    state_before = [t.detach().clone() for t in optimizer_tensors(bundle.optimizer)]
    buffers = ts._buffers()
    grad_bytes = [_storage_bytes(b.grad_data) for b in buffers]
    assert buffers and all(n > 0 for n in grad_bytes)

    ts.offload()
    ts.offload()  # idempotent
    assert ts.offloaded
    assert all(_storage_bytes(t) == 0 for t in owners), "an optimizer storage stayed on the device"
    assert all(_storage_bytes(b.grad_data) == 0 for b in buffers), "a grad buffer stayed allocated"
    assert [p.owner for p in ts.parked] == owners
    assert sum(p.host.numel() for p in ts.parked) == ts.parked_bytes
    assert ts.parked_bytes > 0 or not has_state
    for p in ts.parked:  # the host copy is its own memory
        assert p.host.untyped_storage()._cdata != p.owner.untyped_storage()._cdata
    # the model's weights never move
    for k, p in bundle.module.named_parameters():
        assert _storage_bytes(p) == param_bytes[k] and torch.equal(p, params_before[k]), k
    # every optimizer tensor on the device is now either released or the model's own storage
    protected = ts._protected()
    for t in optimizer_tensors(bundle.optimizer):
        if t.device == ts.device:
            assert _storage_bytes(t) == 0 or t.untyped_storage()._cdata in protected

    ts.restore()
    ts.restore()  # idempotent
    assert not ts.offloaded and ts.host_bytes() == ts.parked_bytes  # host buffers kept for the next offload
    after = optimizer_tensors(bundle.optimizer)
    assert len(after) == len(state_before)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, state_before)), "state changed"
    assert [_storage_bytes(b.grad_data) for b in buffers] == grad_bytes
    assert all(not b.grad_data.any() for b in buffers)

    scalars = sum(_storage_bytes(t) for t in owners if t.dim() == 0)   # torch Adam's 'step' counters
    rec = {"step": step, "parked": ts.parked_bytes, "freed_grads": ts.freed_grad_bytes, "scalar_bytes": scalars,
           "owners": len(owners)}
    if fraction == 0.0:
        plan = _planner_state(dtype, dist_opt=ps.get_data_parallel_world_size() > 1)
        rec.update(plan_grads=plan.grad_bytes, plan_optimizer=plan.optimizer_bytes)
    return rec


def train_state_compare(cases: list, steps: int) -> dict:
    """Per (dtype, offload_fraction) case: the same steps without and with optim.offload_train_state,
    calling the offloader where the training loop does (a no-op when the option is off)."""
    from agro_megatron.train.offload import optimizer_tensors

    hybrid_optimizer_cpu_standin()
    weights = _weights()
    out = {}
    for dtype, fraction in cases:
        res = {}
        for offload in (False, True):
            b = _bundle(weights, dtype, fraction, train_state=offload)
            ts = b.train_state
            assert ts.enabled == offload
            hist, checks = [], []
            for s in range(steps):
                ts.offload()                      # top of the loop: the rollout runs with the state parked
                assert ts.offloaded == offload
                ts.restore()                      # after the rollout
                if offload:
                    checks.append(_offload_and_check(b, dtype, fraction, s))
                hist.append(_train_step(b, s))    # scoring and the optimizer step(s)
                ts.offload()                      # before the weight sync
                with ts.resident():               # a checkpoint save
                    assert not ts.offloaded
                assert ts.offloaded == offload
            ts.restore()
            res[offload] = {"hist": hist, "checks": checks, "params": _params(b),
                            "state": [t.detach().clone() for t in optimizer_tensors(b.optimizer)]}
        out[(dtype, fraction)] = res
    return out
