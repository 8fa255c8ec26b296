"""Step time on a measured profile (kind "cpu"): every kernel timed from the machine's own numbers.

Why a second time model: `timing.py`'s roofline divides FLOPs by a datasheet peak times an assumed
efficiency. That is the right shape for large GEMMs on GPUs, but on a host running the trainer's
CPU path (and for small models anywhere) a step is made of small matmuls far below peak, framework
overhead per op, elementwise passes bound by memory bandwidth and latency-bound collectives. Here
each of those is priced from a measured profile (`hardware.load_profile`) and the model counts how
many of each the trainer issues. No constant here is fitted to step times: the rates are the
profile's, the counts are the code's structure (stated next to each).

Terms, per rank (a "GPU" of the planner is one trainer process):

- matmul:   `GPU.matmul_s(m, k, n)` at the shapes the layers run: qkv, proj, fc1 (gate+up), fc2 of
            each local layer, split over TP; the LM head [tokens, h] x [h, V/TP]; attention as
            [s, d] x [d, s] and [s, s] x [s, d] per sequence and local head, the full square (an
            upper bound: a causal SDPA kernel may skip the masked half). Backward = 2 x the
            forward matmuls (dgrad + wgrad).
- elementwise: bytes / the measured copy bandwidth at the tensors' size (`GPU.copy_s`: small
            tensors stay in cache, so the rate of a copy of that size, not DRAM's). Per token per layer forward,
            in units of the dtype: norms 2 x 12 h, RoPE 12 (q + k heads) d, attention scores
            8 (heads) s_k, bias-dropout-adds 6 h, SwiGLU 6 ffn, layout copies 4 (q + 2 kv heads) d
            (passes read + write; `ELEMENTWISE_PASSES` names them). Backward = 2 x forward. The
            vocabulary-parallel loss: `LOSS_PASSES` passes over [tokens, V/TP] per model.
- op overhead: `op_overhead_s` x the aten ops the code dispatches, counted on megatron-core 0.16's
            local spec with a dispatch-mode counter: `DECODE_OPS_PER_LAYER` per decode step and
            layer, `FWD_OPS_PER_LAYER` / `BWD_OPS_PER_LAYER` per training micro-batch and layer,
            plus the fixed ops per forward, per sampling step and per optimizer tensor below.
- collectives: latency + bytes / bandwidth (`allreduce_latency_s`, `intra_node_bytes_s` = the
            measured all-reduce's tensor bytes per second). TP: 2 all-reduces of [tokens, h] per
            layer forward and 2 per backward, one for the vocab-parallel embedding; the decode's
            logits all-gather, the embedding's all-reduce and the sampled tokens' broadcast. PP: one send of [tokens, h] per
            micro-batch and stage boundary each way. DP: the gradients once per optimizer step.
- schedule: a pipeline of p stages over m micro-batches takes sum_s T_s + (m - 1) max_s T_s (1F1B
            and forward-only alike; stages differ: the last one has the LM head and the loss).
            The native sampler runs the stages one after another for every token.
- optimizer: Adam over the rank's parameters, `OPTIMIZER_BYTES_PER_PARAM` bytes moved per element
            (param, main grad, two moments: reads and writes, the grad-norm read, the grad zeroing)
            plus `OPTIMIZER_OPS_PER_TENSOR` ops per parameter tensor.

Not modelled: reward scoring, tokenizer decoding, per-row Python in the trainer's layout code
beyond `HOST_OPS_PER_SEQUENCE`, cache effects between kernels, OS noise.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.models.llama import padded_vocab_size
from agro_megatron.plan.engine import EngineShape
from agro_megatron.plan.params import rank_params
from agro_megatron.plan.spec import PlanInput

# Aten ops dispatched, counted with torch's TorchDispatchMode on megatron-core 0.16.1's local spec
# (fp32, CPU): one StageDecoder.forward at 1 and 4 layers (91 and 289 ops) and one GPTModel
# forward + backward at 1 and 4 layers (235 and 784): the per-layer slopes and the intercepts.
DECODE_OPS_PER_LAYER = 66
DECODE_OPS_FIXED = 25            # embedding, RoPE tables, final norm, LM head, last-position slice
FWD_OPS_PER_LAYER = 61           # a third of the forward + backward slope (183)
BWD_OPS_PER_LAYER = 122
TRAIN_OPS_FIXED = 52             # embedding, final norm, LM head, their backward
SAMPLER_OPS = 25                 # rollout/sampling.py sample() + native.py's per-step bookkeeping
LOSS_OPS = 40                    # ops/vocab_parallel.py per call (forward; backward as many again)
OPTIMIZER_OPS_PER_TENSOR = 15
HOST_OPS_PER_SEQUENCE = 8        # train/layout.py builds and scatters rows one by one
# Elementwise passes (read + write of the named width, per token and layer, forward).
ELEMENTWISE_PASSES = {"hidden": 2 * 12 + 6, "qk_heads": 12, "qkv_heads": 4, "scores": 8, "ffn": 6}
LOSS_PASSES = 10                 # per model over [tokens, V/TP] (log-softmax, gather, KL/entropy)
SAMPLER_PASSES = 12              # over [batch, V] per sampling step (fp32 and fp64 copies, cumsum)
OPTIMIZER_BYTES_PER_PARAM = 4 * 16  # fp32 elements moved per parameter per Adam step


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The per-rank dimensions the kernels see."""

    h: int
    q: int        # local query heads x head dim
    kv: int       # local KV heads x head dim (each of K and V)
    heads: int    # local query heads
    d: int        # head dim
    ffn: int      # local intermediate size
    vocab: int    # local (padded) vocabulary shard
    dt: int       # bytes per element of activations and weights

    @classmethod
    def of(cls, inp: PlanInput, tp: int) -> "Shapes":
        a = inp.arch
        return cls(a.hidden_size, a.num_heads * a.head_dim // tp, max(a.num_kv_heads // tp, 1) * a.head_dim,
                   a.num_heads // tp, a.head_dim, a.intermediate_size // tp,
                   padded_vocab_size(a.vocab_size, tp) // tp, inp.train.dtype_bytes)


class KernelModel:
    """Seconds of the trainer's pieces on `inp.gpu` (a measured profile) at TP = `tp`."""

    def __init__(self, inp: PlanInput, tp: int):
        self.inp, self.g, self.tp = inp, inp.gpu, tp
        self.s = Shapes.of(inp, tp)

    # -- primitives ------------------------------------------------------------------------------
    def ops(self, n: float) -> float:
        return n * self.g.op_overhead_s

    def bytes(self, n: float, working_set: float) -> float:
        """Elementwise traffic of `n` bytes in passes over tensors of `working_set` bytes."""
        return self.g.copy_s(n, working_set)

    def collective(self, nbytes: float, count: int = 1) -> float:
        """`count` two-rank collectives of `nbytes` each (0 without TP/PP partners is the caller's)."""
        return count * (self.g.allreduce_latency_s + nbytes / self.g.intra_node_bytes_s)

    # -- one layer -------------------------------------------------------------------------------
    def layer_matmuls(self, tokens: float) -> float:
        s, mm = self.s, self.g.matmul_s
        return (mm(tokens, s.h, s.q + 2 * s.kv) + mm(tokens, s.q, s.h)
                + mm(tokens, s.h, 2 * s.ffn) + mm(tokens, s.ffn, s.h))

    def attention(self, seqs: float, s_q: float, s_k: float) -> float:
        """Scores and context of `seqs` sequences: per local head [s_q, d] x [d, s_k] and back."""
        s, mm = self.s, self.g.matmul_s
        return seqs * s.heads * (mm(s_q, s.d, s_k) + mm(s_q, s_k, s.d))

    def layer_elementwise(self, tokens: float, s_k: float) -> float:
        s, p = self.s, ELEMENTWISE_PASSES
        per_token = (p["hidden"] * s.h + p["qk_heads"] * (s.q + s.kv) + p["qkv_heads"] * (s.q + 2 * s.kv)
                     + p["scores"] * s.heads * s_k + p["ffn"] * s.ffn)
        return self.bytes(2 * per_token * tokens * s.dt, tokens * max(s.h, s.ffn) * s.dt)   # read + write

    def layer_forward(self, seqs: float, seq_len: float, comm: bool = True) -> float:
        """One layer's forward over `seqs` causal sequences of `seq_len` tokens (with its TP
        all-reduces unless `comm` is False)."""
        tokens = seqs * seq_len
        t = self.layer_matmuls(tokens) + self.attention(seqs, seq_len, seq_len) + self.layer_elementwise(tokens, seq_len)
        if comm and self.tp > 1:
            t += self.collective(tokens * self.s.h * self.s.dt, 2)
        return t

    def lm_head(self, tokens: float) -> float:
        return self.g.matmul_s(tokens, self.s.h, self.s.vocab)

    def loss(self, tokens: float, models: int = 1) -> float:
        """The vocabulary-parallel log-prob (+ entropy / KL) op over `models` logits, forward."""
        t = models * (self.bytes(LOSS_PASSES * 2 * tokens * self.s.vocab * 4, tokens * self.s.vocab * 4)
                      + self.ops(LOSS_OPS))
        if self.tp > 1:
            t += self.collective(tokens * 4, 3 * models)   # max, sum-exp, target logit over TP
        return t


def _stage_layers(inp: PlanInput) -> int:
    return inp.arch.num_layers // inp.layout.pp


def _pipeline(stage_times: list[float], m: int) -> tuple[float, float]:
    """(ideal busy time m * max stage, bubble) of p stages over m micro-batches."""
    total = sum(stage_times) + (m - 1) * max(stage_times)
    ideal = m * max(stage_times)
    return ideal, total - ideal


def forward_pass(inp: PlanInput, km: KernelModel, mb_seqs: int, seq: int, models: int) -> list[float]:
    """Per-stage seconds of one forward-only micro-batch of `models` models (logprob pass)."""
    L, pp = _stage_layers(inp), inp.layout.pp
    tokens = mb_seqs * seq
    out = []
    for st in range(pp):
        t = models * (L * (km.layer_forward(mb_seqs, seq) + km.ops(FWD_OPS_PER_LAYER)) + km.ops(TRAIN_OPS_FIXED / 3))
        if st == 0 and km.tp > 1:
            t += models * km.collective(tokens * km.s.h * km.s.dt)        # vocab-parallel embedding
        if st == pp - 1:
            t += models * km.lm_head(tokens) + km.loss(tokens, models)
        if pp > 1:
            t += km.collective(models * tokens * km.s.h * km.s.dt)         # the stage boundary
        out.append(t)
    return out


def train_pass(inp: PlanInput, km: KernelModel, mb_seqs: int, seq: int) -> list[float]:
    """Per-stage seconds of one forward + backward micro-batch of the policy."""
    L, pp = _stage_layers(inp), inp.layout.pp
    tokens = mb_seqs * seq
    out = []
    for st in range(pp):
        f = L * km.layer_forward(mb_seqs, seq, comm=False)
        t = 3 * f + L * km.ops(FWD_OPS_PER_LAYER + BWD_OPS_PER_LAYER) + km.ops(TRAIN_OPS_FIXED)
        if km.tp > 1:   # forward and backward: 2 all-reduces per layer each, and the embedding's
            t += 2 * L * km.collective(tokens * km.s.h * km.s.dt, 2)
            if st == 0:
                t += 2 * km.collective(tokens * km.s.h * km.s.dt)
        if st == pp - 1:
            t += 3 * km.lm_head(tokens) + 2 * km.loss(tokens, 1)
        if pp > 1:
            t += 2 * km.collective(tokens * km.s.h * km.s.dt)
        out.append(t)
    return out


def optimizer_time(inp: PlanInput, km: KernelModel) -> float:
    """Adam on the busiest stage; the distributed optimizer updates 1/(DP x CP) of the elements."""
    a, L, tp, pp = inp.arch, inp.layout, inp.layout.tp, inp.layout.pp
    shards = L.dp_size * L.cp if inp.train.distributed_optimizer else 1
    worst = 0.0
    for st in range(pp):
        params = rank_params(a, tp, pp, st, dtype_bytes=inp.train.dtype_bytes, spec=inp.train.spec)
        numel = sum(p.numel for p in params) / shards
        t = (km.bytes(numel * OPTIMIZER_BYTES_PER_PARAM, max(p.numel for p in params) * 4)
             + km.ops(OPTIMIZER_OPS_PER_TENSOR * len(params)))
        worst = max(worst, t)
    return worst


def decode_step(inp: PlanInput, km: KernelModel, batch: float, ctx: float) -> float:
    """One token for `batch` sequences at mean context `ctx`: every stage in turn, then sampling."""
    a, pp = inp.arch, inp.layout.pp
    L = a.num_layers // pp
    s = km.s
    kv_bytes = 2 * batch * ctx * s.kv * s.dt   # K and V read once per layer
    layer = (km.layer_matmuls(batch) + km.attention(batch, 1, ctx) + km.bytes(kv_bytes, kv_bytes / 2)
             + km.layer_elementwise(batch, ctx) + km.ops(DECODE_OPS_PER_LAYER))
    if km.tp > 1:
        layer += km.collective(batch * s.h * s.dt, 2)
    t = pp * L * layer + km.ops(DECODE_OPS_FIXED) + km.lm_head(batch)
    if km.tp > 1:
        t += km.collective(batch * s.h * s.dt)        # the vocab-parallel embedding's all-reduce
    t += km.bytes(SAMPLER_PASSES * batch * a.vocab_size * 4, batch * a.vocab_size * 8) + km.ops(SAMPLER_OPS + batch)
    if km.tp > 1:
        t += km.collective(batch * s.vocab * km.tp * 4) + km.collective(batch * 16)   # gather + share
    if pp > 1:
        t += (pp - 1) * km.collective(batch * s.h * s.dt) + km.collective(batch * 16)
    return t


def prefill(inp: PlanInput, km: KernelModel, batch: float, prompt: int) -> float:
    a, pp = inp.arch, inp.layout.pp
    L = a.num_layers // pp
    t = pp * L * (km.layer_forward(batch, prompt) + km.ops(DECODE_OPS_PER_LAYER)) + km.lm_head(batch)
    if km.tp > 1:
        t += km.collective(batch * prompt * km.s.h * km.s.dt)
    if pp > 1:
        t += (pp - 1) * km.collective(batch * prompt * km.s.h * km.s.dt)
    return t


def measured_parts(inp: PlanInput, eng: EngineShape, stages) -> tuple[dict, dict]:
    """(`timing.StepTime`'s time fields, details) of one RL step on a measured profile (native
    rollout, colocated); timing.step_time builds the StepTime."""
    L, w = inp.layout, inp.work
    if inp.rollout.engine != "native":
        raise ValueError("a measured (cpu) profile times the native sampler only: pass --rollout-engine native")
    km = KernelModel(inp, L.tp)
    seq = w.seq_len
    # rollout: each engine's waves of `concurrency` sequences; mean context prompt + response / 2
    conc = eng.seqs_per_engine / eng.waves
    pre = eng.waves * prefill(inp, km, conc, w.prompt_len)
    step = decode_step(inp, km, conc, w.prompt_len + w.response_len / 2)
    decode = eng.waves * ((w.response_len - 1) * step
                          + km.bytes(SAMPLER_PASSES * conc * inp.arch.vocab_size * 4, conc * inp.arch.vocab_size * 8)
                          + km.ops(SAMPLER_OPS + conc))
    # log-prob pass (policy + reference paired) and training, per DP rank
    per_rank = w.sequences // L.dp_size
    m = per_rank // w.micro_batch
    host = km.ops(HOST_OPS_PER_SEQUENCE * per_rank)
    lp_ideal, lp_bubble = _pipeline(forward_pass(inp, km, w.micro_batch, seq, 2), m)
    tr_ideal, tr_bubble = _pipeline(train_pass(inp, km, w.micro_batch, seq), m)
    opt = optimizer_time(inp, km)
    epochs = w.epochs_per_batch
    grad_sync = 0.0
    if L.dp_size * L.cp > 1:
        grad_bytes = max(s.grads for s in stages)
        grad_sync = epochs * km.collective(grad_bytes, 2 if inp.train.distributed_optimizer else 1)
    parts = dict(rollout_prefill=pre, rollout_decode=decode, reference_forward=lp_ideal / 2 + host / 2,
                 policy_forward=lp_ideal / 2 + host / 2, train=epochs * (tr_ideal + opt + host),
                 pipeline_bubble=lp_bubble + epochs * tr_bubble, grad_sync=grad_sync, weight_sync=0.0,
                 host_copies=0.0, decode_bound="overhead+kernels")
    detail = {"decode_step": step, "optimizer": opt, "logprob_bubble": lp_bubble,
              "train_bubble": epochs * tr_bubble, "micro_batches": m}
    return parts, detail
