"""Policy (DDP-wrapped, with optimizer and LR schedule) and frozen reference, for this rank's stage.

megatron-core pieces used as designed: DistributedDataParallel (grad buffers, DP all-reduce;
DistributedOptimizer when DP > 1), get_megatron_optimizer (torch AdamW without apex/TE),
OptimizerParamScheduler, finalize_model_grads (DP reduction and tied-embedding sync across PP).
`optim.offload_fraction` turns on megatron's optimizer CPU offload (HybridDeviceOptimizer);
`optim.offload_train_state` gives the bundle a working `train_state` (train/offload.py).
"""
from __future__ import annotations

import dataclasses

import torch

from agro_megatron.config import TINY_OPTIONAL, JobConfig
from agro_megatron.models import unwrap_model
from agro_megatron.models.llama import LlamaArch, build_model


@dataclasses.dataclass
class PolicyBundle:
    arch: LlamaArch
    policy: torch.nn.Module          # megatron DDP wrapper around this rank's GPTModel stage
    reference: torch.nn.Module | None
    optimizer: object
    scheduler: object
    train_state: object = None       # train/offload.TrainStateOffload (a no-op unless optim.offload_train_state)

    @property
    def module(self) -> torch.nn.Module:
        """The bare GPTModel stage (what engines and checkpoints read)."""
        return unwrap_model(self.policy)

    def optimizer_step(self, model: torch.nn.Module, micro_batches: list, loss_fn, *, paired: bool = False,
                       fused_output: bool = False) -> dict:
        """One optimizer step on the summed loss of `micro_batches` (forward and backward through
        megatron's schedule with `model`: the policy, or the policy+reference pair). `fused_output`:
        loss_fn gets hidden states and output weights instead of logits (train/pipeline.py).

        A non-finite loss on any rank skips the step on every rank (nothing is applied). Returns
        {"loss", "grad_norm", "skipped"}; the loss is the last pipeline stage's (0 elsewhere).
        """
        import math

        import torch.distributed as dist

        from agro_megatron.train.pipeline import run_micro_batches

        self.policy.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = run_micro_batches(model, micro_batches, loss_fn, forward_only=False, paired=paired,
                                  fused_output=fused_output)
        loss = sum(float(s["loss"]) for s in stats) if stats else 0.0
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.optimizer.zero_grad()
            return {"loss": float("nan"), "skipped": 1.0}
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": 0.0 if ok else 1.0}


def arch_for_job(cfg: JobConfig, vocab_size: int | None = None) -> LlamaArch:
    """The model's architecture: from the checkpoint's HF config, or the tiny demo shape."""
    m = cfg.model
    if m.megatron_checkpoint:
        from agro_megatron.checkpoint.convert import checkpoint_arch

        return checkpoint_arch(m.megatron_checkpoint)
    if m.hf_checkpoint:
        return LlamaArch.from_hf_config(m.hf_checkpoint)
    if vocab_size is None:
        raise ValueError("the tiny model needs the tokenizer's vocab size")
    # exactly config.TINY_REQUIRED and TINY_OPTIONAL (validate rejects any other key)
    return LlamaArch(vocab_size=vocab_size, **{**TINY_OPTIONAL, **m.tiny})


