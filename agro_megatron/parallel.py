"""Process groups: torch.distributed from the launcher's environment + megatron parallel state.

torchrun, Slurm's srun and our test harness all export RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT (Slurm's SLURM_* names are mapped when torchrun's are absent). The backend is
nccl with CUDA, gloo without.
"""
from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from agro_megatron import platform


def _env_from_slurm() -> None:
    """Map srun's per-task variables to torch.distributed's when launched without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise the default process group (a 1-process group when not launched distributed)."""
    if dist.is_initialized():
        return
    _env_from_slurm()
    if "RANK" not in os.environ:  # plain `python ...`: a world of one
        from agro_megatron.testing.distributed import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = backend or platform.distributed_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, via megatron's tracker, the TP-aware CUDA/CPU RNG)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234,
                        virtual_pp: int | None = None) -> None:
    """Initialise megatron-core's parallel state (TP x PP x CP x DP over the world)."""
    platform.apply()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tp}x{pp}x{cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the parallel sizes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, virtual_pipeline_model_parallel_size=virtual_pp,
    )
    seed_everything(seed)
    # Same seed on every rank: with use_cpu_initialization megatron builds the full master
    # weight and slices it, so TP/PP layouts get identical weights to TP=1.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
