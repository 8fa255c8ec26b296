"""Step time of one AGRO RL step, split into its parts, and the resulting tokens/s/GPU.

A roofline model: each part is (work) / (peak * assumed efficiency, `spec.Efficiency`); parts run
one after another (colocated: the same GPUs do everything). Not modelled: reward scoring (CPU,
overlappable), data loading, CP's ring exchange (assumed hidden behind attention), pipeline
point-to-point traffic, kernel-launch overheads beyond the efficiency factors.

FLOPs. N_mm = weights that take part in matmuls = all parameters except the input embedding
table (a lookup), plus the LM head. Per token forward: 2 N_mm; causal attention adds
2 * s^2 * heads * head_dim * layers per sequence of length s (QK^T and AV, half the square).
Backward = 2 x forward; full recompute adds one forward.

A measured profile (`GPU.kind == "cpu"`, e.g. benchmarks/planner_calibration.py's) is timed by
`plan/kernels.py` instead: kernel by kernel from the machine's measured rates, not from a peak.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.plan.engine import EngineShape
from agro_megatron.plan.spec import PlanInput


def matmul_params(inp: PlanInput) -> int:
    """Parameters used in matmuls: drop the input embedding lookup; a tied table is still the LM head."""
    a = inp.arch
    emb = a.vocab_size * a.hidden_size
    return a.num_parameters() - (0 if a.tie_word_embeddings else emb)


def forward_flops(inp: PlanInput, tokens_per_seq: int, sequences: int) -> float:
    """Forward FLOPs of `sequences` causal sequences of `tokens_per_seq` tokens."""
    a = inp.arch
    dense = 2.0 * matmul_params(inp) * tokens_per_seq * sequences
    attn = 2.0 * tokens_per_seq ** 2 * a.num_heads * a.head_dim * a.num_layers * sequences
    return dense + attn


@dataclasses.dataclass
class StepTime:
    rollout_prefill: float
    rollout_decode: float
    reference_forward: float   # includes TP / CP communication, like policy_forward and train
    policy_forward: float
    train: float
    pipeline_bubble: float
    grad_sync: float
    weight_sync: float
    host_copies: float
    decode_bound: str            # "memory" or "compute" (decode roofline side)
    tokens_per_s_per_gpu: float
    generated_tokens_per_s_per_gpu: float
    detail: dict = dataclasses.field(default_factory=dict)   # model-specific extras (kernels.py)

    @property
    def total(self) -> float:
        return (self.rollout_prefill + self.rollout_decode + self.reference_forward + self.policy_forward
                + self.train + self.pipeline_bubble + self.grad_sync + self.weight_sync + self.host_copies)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return d


def _link_bytes_s(inp: PlanInput, group_span: int) -> float:
    """Bandwidth of a collective over a group whose members span `group_span` consecutive ranks:
    NVLink if they all sit in one node, else the per-GPU network link (the ring's bottleneck)."""
    g = inp.gpu
    bw = g.intra_node_bytes_s if group_span <= inp.layout.gpus_per_node else g.inter_node_bytes_s
    return bw * inp.eff.comm_efficiency


def comm_per_forward(inp: PlanInput) -> float:
    """TP and CP traffic of one forward pass over the step's batch, not overlapped (conservative:
    megatron can overlap CP's ring with attention). A backward pass moves the same again.

    TP: per layer a TP group moves its activations [tokens, h] (bf16) four times x (t-1)/t: two
    all-reduces, or with sequence parallelism two all-gathers + two reduce-scatters (same volume).
    CP (ring attention): per layer each rank receives the K and V of the other c-1 chunks,
    2 * kv_heads * head_dim (bf16) per token. A GPU handles L/PP layers for the tokens of its
    DP replica; pipeline stages run concurrently. Short per-rank sequences under CP also lose
    kernel efficiency, which is not modelled.
    """
    a, L = inp.arch, inp.layout
    t, c = L.tp, L.cp
    tokens = inp.work.sequences * inp.work.seq_len / L.dp_size   # one DP replica's tokens
    layers = a.num_layers / L.pp
    time = 0.0
    if t > 1:
        time += layers * 4 * (t - 1) / t * (tokens / c) * a.hidden_size * 2 / _link_bytes_s(inp, t)
    if c > 1:
        kv = 2 * a.num_kv_heads * a.head_dim * 2 / t    # K and V bytes per token on one TP rank
        time += layers * (c - 1) * (tokens / c) * kv / _link_bytes_s(inp, t * c)
    return time


def decode_step_time(inp: PlanInput, eng: EngineShape, conc: float) -> tuple[float, str]:
    """One token step of one engine with `conc` sequences in flight.

    Memory side: every GPU reads its weights (x PP micro-batches, `engine.py`) and the KV cache of
    the sequences at their mean context (prompt + response / 2). Compute side: 2 N_mm / GPUs per
    token + attention over the context. The step takes the larger of the two (roofline), plus
    2 TP all-reduces per layer (latency + bytes over NVLink). Native: PP stages run one after
    another, so memory and compute times add over stages.
    """
    a, w, e, g = inp.arch, inp.work, inp.eff, inp.gpu
    ctx = w.prompt_len + w.response_len / 2
    serial = eng.pp if eng.kind == "native" else 1
    mem = (eng.weight_bytes_read_per_step + serial * conc * ctx * eng.kv_bytes_per_token) / (g.hbm_bytes_s * e.hbm_efficiency)
    gpus = eng.tp * eng.pp
    flops = conc * (2.0 * matmul_params(inp) + 4.0 * ctx * a.num_heads * a.head_dim * a.num_layers) / gpus * serial
    comp = flops / (g.bf16_flops * e.decode_mfu)
    comm = 0.0
    if eng.tp > 1:
        msg = conc * a.hidden_size * 2 * 2 * (eng.tp - 1) / eng.tp
        comm = 2 * a.num_layers * (e.allreduce_latency_s + msg / (g.intra_node_bytes_s * e.comm_efficiency))
    return max(mem, comp) + comm, ("memory" if mem >= comp else "compute")


def step_time(inp: PlanInput, eng: EngineShape, stages) -> StepTime:
    """Time of one RL step given the engine and every PP stage's memory (`memory.StageMemory`):
    the slowest stage sets the DP-sync and host-copy times. Measured profiles: kernels.py."""
    if inp.gpu.measured:
        from agro_megatron.plan.kernels import measured_parts

        parts, detail = measured_parts(inp, eng, stages)
        st = StepTime(**parts, tokens_per_s_per_gpu=0.0, generated_tokens_per_s_per_gpu=0.0, detail=detail)
        st.tokens_per_s_per_gpu = inp.work.sequences * inp.work.seq_len / (st.total * inp.layout.world)
        st.generated_tokens_per_s_per_gpu = inp.work.sequences * inp.work.response_len / (st.total * inp.layout.world)
        return st
    a, L, w, e, g, r = inp.arch, inp.layout, inp.work, inp.eff, inp.gpu, inp.rollout
    world = L.world
    S, seq = w.sequences, w.seq_len
    if eng.concurrency < 1:
        raise ValueError("the rollout engine cannot hold one sequence in its KV cache: raise "
                         "--vllm-gpu-util / --kv-cache-gib, the rollout TP, or shorten the sequences")
    # -- rollout: prefill (compute-bound) + decode (bandwidth-bound) ------------------------------
    gpus = eng.tp * eng.pp
    prompts = -(-w.prompts_per_step // eng.engines) if (r.prefix_caching and r.engine == "vllm") else eng.seqs_per_engine
    prefill = forward_flops(inp, w.prompt_len, prompts) / (gpus * g.bf16_flops * e.prefill_mfu)
    conc = eng.seqs_per_engine / eng.waves      # sequences per wave, balanced
    t_step, bound = decode_step_time(inp, eng, conc)
    decode = eng.waves * w.response_len * t_step
    # -- log-prob forwards and training (FLOPs at the assumed MFU over all GPUs) ------------------
    fwd = forward_flops(inp, seq, S)
    rate = world * g.bf16_flops * e.mfu
    tp_fwd = comm_per_forward(inp)
    ref_t = fwd / rate + tp_fwd
    pol_t = fwd / rate + tp_fwd
    passes = 3 + (1 if inp.train.recompute else 0)   # fwd + bwd (2x) + recomputed fwd
    train_t = (passes * fwd / rate + passes * tp_fwd) * w.epochs_per_batch
    # Pipeline bubble, 1F1B and forward-only alike: (PP - 1) idle slots per m micro-batches, i.e.
    # a fraction (p-1)/(m+p-1) of the schedule = (p-1)/m of the ideal time.
    m = S // (w.micro_batch * L.dp_size)
    bubble = (ref_t + pol_t + train_t) * (L.pp - 1) / m
    # -- DP gradient sync per optimizer step (not overlapped): reduce-scatter grads + all-gather
    # bf16 params with the distributed optimizer, else an all-reduce (2x the grads). The DP group's
    # members are TP*CP ranks apart (megatron's order tp-cp-dp-pp), spanning TP*CP*DP ranks.
    d = L.dp_size * L.cp
    if d > 1:
        frac = (d - 1) / d
        grad_bytes = max(s.grads for s in stages)
        vol = (grad_bytes + max(s.weights for s in stages)) * frac if inp.train.distributed_optimizer else 2 * grad_bytes * frac
        grad_sync = vol / _link_bytes_s(inp, L.tp * L.cp * L.dp_size) * w.epochs_per_batch
    else:
        grad_sync = 0.0
    # -- weight sync into vLLM: each GPU receives its engine shard (bf16). If one training replica
    # (TP x PP GPUs) fits in a node the sources are all local (NVLink); otherwise the share of the
    # model held on other nodes, 1 - gpus_per_node / (TP * PP), crosses the network.
    weight_sync = 0.0
    if r.engine == "vllm":
        remote = max(0.0, 1.0 - L.gpus_per_node / (L.tp * L.pp))
        wb = eng.weights_per_gpu
        weight_sync = (wb * (1 - remote) / (g.intra_node_bytes_s * e.comm_efficiency)
                       + wb * remote / (g.inter_node_bytes_s * e.comm_efficiency))
    # -- host traffic over PCIe, per GPU. Out and back once per step: the GPU's optimizer state with
    # --offload-train-state (the grad buffers are freed and reallocated, not copied), the engine's
    # weights at sleep level 1. Optimizer CPU offload, per optimizer step: fp32 grads down, bf16
    # params up, and the host Adam at its assumed rate (not overlapped with the copies, as the
    # trainer runs it).
    host = 0.0
    for st in stages:
        per_step = 2 * (st.optimizer if inp.train.offload_train_state else 0)
        if r.engine == "vllm" and r.sleep_level == 1:
            per_step += 2 * eng.weights_per_gpu
        t = per_step / g.host_bytes_s + w.epochs_per_batch * (
            st.optimizer_host_numel * (4 + 2) / g.host_bytes_s + st.optimizer_host_numel / e.cpu_adam_elems_s)
        host = max(host, t)
    st = StepTime(prefill, decode, ref_t, pol_t, train_t, bubble, grad_sync, weight_sync, host, bound, 0.0, 0.0)
    st.tokens_per_s_per_gpu = S * seq / (st.total * world)
    st.generated_tokens_per_s_per_gpu = S * w.response_len / (st.total * world)
    return st
