"""Per-GPU memory of an AGRO step, per pipeline stage and per phase of the step.

Policy weights / grads / optimizer states are exact (`params.py`). Everything else is an estimate
whose assumptions sit beside its formula. The step's phases and what is resident in each:

    rollout : policy state + reference + the engine awake (vLLM: weights + its whole KV budget +
              overhead; native: its KV). With --offload-train-state (trainer:
              optim.offload_train_state, train/offload.py) the grad buffers are freed (their values
              are dead between steps) and the optimizer state on the GPU is parked in host memory.
    sync    : vLLM only. As in rollout/ (issue 5) the engine wakes its weights, takes the new
              weights through a staging bucket, and only then wakes its KV cache: weights + bucket
              (sleep level 0: the KV cache never left). Train state as in rollout.
    logprob : reference and policy forward passes (no grad): one layer's working set per stage +
              the last stage's logits and the loss op's chunk temporaries + engine residue
    train   : 1F1B forward/backward: stored activations + loss buffers + engine residue

Engine residue outside rollout: sleep level 0 keeps weights + KV; levels 1 and 2 free both on the
GPU (level 1 parks the weights in host memory, counted in `host_bytes`).
The peak phase, inflated by the allocator-fragmentation fraction, plus the fixed reserve (CUDA
context, cuBLAS, NCCL) must fit the device memory.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.models.llama import padded_vocab_size
from agro_megatron.plan.engine import EngineShape, engine_shape
from agro_megatron.plan.hardware import GiB
from agro_megatron.plan.params import default_bucket_size, rank_params, rank_state
from agro_megatron.plan.spec import PlanInput

ACT_BYTES = 2  # bf16 activations


def layer_activation_bytes(inp: PlanInput, mbs: int) -> int:
    """Bytes one transformer layer saves for backward, for one micro-batch, per GPU.

    Per token (s = mbs * seq_len / CP tokens on this rank), with TP = t, bf16:
      RMSNorm inputs (2 norms) + the inputs of linear_qkv and linear_fc1     4 * 2h    (/t with SP)
      RMSNorm rstd, fp32, 2 norms                                              2 * 4     (/t with SP)
      flash-attention Q, K, V (after RoPE; RoPE's backward needs no input)   2 (nh + 2 nkv) hd / t
      attention output O (= linear_proj's input, one tensor)                 2 nh hd / t
      softmax log-sum-exp, fp32                                              4 nh / t
      fc1 output [2 ffn] (SwiGLU's input) and SwiGLU output (fc2's input)    2 * 3 ffn / t
    Flash attention stores no s x s scores; no dropout (Llama). With sequence parallelism the
    replicated tensors are split over TP (megatron saves the sharded input and re-gathers it).
    """
    a, L, t = inp.arch, inp.layout, inp.layout.tp
    s = mbs * inp.work.seq_len // L.cp
    sp = t if inp.train.sp(t) else 1
    hd, nh, nkv = a.head_dim, a.num_heads, a.num_kv_heads
    per_tok = ((4 * ACT_BYTES * a.hidden_size + 2 * 4) / sp
               + ACT_BYTES * (nh + 2 * nkv) * hd / t + ACT_BYTES * nh * hd / t + 4 * nh / t
               + ACT_BYTES * 3 * a.intermediate_size / t)
    return int(s * per_tok)


def layer_input_bytes(inp: PlanInput, mbs: int) -> int:
    """The one tensor full recompute keeps per layer: its input [s, h] (split over TP with SP)."""
    L = inp.layout
    sp = L.tp if inp.train.sp(L.tp) else 1
    return mbs * inp.work.seq_len // L.cp * inp.arch.hidden_size * ACT_BYTES // sp


def micro_batches(inp: PlanInput, mbs: int | None = None) -> int:
    """Micro-batches per DP rank per optimizer step (the whole rollout batch is one global batch)."""
    mbs = mbs or inp.work.micro_batch
    return inp.work.sequences // (mbs * inp.layout.dp_size)


def stage_activation_bytes(inp: PlanInput, pp_rank: int, mbs: int) -> int:
    """Activations held by stage `pp_rank` at its 1F1B peak.

    1F1B (non-interleaved): stage r runs min(PP - r, m) warm-up forwards before its first backward,
    so it holds that many micro-batches' activations (stage 0 the most, the last stage one).
    Without recompute each keeps every layer's saved tensors; with full recompute only each layer's
    input, plus one layer recomputed during its backward. Add one layer's worth of working memory
    for the backward in flight (activation gradients, temporaries). Pipeline send/receive buffers
    and the interleaved schedule are not modelled.
    """
    L = inp.layout
    layers = inp.arch.num_layers // L.pp
    in_flight = min(L.pp - pp_rank, micro_batches(inp, mbs))
    full = layer_activation_bytes(inp, mbs)
    if inp.train.recompute:
        stored = in_flight * layers * layer_input_bytes(inp, mbs) + full
    else:
        stored = in_flight * layers * full
    return stored + full


def logits_bytes(inp: PlanInput, mbs: int) -> int:
    """bf16 logits of one micro-batch on one TP rank: [mbs * seq / CP, V_padded / TP]."""
    L = inp.layout
    return mbs * inp.work.seq_len // L.cp * padded_vocab_size(inp.arch.vocab_size, L.tp) // L.tp * ACT_BYTES


def loss_chunk_bytes(inp: PlanInput) -> int:
    """The vocab-parallel op's fp32 temporaries for one token chunk (docs/algorithm.md §6): softmax
    probabilities, log-probabilities and the logits gradient of the chunk, [chunk, V/TP] each."""
    L = inp.layout
    return 3 * 4 * inp.train.loss_chunk_tokens * padded_vocab_size(inp.arch.vocab_size, L.tp) // L.tp


def loss_buffer_bytes(inp: PlanInput, mbs: int) -> int:
    """Last stage, training: the saved bf16 logits, their bf16 gradient (same shape), the chunk
    temporaries, and with a full-vocabulary KL (kl_pg, local_kl) the reference model's bf16 logits
    of the same micro-batch (recomputed per micro-batch: storing them for the batch is impossible)."""
    lg = logits_bytes(inp, mbs)
    return 2 * lg + loss_chunk_bytes(inp) + (lg if inp.train.full_vocab_kl else 0)


def sync_bucket_bytes(inp: PlanInput) -> int:
    """Weight-sync staging bucket: configured, or the largest HF tensor (embedding / lm_head, or an
    MLP matrix) in bf16, which the sync needs whole."""
    if inp.rollout.sync_bucket_gib is not None:
        return int(inp.rollout.sync_bucket_gib * GiB)
    a = inp.arch
    return 2 * max(a.vocab_size * a.hidden_size, a.intermediate_size * a.hidden_size)


@dataclasses.dataclass
class StageMemory:
    pp_rank: int
    weights: int
    grads: int
    optimizer: int      # on the GPU (the offloaded fraction is in host_bytes)
    optimizer_host_numel: int  # elements the host-side Adam updates (optimizer offload)
    reference: int
    activations: int
    loss_buffers: int
    engine_weights: int
    engine_kv: int
    engine_overhead: int
    sync_bucket: int
    phases: dict       # phase -> bytes resident (before fragmentation / reserve)
    parts: dict        # phase -> {component: bytes}
    peak_phase: str
    peak: int          # peak phase x (1 + fragmentation) + reserve
    capacity: int
    host_bytes: int    # per GPU, host memory the plan parks there

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        return d


_STATE_CACHE: dict = {}


def policy_state(inp: PlanInput, pp_rank: int):
    """Exact policy bytes on the busiest DP rank of stage `pp_rank` (ranks differ by padding)."""
    L, t = inp.layout, inp.train
    key = (repr(inp.arch), L.tp, L.pp, L.cp, L.dp_size, repr(t), pp_rank)
    if key in _STATE_CACHE:
        return _STATE_CACHE[key]
    params = rank_params(inp.arch, L.tp, L.pp, pp_rank, dtype_bytes=t.dtype_bytes, spec=t.spec)
    dpcp = L.dp_size * L.cp   # megatron reduces / shards over the DP x CP group
    # the trainer uses the distributed optimizer when DP x CP > 1, and always with optimizer offload
    dist = t.distributed_optimizer and (dpcp > 1 or t.optimizer_offload_fraction > 0)
    bucket = default_bucket_size(dpcp, pp_rank, t.overlap_grad_reduce)
    states = [rank_state(params, dpcp, r, distributed_optimizer=dist, grad_reduce_in_fp32=t.grad_reduce_in_fp32,
                         bucket_size=bucket) for r in (range(dpcp) if dist else [0])]
    if len(_STATE_CACHE) > 4096:
        _STATE_CACHE.clear()
    _STATE_CACHE[key] = max(states, key=lambda s: s.optimizer_bytes), params
    return _STATE_CACHE[key]


def stage_memory(inp: PlanInput, pp_rank: int, mbs: int | None = None,
                 engine: EngineShape | None = None) -> StageMemory:
    mbs = mbs or inp.work.micro_batch
    st, params = policy_state(inp, pp_rank)
    t, r, e = inp.train, inp.rollout, inp.eff
    # the frozen reference: same layout and dtype as the policy, weights only (no DDP buffers)
    ref = sum(p.numel * p.nbytes_per for p in params) if t.reference_resident else 0
    last = pp_rank == inp.layout.pp - 1
    act = stage_activation_bytes(inp, pp_rank, mbs)
    loss = loss_buffer_bytes(inp, mbs) if last else 0
    fwd = layer_activation_bytes(inp, mbs) + ((logits_bytes(inp, mbs) + loss_chunk_bytes(inp)) if last else 0)
    capacity = inp.gpu.memory_bytes
    reserve = int(e.reserve_gib * GiB)
    # megatron's optimizer_cpu_offload (trainer: optim.offload_fraction) keeps a fraction of the
    # optimizer (fp32 master + moments) on the host for the whole run (HybridDeviceOptimizer in the
    # precision-aware distributed optimizer); the rest stays on the GPU. It also keeps a pinned fp32
    # copy of those elements' grads on the host.
    f = t.optimizer_offload_fraction
    opt_gpu = int(st.optimizer_bytes * (1 - f))
    train_state = st.param_bytes + st.grad_bytes + opt_gpu
    rollout_state = st.param_bytes + (0 if t.offload_train_state else st.grad_bytes + opt_gpu)
    if engine is None:
        free = int((capacity - reserve) / (1 + e.fragmentation)) - rollout_state - ref
        engine = engine_shape(inp, free_bytes_for_native=free)
    bucket = sync_bucket_bytes(inp) if r.engine == "vllm" else 0
    state = {"weights": st.param_bytes, "grads": st.grad_bytes, "optimizer": opt_gpu, "reference": ref}
    off = {"grads": 0, "optimizer": 0} if t.offload_train_state else {}
    awake = {"engine_weights": engine.weights_per_gpu, "engine_kv": engine.kv_budget,
             "engine_overhead": engine.overhead}
    residue = awake if (r.engine == "vllm" and r.sleep_level == 0) else {}
    parts = {}
    if r.engine == "vllm":
        parts["rollout"] = {**state, **off, **awake}
        parts["sync"] = {**state, **off, **(awake if r.sleep_level == 0 else
                                             {"engine_weights": engine.weights_per_gpu}), "sync_bucket": bucket}
    else:
        parts["rollout"] = {**state, **off, "engine_kv": engine.kv_budget}
    parts["logprob"] = {**state, "activations": fwd - (logits_bytes(inp, mbs) + loss_chunk_bytes(inp) if last else 0),
                        "loss_buffers": fwd - layer_activation_bytes(inp, mbs), **residue}
    parts["train"] = {**state, "activations": act, "loss_buffers": loss, **residue}
    phases = {k: sum(v.values()) for k, v in parts.items()}
    peak_phase = max(phases, key=phases.get)
    peak = int(phases[peak_phase] * (1 + e.fragmentation)) + reserve
    host_numel = int(st.optimizer_numel * f)
    host = (opt_gpu if t.offload_train_state else 0) + (st.optimizer_bytes - opt_gpu) + 4 * host_numel + (
        engine.weights_per_gpu if (r.engine == "vllm" and r.sleep_level == 1) else 0)
    return StageMemory(pp_rank, st.param_bytes, st.grad_bytes, opt_gpu, host_numel, ref, act, loss,
                       engine.weights_per_gpu, engine.kv_budget, engine.overhead, bucket,
                       phases, parts, peak_phase, peak, capacity, host)


def memory_plan(inp: PlanInput, mbs: int | None = None, engine: EngineShape | None = None):
    """(every stage's memory, the engine). The native engine's KV is sized for the tightest stage."""
    if engine is None:
        stages = [stage_memory(inp, s, mbs) for s in range(inp.layout.pp)]
        if inp.rollout.engine == "native":
            # one KV size for all replicas' stages: the smallest any stage can afford
            e = inp.eff
            usable = int((inp.gpu.memory_bytes - e.reserve_gib * GiB) / (1 + e.fragmentation))
            free = min(usable - (m.weights + m.reference + (0 if inp.train.offload_train_state
                                                          else m.grads + m.optimizer)) for m in stages)
            engine = engine_shape(inp, free_bytes_for_native=free)
        else:
            engine = engine_shape(inp)
    return [stage_memory(inp, s, mbs, engine) for s in range(inp.layout.pp)], engine


def largest_micro_batch(inp: PlanInput, engine: EngineShape | None = None) -> int:
    """The largest micro batch (sequences) that fits on every stage and divides the per-DP batch;
    0 if even 1 does not fit."""
    per_dp = inp.work.sequences // inp.layout.dp_size
    best = 0
    for mbs in sorted(d for d in range(1, per_dp + 1) if per_dp % d == 0):
        stages, _ = memory_plan(inp, mbs, engine)
        if all(s.fits for s in stages):
            best = mbs
        else:
            break  # memory grows with the micro batch
    return best
