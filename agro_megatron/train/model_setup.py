"""Policy (DDP-wrapped, with optimizer and LR schedule) and frozen reference, for this rank's stage.

megatron-core pieces used as designed: DistributedDataParallel (grad buffers, DP all-reduce;
DistributedOptimizer when DP > 1), get_megatron_optimizer (torch AdamW without apex/TE),
OptimizerParamScheduler, finalize_model_grads (DP reduction and tied-embedding sync across PP).
"""
from __future__ import annotations

import dataclasses

import torch

from agro_megatron.config import JobConfig
from agro_megatron.models.llama import LlamaArch, build_model


@dataclasses.dataclass
class PolicyBundle:
    arch: LlamaArch
    policy: torch.nn.Module          # megatron DDP wrapper around this rank's GPTModel stage
    reference: torch.nn.Module | None
    optimizer: object
    scheduler: object

    @property
    def module(self) -> torch.nn.Module:
        """The bare GPTModel stage (what engines and checkpoints read)."""
        return self.policy.module


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
    t = m.tiny
    return LlamaArch(vocab_size=vocab_size, hidden_size=t["hidden_size"],
                     intermediate_size=t["intermediate_size"], num_layers=t["num_layers"],
                     num_heads=t["num_heads"], num_kv_heads=t["num_kv_heads"], head_dim=t["head_dim"],
                     rope_theta=t.get("rope_theta", 500000.0),
                     max_position_embeddings=t.get("max_position_embeddings", 1024),
                     tie_word_embeddings=t.get("tie_word_embeddings", False))


def build_policy(cfg: JobConfig, arch: LlamaArch, *, lr: float, total_steps: int,
                 with_reference: bool) -> PolicyBundle:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dp = ps.get_data_parallel_world_size()
    model = build_model(arch, dtype=cfg.model.dtype)
    bf16 = cfg.model.dtype == "bf16"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dp > 1,
        check_for_nan_in_grad=False, bucket_size=None)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, bf16=bf16, params_dtype=model.config.params_dtype,
        use_distributed_optimizer=dp > 1)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
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
    return PolicyBundle(arch, ddp, reference, optimizer, scheduler)


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
