"""One plan: memory per GPU (every PP stage), whether it fits, the largest micro batch, step time.

`make_plan(PlanInput)` is the library entry point the CLI, the search and the report share.
"""
from __future__ import annotations

import dataclasses

from agro_megatron.plan.engine import EngineShape
from agro_megatron.plan.memory import StageMemory, largest_micro_batch, memory_plan
from agro_megatron.plan.params import padding_overhead, total_params_over_ranks
from agro_megatron.plan.spec import PlanInput, rollout_tp_ok
from agro_megatron.plan.timing import StepTime, step_time


@dataclasses.dataclass
class Plan:
    inp: PlanInput
    stages: list[StageMemory]
    engine: EngineShape
    time: StepTime | None          # None when the engine cannot hold a single sequence
    largest_micro_batch: int

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages) and self.time is not None

    def to_dict(self) -> dict:
        i = self.inp
        return {
            "model": i.model_name,
            "parameters": i.arch.num_parameters(),
            "parameters_per_replica_incl_padding": total_params_over_ranks(i.arch, i.layout.tp, i.layout.pp, i.train.spec),
            "padding_and_replication_elements": padding_overhead(i.arch, i.layout.tp, i.layout.pp),
            "gpu": i.gpu.to_dict(),
            "layout": {**dataclasses.asdict(i.layout), "dp": i.layout.dp_size, "world": i.layout.world},
            "workload": {**dataclasses.asdict(i.work), "sequences": i.work.sequences},
            "train": dataclasses.asdict(i.train),
            "rollout": dataclasses.asdict(i.rollout),
            "efficiency": dataclasses.asdict(i.eff),
            "engine": self.engine.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "worst_stage": self.worst.pp_rank,
            "fits": self.fits,
            "largest_micro_batch": self.largest_micro_batch,
            "time": self.time.to_dict() if self.time else None,
        }


def _evaluate(inp: PlanInput, with_mbs: bool) -> Plan:
    stages, engine = memory_plan(inp)
    t = None
    if engine.concurrency >= 1:
        t = step_time(inp, engine, stages)
    mbs = largest_micro_batch(inp, engine) if with_mbs else 0
    return Plan(inp, stages, engine, t, mbs)


def rollout_candidates(inp: PlanInput) -> list[tuple[int, int]]:
    """(TP, PP) of vLLM engines that tile the job: powers of two, TP within a node, the ones given
    fixed. PP > 1 only when TP is a whole node (vLLM's multi-node layout)."""
    r, L = inp.rollout, inp.layout
    tps = [r.tp] if r.tp else [2 ** k for k in range(8) if 2 ** k <= L.gpus_per_node]
    out = []
    for tp in tps:
        pps = [r.pp] if r.pp else [2 ** k for k in range(8) if 2 ** k * tp <= L.world
                                   and 2 ** k <= inp.arch.num_layers and (k == 0 or tp == L.gpus_per_node)]
        for pp in pps:
            try:
                rollout_tp_ok(inp.arch, tp, pp, L)
                out.append((tp, pp))
            except ValueError:
                pass
    return out


def make_plan(inp: PlanInput, with_mbs: bool = True) -> Plan:
    """Plan this input. A vLLM rollout TP / PP left unset is chosen: the fastest that fits (else the
    one with the smallest peak memory), and the plan's input records the choice."""
    inp.validate()
    r = inp.rollout
    if r.engine == "vllm" and (r.tp is None or r.pp is None):
        cands = [_evaluate(inp.replace(rollout=dataclasses.replace(r, tp=t, pp=p)), False)
                 for t, p in rollout_candidates(inp)]
        if not cands:
            raise ValueError("no rollout engine tiles this job; pass --rollout-tp / --rollout-pp")
        fitting = [p for p in cands if p.fits]
        best = (min(fitting, key=lambda p: p.time.total) if fitting
                else min(cands, key=lambda p: p.worst.peak))
        inp = best.inp
        if not with_mbs:
            return best
    if r.engine == "native":
        inp = inp.replace(rollout=dataclasses.replace(r, tp=inp.layout.tp, pp=inp.layout.pp))
    return _evaluate(inp, with_mbs)
