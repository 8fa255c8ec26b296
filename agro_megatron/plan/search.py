"""`--search`: every TP x PP (x CP) x recompute layout of a GPU count, ranked by tokens/s/GPU.

Candidates: TP in the powers of two up to a node that divide the KV heads (megatron's GQA split),
PP over the divisors of the layer count (uniform stages), CP as given (or 1, 2, 4 with
`cps`), DP = the rest; with and without full recompute. Each gets its best-fitting vLLM rollout
TP/PP (`planner.make_plan`). Layouts whose micro-batching does not divide the batch are skipped.
Ranking: tokens/s/GPU; within 2% of the best, fewer model-parallel ranks first.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.plan.planner import Plan, make_plan
from agro_megatron.plan.spec import Layout, PlanInput

# The layouts the PNG and the examples use for the built-in models (sized for H100 80 GB with the
# default step: 64 prompts x 8 responses of 512 + 1024 tokens, vLLM colocated at 0.4 utilization).
# 70B and 405B park grads + optimizer on the host while vLLM generates (--offload-train-state).
# 405B: PP must divide its 126 layers (uniform stages), hence PP 14 on 28 nodes.
DEFAULT_LAYOUTS: dict[str, dict] = {
    "llama3-8b": dict(layout=Layout(nodes=1, gpus_per_node=8, tp=2, pp=1)),
    "llama3-70b": dict(layout=Layout(nodes=4, gpus_per_node=8, tp=8, pp=4),
                       train=dict(offload_train_state=True)),
    "llama3-405b": dict(layout=Layout(nodes=28, gpus_per_node=8, tp=8, pp=14),
                        train=dict(offload_train_state=True)),
}


def candidate_layouts(inp: PlanInput, cps: tuple[int, ...] | None = None) -> list[Layout]:
    a, base = inp.arch, inp.layout
    world = base.world
    out = []
    for cp in cps or (base.cp,):
        for tp in (1, 2, 4, 8, 16):
            if tp > base.gpus_per_node or a.num_kv_heads % tp or a.intermediate_size % tp:
                continue
            for pp in range(1, a.num_layers + 1):
                if a.num_layers % pp or world % (tp * pp * cp):
                    continue
                if inp.work.seq_len % cp:
                    continue
                lay = Layout(base.nodes, base.gpus_per_node, tp, pp, cp)
                if inp.work.sequences % (inp.work.micro_batch * lay.dp_size):
                    continue
                out.append(lay)
    return out


def search(inp: PlanInput, top: int = 10, cps: tuple[int, ...] | None = None,
           recompute_options: tuple[bool, ...] = (False, True)) -> tuple[list[Plan], list[Plan]]:
    """(fitting plans best first, up to `top`, with their largest micro batch; the closest misses
    by peak memory when fewer than `top` fit)."""
    fits, misses = [], []
    for lay in candidate_layouts(inp, cps):
        for rc in recompute_options:
            cand = inp.replace(layout=lay, train=dataclasses.replace(inp.train, recompute=rc))
            try:
                p = make_plan(cand, with_mbs=False)
            except ValueError:
                continue
            (fits if p.fits else misses).append(p)
    # Rank by tokens/s/GPU; layouts within 2% of the best come first ordered by fewer model-parallel
    # ranks (TP x PP x CP), which are less exposed to what the model leaves out (per-stage kernel
    # efficiency, P2P traffic).
    top_rate = max((p.time.tokens_per_s_per_gpu for p in fits), default=1.0)

    def rank_key(p):
        rate = p.time.tokens_per_s_per_gpu
        near = rate >= 0.98 * top_rate
        return (not near, p.inp.layout.tp * p.inp.layout.pp * p.inp.layout.cp if near else 0, -rate)

    fits.sort(key=rank_key)
    misses.sort(key=lambda p: p.worst.peak)
    best = [make_plan(p.inp) for p in fits[:top]]
    return best, misses[: max(0, top - len(best))]
