"""What a plan is asked about: model, GPUs, parallel layout, the RL step's shape, and assumptions.

Plain dataclasses; `PlanInput.validate()` raises a ValueError that names the offending option and
the fix before any formula runs.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.models.llama import LlamaArch
from agro_megatron.plan.hardware import GPU


@dataclasses.dataclass(frozen=True)
class Layout:
    """Training layout: TP x CP x DP x PP ranks over nodes x gpus_per_node GPUs."""

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int | None = None   # None: world // (tp * pp * cp)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp_size(self) -> int:
        return self.dp if self.dp is not None else self.world // (self.tp * self.pp * self.cp)

    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp_size}"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One RL step: prompts_per_step x n sequences of prompt_len + response_len tokens.

    Sequences are assumed padded to prompt_len + response_len (response_len is the generation
    cap; every response is assumed to run to it: an upper bound on work and memory).
    """

    prompts_per_step: int = 64
    n: int = 8
    prompt_len: int = 512
    response_len: int = 1024
    micro_batch: int = 1          # sequences per micro-batch per DP rank
    epochs_per_batch: int = 1     # optimizer steps per rollout batch (each over the whole batch)

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.n

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    dtype_bytes: int = 2                  # bf16 policy weights
    distributed_optimizer: bool = True    # the trainer uses megatron's DistributedOptimizer when DP > 1
    grad_reduce_in_fp32: bool = True      # fp32 main grads (Megatron-LM's default with bf16)
    overlap_grad_reduce: bool = False
    recompute: bool = False               # full activation recompute, uniform, 1 layer per group
    sequence_parallel: bool | None = None  # None: on when TP > 1
    spec: str = "te"                      # te (GPU) | local (megatron's torch spec; CPU)
    full_vocab_kl: bool = False           # kl_pg / local_kl: reference logits beside the policy's
    loss_chunk_tokens: int = 1024         # the vocab-parallel op processes tokens in chunks
    offload_train_state: bool = False     # rollout + weight sync: grads freed, optimizer state on the
                                          # host (trainer: optim.offload_train_state)
    optimizer_offload_fraction: float = 0.0  # megatron's optimizer_cpu_offload: share of the
                                             # optimizer (fp32 master + moments) kept on the host
                                             # (trainer: optim.offload_fraction; bf16 weights)
    reference_resident: bool = True       # the frozen reference stays on the GPU (same layout)

    def sp(self, tp: int) -> bool:
        return tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
    engine: str = "vllm"                  # vllm (colocated) | native (megatron's own sampler)
    tp: int | None = None                 # rollout TP (vLLM); None: the fastest that fits, <= a node
    pp: int | None = None                 # rollout PP (vLLM, large models); None: chosen with TP
    gpu_memory_utilization: float = 0.4   # vLLM's budget: weights + KV cache + its own activations
    kv_cache_gib: float | None = None     # explicit KV budget per GPU (overrides the utilization)
    sleep_level: int = 2                  # 0: never sleeps; 1: weights to host, KV freed; 2: both freed
    overhead_gib: float = 2.0             # vLLM's activation / sampler / CUDA-graph memory per GPU
    prefix_caching: bool = True           # the n samples of a prompt share its prefill
    sync_bucket_gib: float | None = None  # weight-sync staging bucket; None: the largest tensor


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of hardware peaks. These are assumptions, not measurements."""

    mfu: float = 0.45                 # training / log-prob forwards: executed FLOPs (recompute included)
                                      # / (peak * compute time); TP communication is timed separately
    prefill_mfu: float = 0.50         # rollout prefill (large GEMMs)
    decode_mfu: float = 0.50          # decode when compute-bound (large batches)
    hbm_efficiency: float = 0.70      # decode: achieved / peak HBM bandwidth
    comm_efficiency: float = 0.70     # NCCL bus bandwidth / link bandwidth
    allreduce_latency_s: float = 10e-6  # one small TP all-reduce in decode (NVLink)
    cpu_adam_elems_s: float = 0.25e9  # host Adam (optimizer offload): elements/s per GPU's share of cores
    reserve_gib: float = 2.0          # CUDA context, cuBLAS workspaces, NCCL buffers
    fragmentation: float = 0.05       # allocator fragmentation, as a fraction of allocated bytes


@dataclasses.dataclass(frozen=True)
class PlanInput:
    arch: LlamaArch
    gpu: GPU
    layout: Layout = Layout()
    work: Workload = Workload()
    train: TrainOptions = TrainOptions()
    rollout: RolloutOptions = RolloutOptions()
    eff: Efficiency = Efficiency()
    model_name: str = "custom"

    def replace(self, **kw) -> "PlanInput":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "PlanInput":
        a, L, w, r = self.arch, self.layout, self.work, self.rollout
        if L.gpus_per_node < 1 or L.nodes < 1:
            raise ValueError("--nodes and --gpus-per-node must be >= 1")
        a.check_parallel(L.tp, L.pp)
        if L.tp > L.gpus_per_node:
            raise ValueError(f"TP={L.tp} spans nodes ({L.gpus_per_node} GPUs per node): keep TP <= "
                             f"{L.gpus_per_node}; use PP across nodes")
        mp = L.tp * L.pp * L.cp
        if L.world % mp or L.dp_size * mp != L.world:
            raise ValueError(f"TP x PP x CP x DP = {L.tp}x{L.pp}x{L.cp}x{L.dp_size} != {L.world} GPUs "
                             f"({L.nodes} nodes x {L.gpus_per_node}); change --dp or the GPU count")
        if w.seq_len % L.cp:
            raise ValueError(f"prompt+response length {w.seq_len} is not divisible by CP={L.cp}")
        if w.n < 2:
            raise ValueError(f"--n {w.n}: AGRO's leave-one-out baseline needs n >= 2 responses per prompt")
        if min(w.prompts_per_step, w.prompt_len, w.response_len, w.micro_batch, w.epochs_per_batch) < 1:
            raise ValueError("prompts per step, prompt/response lengths, micro batch and epochs must be >= 1")
        if w.sequences % (w.micro_batch * L.dp_size):
            raise ValueError(
                f"{w.sequences} sequences per step ({w.prompts_per_step} prompts x n={w.n}) do not split "
                f"into micro-batches of {w.micro_batch} over DP={L.dp_size}: make prompts x n a multiple "
                f"of {w.micro_batch * L.dp_size}")
        if r.engine not in ("vllm", "native"):
            raise ValueError(f"--rollout-engine {r.engine!r}: use vllm or native")
        if r.sleep_level not in (0, 1, 2):
            raise ValueError(f"--sleep-level {r.sleep_level}: vLLM sleep levels are 0 (off), 1, 2")
        if not 0 < r.gpu_memory_utilization < 1:
            raise ValueError(f"--vllm-gpu-util {r.gpu_memory_utilization} must be in (0, 1)")
        if r.engine == "vllm" and r.tp is not None:
            rollout_tp_ok(a, r.tp, r.pp or 1, L)
        if r.engine == "vllm" and r.pp is not None and r.pp > a.num_layers:
            raise ValueError(f"--rollout-pp {r.pp} exceeds the {a.num_layers} layers")
        f = self.train.optimizer_offload_fraction
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"--optimizer-offload-fraction {f} must be in [0, 1]")
        if f > 0 and (self.train.dtype_bytes != 2 or not self.train.distributed_optimizer):
            raise ValueError(f"--optimizer-offload-fraction {f}: megatron's optimizer CPU offload needs 16-bit "
                             "weights and the distributed optimizer (drop --no-distributed-optimizer)")
        if self.train.spec not in ("te", "local"):
            raise ValueError(f"spec={self.train.spec!r}: use te or local")
        return self


def rollout_tp_ok(arch: LlamaArch, tp: int, pp: int, layout: Layout) -> None:
    """Raise naming the fix unless a vLLM engine of tp x pp GPUs tiles the job's GPUs."""
    if tp < 1 or pp < 1:
        raise ValueError("--rollout-tp / --rollout-pp must be >= 1")
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        raise ValueError(f"--rollout-tp {tp} neither divides nor is a multiple of the "
                         f"{arch.num_kv_heads} KV heads")
    if arch.num_heads % tp:
        raise ValueError(f"--rollout-tp {tp} does not divide the {arch.num_heads} attention heads")
    if tp > layout.gpus_per_node:
        raise ValueError(f"--rollout-tp {tp} > {layout.gpus_per_node} GPUs per node: use --rollout-pp across nodes")
    if layout.world % (tp * pp):
        raise ValueError(f"rollout engines of TP{tp} x PP{pp} do not tile {layout.world} GPUs")
