"""Worker for the planner's ground truth: what megatron-core really allocates on each rank.

Run through `run_distributed(measure_allocations, world_size, tp=1, pp=1, args=(cases,))`; each
case re-initialises megatron's parallel state with its own TP / PP (DP = the rest), builds a tiny
Llama GPTModel, wraps it in megatron's DistributedDataParallel, builds megatron's optimizer, takes
one step (Adam creates its moments lazily) and measures the live objects:

- params: every parameter's name / numel / element size, and the bytes of the distinct storages
  behind them (with the distributed optimizer they are views of the DDP param buffer);
- grads: the distinct storages behind `param.main_grad` (the DDP grad buffers);
- optimizer: the optimizer's own tensors: fp32 master copies (storages not shared with the model)
  and every tensor in its state (exp_avg, exp_avg_sq; the scalar step counter excluded);
- owned: per buffer, the elements megatron's DistributedOptimizer assigns this DP rank
  (`DistributedOptimizer._build_gbuf_range_map`, no optimizer needed).

If megatron refuses to build the optimizer on this machine, `optimizer_error` carries the message
and the other measurements still come back.
"""
from __future__ import annotations

import torch


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def measure_allocations(cases: list[dict]) -> list[dict]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from agro_megatron import parallel
    from agro_megatron.models.llama import LlamaArch, build_model, transformer_config

    results = []
    for case in cases:
        parallel.init_model_parallel(tp=case["tp"], pp=case["pp"], seed=1234)
        arch = LlamaArch(**case["arch"])
        dtype = case["dtype"]
        config = transformer_config(arch, tp=case["tp"], pp=case["pp"], dtype=dtype)
        model = build_model(arch, config)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=case["grad_reduce_in_fp32"], use_distributed_optimizer=case["distributed_optimizer"],
            overlap_grad_reduce=case.get("bucket_size") is not None, bucket_size=case.get("bucket_size"))
        ddp = DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=model)
        params = list(ddp.module.named_parameters())
        out = {
            "case": case["name"],
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
            "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
            "params": [(n, p.numel(), p.element_size()) for n, p in params],
            "param_bytes": sum(_storages(p for _, p in params).values()),
            "grad_bytes": sum(_storages(p.main_grad for _, p in params).values()),
            "buffers": [(b.numel, b.param_data is not None) for b in ddp.buffers],
        }
        if case["distributed_optimizer"]:
            owned = []
            for buf in ddp.buffers:
                (ranges,) = DistributedOptimizer._build_gbuf_range_map(buf).values()
                owned.append(sum(m["param"].size for r in ranges for m in r["param_map"].values()))
            out["owned"] = owned
        try:
            opt = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=1e-4, bf16=dtype == "bf16",
                use_distributed_optimizer=case["distributed_optimizer"]), [ddp])
        except Exception as e:  # reported, not hidden: the test decides what it means
            out["optimizer_error"] = f"{type(e).__name__}: {e}"
        else:
            g = torch.Generator().manual_seed(0)
            for _, p in params:
                p.main_grad.copy_(torch.randn(p.main_grad.shape, generator=g))
            opt.step()
            model_ptrs = set(_storages(p for _, p in params))
            inner = getattr(opt, "chained_optimizers", [opt])
            mains, states = [], []
            for o in inner:
                for group in o.optimizer.param_groups:
                    mains += [q for q in group["params"] if q.untyped_storage().data_ptr() not in model_ptrs]
                    for q in group["params"]:
                        states += [v for v in o.optimizer.state.get(q, {}).values()
                                   if torch.is_tensor(v) and v.dim() > 0]
            out["optimizer_types"] = [type(o).__name__ for o in inner]
            out["optimizer_bytes"] = sum(_storages(mains + states).values())
            out["optimizer_numel"] = sum(q.numel() for o in inner for grp in o.optimizer.param_groups
                                         for q in grp["params"])
            del opt
        results.append(out)
        del ddp, model
    return results
