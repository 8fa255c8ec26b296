"""Plans as text tables (rich when available, plain otherwise), JSON, and a PNG of memory per GPU
against model size."""
from __future__ import annotations

import json

from agro_megatron.plan.hardware import GiB
from agro_megatron.plan.planner import Plan

COMPONENTS = [  # (key, label)
    ("weights", "policy weights"),
    ("grads", "gradients (DDP buffer)"),
    ("optimizer", "optimizer (fp32 master + Adam)"),
    ("reference", "reference model"),
    ("activations", "activations"),
    ("loss_buffers", "loss buffers (logits + chunks)"),
    ("engine_weights", "rollout engine weights"),
    ("engine_kv", "rollout KV cache"),
    ("engine_overhead", "rollout engine overhead"),
    ("sync_bucket", "weight-sync bucket"),
]
PHASES = ("rollout", "sync", "logprob", "train")
TIME_PARTS = [
    ("rollout_prefill", "rollout prefill"), ("rollout_decode", "rollout decode"),
    ("reference_forward", "reference forward"), ("policy_forward", "policy forward"),
    ("train", "train fwd/bwd"), ("pipeline_bubble", "pipeline bubble"), ("grad_sync", "DP grad sync"),
    ("weight_sync", "weight sync"), ("host_copies", "host copies / CPU Adam"),
]


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _shown_stages(plan: Plan):
    """Every stage up to 4, else the first, the last and the worst."""
    st = plan.stages
    if len(st) <= 4:
        return st
    keep = {0, len(st) - 1, plan.worst.pp_rank}
    return [s for s in st if s.pp_rank in keep]


def headline(plan: Plan) -> list[str]:
    i, L, e, w = plan.inp, plan.inp.layout, plan.engine, plan.inp.work
    t, r = i.train, i.rollout
    lines = [
        f"{i.model_name}: {i.arch.num_parameters() / 1e9:.2f} B parameters on {L.nodes}x{L.gpus_per_node} "
        f"{i.gpu.name} ({i.gpu.memory_bytes / GiB:.1f} GiB each)",
        f"train layout {L.label()}, micro batch {w.micro_batch}, recompute {'full' if t.recompute else 'off'}, "
        f"SP {'on' if t.sp(L.tp) else 'off'}, {'distributed' if t.distributed_optimizer else 'replicated'} "
        f"optimizer, {'fp32' if t.grad_reduce_in_fp32 else 'bf16'} grads",
        f"step: {w.prompts_per_step} prompts x n={w.n} = {w.sequences} sequences of {w.prompt_len}+{w.response_len} tokens",
    ]
    if r.engine == "vllm":
        lines.append(f"rollout: vLLM colocated, {e.engines} engine{'s' if e.engines != 1 else ''} of TP{e.tp} x PP{e.pp}, sleep level "
                     f"{r.sleep_level}, KV {gib(e.kv_budget)} GiB/GPU, {e.seqs_per_engine} seqs/engine, "
                     f"{e.concurrency} concurrent ({e.waves} wave{'s' if e.waves != 1 else ''})")
    else:
        lines.append(f"rollout: native megatron sampler on the training layout, {e.engines} replicas, KV "
                     f"{gib(e.kv_budget)} GiB/GPU, {e.concurrency} concurrent ({e.waves} wave{'s' if e.waves != 1 else ''})")
    return lines


def memory_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    stages = _shown_stages(plan)
    head = ["memory per GPU (GiB)"] + [f"stage {s.pp_rank}" for s in stages]
    rows = []
    for key, label in COMPONENTS:
        vals = [getattr(s, key) for s in stages]
        if any(vals):
            rows.append([label] + [gib(v) for v in vals])
    for ph in PHASES:
        if ph in stages[0].phases:
            rows.append([f"= {ph} phase"] + [gib(s.phases[ph]) for s in stages])
    rows.append(["peak (+frag., reserve)"] + [f"{gib(s.peak)} {s.peak_phase}" for s in stages])
    rows.append(["capacity"] + [gib(s.capacity) for s in stages])
    rows.append(["fits"] + [f"yes ({gib(s.capacity - s.peak)} free)" if s.fits else
                            f"NO ({gib(s.peak - s.capacity)} short)" for s in stages])
    if any(s.host_bytes for s in stages):
        rows.append(["host memory per GPU"] + [gib(s.host_bytes) for s in stages])
    return head, rows


