"""Accelerator descriptions the planner's formulas read: memory, peak bf16 FLOP/s, bandwidths.

Every number is a parameter (`GPU` is a plain dataclass; the CLI overrides any field). The presets
are datasheet values for the SXM parts in 8-GPU HGX/DGX nodes; the memory figure is what the
driver exposes (nvidia-smi's total), not the nameplate. Achieved fractions of these peaks are
*not* here: they are the efficiency assumptions in `spec.Efficiency`, next to the formulas that
use them.

A *measured* profile (kind "cpu": one process of a CPU host, as the trainer runs on gloo) is the
other kind: its numbers are what microbenchmarks achieved on that machine (benchmarks/
planner_calibration.py writes one as JSON; `load_profile` / `get_gpu("path.json")` read it), so
the planner uses them with efficiency 1 and times every kernel from them (`plan/kernels.py`):
matmuls from a table of measured (m, k, n) -> FLOP/s, elementwise work from the copy bandwidth,
collectives from the measured gloo all-reduce latency and bandwidth, and every framework op's
fixed host cost from `op_overhead_s`. Why: at the shapes of small models a matmul runs far below
the large-matrix peak, and a roofline over the peak is off by integer factors.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math

GiB = 1024 ** 3
GB = 1e9
PROFILE_KINDS = ("gpu", "cpu")


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
    # -- measured profiles only (kind "cpu"); GPU presets keep the defaults and the roofline ------
    kind: str = "gpu"           # gpu (datasheet peaks x spec.Efficiency) | cpu (measured, plan/kernels.py)
    matmul_table: tuple = ()    # measured ((m, k, n, FLOP/s), ...) of one [m, k] x [k, n] matmul
    copy_table: tuple = ()      # measured ((tensor bytes, bytes moved per s), ...) of a copy; empty: hbm_bytes_s
    op_overhead_s: float = 0.0  # fixed host time of one framework op (Python + dispatch), s
    allreduce_latency_s: float = 0.0  # one small all-reduce between two ranks (gloo), s

    def __post_init__(self):
        if self.kind not in PROFILE_KINDS:
            raise ValueError(f"GPU {self.name!r}: kind={self.kind!r}; use one of {', '.join(PROFILE_KINDS)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "kind", "matmul_table", "copy_table", "op_overhead_s", "allreduce_latency_s"):
                continue
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"GPU {self.name!r}: {f.name}={v!r} must be a positive number")
        if self.op_overhead_s < 0 or self.allreduce_latency_s < 0:
            raise ValueError(f"GPU {self.name!r}: op_overhead_s / allreduce_latency_s must be >= 0")
        table = tuple(tuple(float(x) for x in row) for row in self.matmul_table)
        if any(len(r) != 4 or min(r) <= 0 for r in table):
            raise ValueError(f"GPU {self.name!r}: matmul_table rows must be four positive numbers (m, k, n, flop/s)")
        object.__setattr__(self, "matmul_table", table)
        copy = tuple(sorted(tuple(float(x) for x in row) for row in self.copy_table))
        if any(len(r) != 2 or min(r) <= 0 for r in copy):
            raise ValueError(f"GPU {self.name!r}: copy_table rows must be two positive numbers (bytes, bytes/s)")
        object.__setattr__(self, "copy_table", copy)
        if self.kind == "cpu" and not table:
            raise ValueError(f"profile {self.name!r}: a cpu profile needs its measured matmul_table")

    @property
    def measured(self) -> bool:
        """True for a measured profile: its rates are achieved ones (efficiency 1, plan/kernels.py)."""
        return self.kind == "cpu"

    def copy_s(self, nbytes: float, working_set: float) -> float:
        """Seconds to move `nbytes` (reads + writes) in passes over tensors of `working_set` bytes:
        the measured copy rate at that size (log-log interpolation, clamped to the measured sizes;
        small tensors stay in cache), or `hbm_bytes_s` without a table."""
        if not self.copy_table:
            return nbytes / self.hbm_bytes_s
        sizes = [r[0] for r in self.copy_table]
        x = min(max(working_set, sizes[0]), sizes[-1])
        j = min(max(bisect.bisect_right(sizes, x) - 1, 0), max(len(sizes) - 2, 0))
        (s0, r0), (s1, r1) = self.copy_table[j], self.copy_table[min(j + 1, len(sizes) - 1)]
        w = 0.0 if s1 == s0 else (math.log(x) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return nbytes / math.exp(math.log(r0) * (1 - w) + math.log(r1) * w)

    def matmul_s(self, m: float, k: float, n: float) -> float:
        """Seconds of one [m, k] x [k, n] matmul on a measured profile.

        The table's achieved FLOP/s is interpolated bilinearly in (log m, log sqrt(k n)) over the
        measured grid and held constant outside it (a larger matmul is assumed no faster than the
        largest measured one). Not a fit: the rates are the microbenchmark's, point by point.
        """
        if m <= 0 or k <= 0 or n <= 0:
            return 0.0
        return 2.0 * m * k * n / _interpolate_rate(self.matmul_table, m, math.sqrt(k * n))

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


def _interpolate_rate(table: tuple, m: float, s: float) -> float:
    """FLOP/s at (m, s = sqrt(k n)) from the measured rows, bilinear in log space on the grid the
    rows span (every (m, s) grid pair must be measured); clamped to the grid's edges."""
    ms = sorted({r[0] for r in table})
    ss = sorted({r[1] * r[2] for r in table})
    rate = {(r[0], r[1] * r[2]): r[3] for r in table}
    ss = [math.sqrt(x) for x in ss]
    rate = {(a, math.sqrt(b)): v for (a, b), v in rate.items()}

    def bracket(grid, x):
        x = min(max(x, grid[0]), grid[-1])
        j = min(max(bisect.bisect_right(grid, x) - 1, 0), max(len(grid) - 2, 0))
        lo, hi = grid[j], grid[min(j + 1, len(grid) - 1)]
        w = 0.0 if hi == lo else (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return lo, hi, w

    m0, m1, wm = bracket(ms, m)
    s0, s1, ws = bracket(ss, s)
    try:
        corners = [rate[(m0, s0)], rate[(m0, s1)], rate[(m1, s0)], rate[(m1, s1)]]
    except KeyError as e:
        raise ValueError(f"matmul_table is not a full grid: no measurement at (m, sqrt(k n)) = {e.args[0]}; "
                         "measure every (m, size) pair (benchmarks/planner_calibration.py does)") from None
    lg = [math.log(c) for c in corners]
    low = lg[0] * (1 - ws) + lg[1] * ws
    high = lg[2] * (1 - ws) + lg[3] * ws
    return math.exp(low * (1 - wm) + high * wm)


class ProfileError(ValueError):
    """A hardware profile file that cannot be used; the message names the file, the key and the fix."""


def load_profile(path: str) -> GPU:
    """A measured (or hand-written) hardware profile from JSON: the `GPU` fields by name.

    Unknown or missing keys, and values the dataclass rejects, raise ProfileError naming the file.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"hardware profile {path}: cannot read it as JSON ({e}); write one with "
                           "benchmarks/planner_calibration.py --profile-out PATH") from None
    if not isinstance(data, dict):
        raise ProfileError(f"hardware profile {path}: expected a JSON object of GPU fields")
    names = {f.name for f in dataclasses.fields(GPU)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ProfileError(f"hardware profile {path}: unknown key(s) {', '.join(unknown)}; valid keys: "
                           f"{', '.join(sorted(names))}")
    required = [f.name for f in dataclasses.fields(GPU) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ProfileError(f"hardware profile {path}: missing key(s) {', '.join(missing)}")
    for key in ("matmul_table", "copy_table"):
        if key in data:
            data[key] = tuple(tuple(r) for r in data[key])
    try:
        return GPU(**data)
    except (TypeError, ValueError) as e:
        raise ProfileError(f"hardware profile {path}: {e}") from None


def save_profile(gpu: GPU, path: str) -> str:
    """Write `gpu` as JSON that `load_profile` reads back to an equal GPU."""
    d = gpu.to_dict()
    d["matmul_table"] = [list(r) for r in gpu.matmul_table]
    d["copy_table"] = [list(r) for r in gpu.copy_table]
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    return path


def get_gpu(name: str) -> GPU:
    """A preset by name (case-insensitive), or a profile file (a path ending in .json)."""
    if name.strip().lower().endswith(".json"):
        return load_profile(name.strip())
    key = name.strip().upper()
    if key not in GPU_PRESETS:
        raise ValueError(f"unknown GPU {name!r}; presets are {', '.join(GPU_PRESETS)}, or a measured profile "
                         "file (*.json) (or override its fields: --gpu-memory-gib, --gpu-tflops, ...)")
    return GPU_PRESETS[key]
