"""The rollout engine's shape: how many engines, their weights and KV cache per GPU, concurrency.

vLLM (colocated): the job's GPUs are tiled by engines of rollout TP x PP GPUs; each engine holds a
bf16 copy of the weights (vocabulary padded to 64 rows per shard, KV heads replicated when
rollout TP exceeds them) and a KV cache sized by vLLM's budget:
    KV = gpu_memory_utilization * memory - engine weights - engine overhead   (or --kv-cache-gib)
vLLM pre-allocates that whole budget while awake, whatever the batch needs.

native: megatron's own sampler on the training layout: each TP x PP model replica generates for
its share of the prompts with the policy's weights (no extra copy); its static KV cache is
allocated for the concurrent batch, up to the free memory left by the trainer.

Concurrency: sequences that fit in the KV cache at their full length (prompt + response, so the
engine never preempts); the rest are generated in waves.
"""
from __future__ import annotations

import dataclasses
import math

from agro_megatron.plan.hardware import GiB
from agro_megatron.plan.params import rank_params
from agro_megatron.plan.spec import PlanInput

KV_BYTES = 2  # bf16 KV cache


@dataclasses.dataclass(frozen=True)
class EngineShape:
    kind: str
    tp: int
    pp: int
    engines: int                 # independent generators across the job
    seqs_per_engine: int
    weights_per_gpu: int         # bytes of engine-owned weights per GPU (0 for native: shared)
    weight_bytes_read_per_step: int  # per GPU per decode step (every stage's weights once per pass)
    kv_bytes_per_token: int      # per GPU
    kv_budget: int               # KV bytes allocated per GPU while awake
    overhead: int                # engine activations etc. per GPU while awake
    concurrency: int             # sequences decoded together per engine
    waves: int

    @property
    def awake_bytes(self) -> int:
        return self.weights_per_gpu + self.kv_budget + self.overhead

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def vllm_weights_per_gpu(inp: PlanInput, tp: int, pp: int) -> int:
    """bf16 weight bytes on the heaviest GPU of a vLLM engine with TP=tp, PP=pp."""
    a = inp.arch
    h, hd = a.hidden_size, a.head_dim
    kv_heads = max(a.num_kv_heads // tp, 1)
    layer = (h * (a.num_heads // tp + 2 * kv_heads) * hd      # qkv
             + a.num_heads // tp * hd * h                       # o_proj
             + 3 * h * (a.intermediate_size // tp)              # gate_up + down
             + 2 * h)                                           # norms (replicated)
    vocab_rows = math.ceil(a.vocab_size / (64 * tp)) * 64       # vLLM pads the vocab to 64 per shard
    emb = vocab_rows * h
    layers = math.ceil(a.num_layers / pp)
    first = layers * layer + emb
    last = layers * layer + h + (0 if (a.tie_word_embeddings and pp == 1) else emb)
    return 2 * (first + last - layers * layer if pp == 1 else max(first, last))


def engine_shape(inp: PlanInput, free_bytes_for_native: int | None = None) -> EngineShape:
    """The engine for this plan. `free_bytes_for_native`: memory the native KV cache may use."""
    a, L, w, r = inp.arch, inp.layout, inp.work, inp.rollout
    seq = w.seq_len
    if r.engine == "vllm":
        tp, pp = r.tp or 1, r.pp or 1
        engines = L.world // (tp * pp)
        weights = vllm_weights_per_gpu(inp, tp, pp)
        kv_tok = 2 * math.ceil(a.num_layers / pp) * max(a.num_kv_heads // tp, 1) * a.head_dim * KV_BYTES
        overhead = int(r.overhead_gib * GiB)
        if r.kv_cache_gib is not None:
            kv = int(r.kv_cache_gib * GiB)
        else:
            kv = max(int(r.gpu_memory_utilization * inp.gpu.memory_bytes) - weights - overhead, 0)
        # Pipeline-parallel decode keeps `pp` micro-batches in flight; each re-reads its stage's
        # weights, so a GPU reads pp x (its weights) per token step.
        read = weights * pp
    else:
        tp, pp = L.tp, L.pp
        engines = L.dp_size * L.cp
        weights = 0
        kv_tok = 2 * (a.num_layers // pp) * (a.num_kv_heads // tp) * a.head_dim * KV_BYTES
        overhead = 0
        kv = None
        # Stages run one after another for each token (no pipelining across batches): the step
        # costs pp x one stage's weight read.
        read = pp * max(sum(p.numel * p.nbytes_per for p in rank_params(
            a, tp, pp, s, dtype_bytes=inp.train.dtype_bytes, spec=inp.train.spec)) for s in range(pp))
    seqs = math.ceil(w.sequences / engines)
    per_seq = seq * kv_tok
    if kv is None:  # native: allocate what the batch needs, up to the free memory
        budget = max(free_bytes_for_native or 0, 0) if r.kv_cache_gib is None else int(r.kv_cache_gib * GiB)
        conc = min(seqs, budget // per_seq)
        kv = conc * per_seq
    else:
        conc = min(seqs, kv // per_seq)
    waves = math.ceil(seqs / conc) if conc > 0 else 0
    return EngineShape(r.engine, tp, pp, engines, seqs, weights, read, kv_tok, kv, overhead, conc, waves)