def time_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    t = plan.time
    head = ["step time", "seconds", "share"]
    if t is None:
        return head, [["(engine cannot hold one sequence)", "-", "-"]]
    rows = [[label, f"{getattr(t, k):.2f}", f"{100 * getattr(t, k) / t.total:.0f}%"] for k, label in TIME_PARTS]
    rows.append(["total", f"{t.total:.2f}", f"decode {t.decode_bound}-bound"])
    rows.append(["tokens/s/GPU", f"{t.tokens_per_s_per_gpu:.0f}", f"generated {t.generated_tokens_per_s_per_gpu:.0f}"])
    return head, rows


def search_rows(fits: list[Plan], misses: list[Plan]) -> tuple[list[str], list[list[str]]]:
    head = ["#", "layout", "recompute", "rollout", "peak GiB", "largest mbs", "step s", "tokens/s/GPU"]
    rows = []
    for k, p in enumerate(fits + misses, 1):
        rows.append([str(k) if p.fits else "-", p.inp.layout.label(), "full" if p.inp.train.recompute else "off",
                     f"TP{p.engine.tp} PP{p.engine.pp}" if p.inp.rollout.engine == "vllm" else "native",
                     f"{gib(p.worst.peak)} ({p.worst.peak_phase})" + ("" if p.fits else " NO FIT"),
                     str(p.largest_micro_batch) if p.fits else "-",
                     f"{p.time.total:.1f}" if p.time else "-",
                     f"{p.time.tokens_per_s_per_gpu:.0f}" if p.time and p.fits else "-"])
    return head, rows


def render(head: list[str], rows: list[list[str]], plain: bool = False) -> str:
    """A table as text: rich's box drawing unless plain (or rich is missing)."""
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        widths = [max(len(str(r[c])) for r in [head] + rows) for c in range(len(head))]
        fmt = lambda r: "  ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w)  # noqa: E731
                                  for c, (v, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])
    table = Table(*head)
    for c in table.columns[1:]:
        c.justify = "right"
    for r in rows:
        table.add_row(*r)
    console = Console(width=160, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get().rstrip()


def plan_text(plan: Plan, plain: bool = False) -> str:
    parts = ["\n".join(headline(plan)), render(*memory_rows(plan), plain=plain)]
    parts.append(f"largest micro batch that fits: {plan.largest_micro_batch or 'none'}")
    parts.append(render(*time_rows(plan), plain=plain))
    return "\n\n".join(parts)


def to_json(obj) -> str:
    if isinstance(obj, Plan):
        obj = obj.to_dict()
    return json.dumps(obj, indent=2, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))


def plot_memory_vs_size(plans: list[Plan], path: str, title: str | None = None) -> str:
    """Grouped stacked bars against model size: for each plan, its busiest GPU in the rollout phase
    and in the train phase, by component, topped by fragmentation + reserve; dashed: capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = sorted(plans, key=lambda p: p.inp.arch.num_parameters())
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab10").colors
    width, used = 0.36, set()
    for i, p in enumerate(plans):
        e = p.inp.eff
        for j, phase in enumerate(("rollout", "train")):
            st = max(p.stages, key=lambda s: s.phases[phase])
            parts = dict(st.parts[phase])
            parts["reserve"] = int(st.phases[phase] * e.fragmentation + e.reserve_gib * GiB)
            x, bottom = i + (j - 0.5) * (width + 0.04), 0.0
            for ci, (key, label) in enumerate(COMPONENTS + [("reserve", "fragmentation + reserve")]):
                h = parts.get(key, 0) / GiB
                if h <= 0:
                    continue
                ax.bar(x, h, width, bottom=bottom, color=colors[ci % 10] if key != "reserve" else "0.8",
                       label=None if key in used else label, edgecolor="white", linewidth=0.3)
                used.add(key)
                bottom += h
            ax.text(x, bottom + 1, phase, ha="center", fontsize=7)
        ax.hlines(p.worst.capacity / GiB, i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1)
    ax.set_xticks(range(len(plans)), [
        f"{p.inp.model_name} ({p.inp.arch.num_parameters() / 1e9:.1f} B)\n{p.inp.layout.label()}, "
        f"{p.inp.layout.world} GPUs" + ("\nfits" if p.fits else "\nDOES NOT FIT") for p in plans], fontsize=8)
    ax.set_ylabel("GiB per GPU (busiest pipeline stage)")
    ax.set_title(title or f"AGRO step memory per GPU vs model size, {plans[0].inp.gpu.name} "
                 "(dashed: device memory)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
