"""Accelerator descriptions the planner's formulas read: memory, peak bf16 FLOP/s, bandwidths.

Every number is a parameter (`GPU` is a plain dataclass; the CLI overrides any field). The presets
are datasheet values for the SXM parts in 8-GPU HGX/DGX nodes; the memory figure is what the
driver exposes (nvidia-smi's total), not the nameplate. Achieved fractions of these peaks are
*not* here: they are the efficiency assumptions in `spec.Efficiency`, next to the formulas that
use them.
"""
from __future__ import annotations

import dataclasses

GiB = 1024 ** 3
GB = 1e9


@dataclasses.dataclass(frozen=True)
class GPU:
    """One accelerator and the links around it (all bandwidths per GPU, per direction)."""

    name: str
    memory_bytes: int           # device memory visible to CUDA (nvidia-smi total)
    bf16_flops: float           # dense bf16 tensor-core peak, FLOP/s (no 2:4 sparsity)
    hbm_bytes_s: float          # HBM bandwidth, bytes/s
    intra_node_bytes_s: float   # NVLink/NVSwitch bandwidth per GPU per direction, bytes/s
    inter_node_bytes_s: float   # network (InfiniBand/RoCE NIC) bandwidth per GPU per direction, bytes/s
    host_bytes_s: float         # host <-> device copy bandwidth (PCIe) per GPU per direction, bytes/s
    gpus_per_node: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"GPU {self.name!r}: {f.name}={v!r} must be a positive number")

    def with_overrides(self, **kw) -> "GPU":
        """A copy with the given fields replaced (None values ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet sources: NVIDIA H100 / H200 / HGX B200 product briefs. NVLink 4/5 are quoted as total
# bidirectional bandwidth (900 GB/s, 1.8 TB/s): per direction is half. Nodes assumed to carry one
# 400 Gb/s NIC per GPU (ConnectX-7, DGX H100/H200/B200) = 50 GB/s. PCIe Gen5 x16 = 64 GB/s.
GPU_PRESETS: dict[str, GPU] = {
    "H100": GPU("H100", memory_bytes=81559 * 1024 ** 2, bf16_flops=989e12, hbm_bytes_s=3.35e12,
                intra_node_bytes_s=450 * GB, inter_node_bytes_s=50 * GB, host_bytes_s=64 * GB),
    "H200": GPU("H200", memory_bytes=143771 * 1024 ** 2, bf16_flops=989e12, hbm_bytes_s=4.8e12,
                intra_node_bytes_s=450 * GB, inter_node_bytes_s=50 * GB, host_bytes_s=64 * GB),
    "B200": GPU("B200", memory_bytes=183359 * 1024 ** 2, bf16_flops=2.25e15, hbm_bytes_s=7.7e12,
                intra_node_bytes_s=900 * GB, inter_node_bytes_s=50 * GB, host_bytes_s=64 * GB),
}


def get_gpu(name: str) -> GPU:
    """A preset by name (case-insensitive)."""
    key = name.strip().upper()
    if key not in GPU_PRESETS:
        raise ValueError(f"unknown GPU {name!r}; presets are {', '.join(GPU_PRESETS)} "
                         "(or override its fields: --gpu-memory-gib, --gpu-tflops, ...)")
    return GPU_PRESETS[key]