def build_policy(cfg: JobConfig, arch: LlamaArch, *, lr: float, total_steps: int,
                 with_reference: bool, distributed_optimizer: bool | None = None) -> PolicyBundle:
    """DDP-wrapped policy stage + megatron optimizer + LR schedule (+ reference).

    distributed_optimizer: None = megatron's DistributedOptimizer when DP > 1 or with
    optim.offload_fraction > 0 (which needs it), else Float16/FP32Optimizer; True forces it at DP=1.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from agro_megatron.train.offload import TrainStateOffload

    dp = ps.get_data_parallel_world_size()
    model = build_model(arch, dtype=cfg.model.dtype)
    bf16 = cfg.model.dtype == "bf16"
    o = cfg.optim
    cpu_offload = o.offload_fraction > 0
    # megatron's optimizer CPU offload runs inside the precision-aware distributed optimizer (as
    # Megatron-LM requires), which is fine at DP=1 too (one shard)
    dist_opt = (dp > 1 or cpu_offload) if distributed_optimizer is None else distributed_optimizer
    if cpu_offload and not dist_opt:
        raise ValueError("optim.offload_fraction > 0 needs the distributed optimizer")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt,
        check_for_nan_in_grad=False, bucket_size=None)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_kwargs = dict(
        optimizer="adam", lr=lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, bf16=bf16, params_dtype=model.config.params_dtype,
        use_distributed_optimizer=dist_opt)
    if cpu_offload:
        if not bf16:
            raise ValueError("optim.offload_fraction > 0 needs model.dtype=bf16")
        opt_config = _cpu_offload_optimizer_config(opt_kwargs, o.offload_fraction)
    else:
        from megatron.core.optimizer import OptimizerConfig

        opt_config = OptimizerConfig(**opt_kwargs)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    if cpu_offload:
        _check_host_split(optimizer, o.offload_fraction)
    decay = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[o.schedule]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else lr, max_lr=lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style=decay, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    reference = build_reference(cfg, arch, model) if with_reference else None
    train_state = TrainStateOffload(ddp, optimizer, enabled=o.offload_train_state)
    return PolicyBundle(arch, ddp, reference, optimizer, scheduler, train_state)


def _cpu_offload_optimizer_config(kwargs: dict, fraction: float):
    """OptimizerConfig for megatron's optimizer CPU offload, configured as Megatron-LM does
    (--optimizer-cpu-offload needs --use-precision-aware-optimizer, which needs the distributed
    optimizer): the HybridDeviceOptimizer then holds the fp32 masters itself, so the offloaded share
    of masters + Adam moments exists only on the host. Not overlapped with the copies
    (overlap_cpu_optimizer_d2h_h2d=False), as agro-plan times it.

    megatron-core 0.16.1's OptimizerConfig.__post_init__ calls is_te_min_version("2.1.0") for any
    precision-aware config, which raises TypeError without Transformer Engine (utils.py:348, None >=
    Version) just before its CPU-offload branch returns without using TE. Without TE we build the
    config without the flag and apply that branch's two effects ourselves.
    """
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.utils import get_te_version

    kw = dict(kwargs, optimizer_cpu_offload=True, optimizer_offload_fraction=fraction,
              use_precision_aware_optimizer=True, store_param_remainders=False,
              overlap_cpu_optimizer_d2h_h2d=False)
    try:
        have_te = get_te_version() is not None
    except Exception:
        have_te = False
    if have_te:
        return OptimizerConfig(**kw)
    cfg = OptimizerConfig(**dict(kw, use_precision_aware_optimizer=False))
    cfg.use_precision_aware_optimizer = True
    cfg.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True  # what __post_init__ sets with cpu offload
    return cfg


def _check_host_split(optimizer, fraction: float) -> None:
    """megatron's HybridDeviceOptimizer chooses what goes to the host by `param.is_cuda`. If it saw
    no device parameter (a CPU process without platform.cpu's stand-in for it) it has split
    nothing and would fail at the first step; say so now."""
    from agro_megatron.train.offload import host_split

    split = host_split(optimizer)
    if split is None:
        raise RuntimeError("optim.offload_fraction > 0 but megatron built no HybridDeviceOptimizer")
    host, device, copies = split
    if host + device > 0 and copies == 0:
        raise RuntimeError(
            f"optim.offload_fraction={fraction}: megatron's HybridDeviceOptimizer found no accelerator "
            "parameters to offload (it splits by param.is_cuda); on a CPU-only process this needs the "
            "platform.cpu stand-in for it. Set optim.offload_fraction=0 on CPU.")


def build_reference(cfg: JobConfig, arch: LlamaArch, policy_module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the policy's current weights (call before any RL update)."""
    ref = build_model(arch, dtype=cfg.model.dtype)
    ref.load_state_dict(policy_module.state_dict(), strict=True)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref.eval()
    return ref


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        for (name, p), (_, q) in zip(dst.named_parameters(), src.named_parameters()):
            p.copy_(q)
