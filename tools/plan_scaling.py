#!/usr/bin/env python
"""Scaling sweep: the built-in Llama-3 models at their default layouts on one GPU type.

    python tools/plan_scaling.py --gpu H100 --out runs/plan
writes plan.json and memory_vs_size.png under --out and prints one line per model. Any other
agro-plan option (step shape, rollout, assumptions) is passed through, e.g. --response-len 2048.
"""
import argparse
import os
import sys

from agro_megatron.cli.plan import build_parser, default_layout_plans, input_from_args
from agro_megatron.plan import report


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", default="runs/plan")
    own, rest = pre.parse_known_args(argv)
    args = build_parser().parse_args(rest + ["--tp", "1", "--pp", "1"])  # layouts come from DEFAULT_LAYOUTS
    plans = default_layout_plans(input_from_args(args))
    os.makedirs(own.out, exist_ok=True)
    head = ["model", "layout", "GPUs", "peak GiB (phase)", "fits", "largest mbs", "step s", "tokens/s/GPU"]
    rows = [[p.inp.model_name, p.inp.layout.label(), str(p.inp.layout.world),
             f"{report.gib(p.worst.peak)} ({p.worst.peak_phase})", "yes" if p.fits else "NO",
             str(p.largest_micro_batch), f"{p.time.total:.1f}" if p.time else "-",
             f"{p.time.tokens_per_s_per_gpu:.0f}" if p.time else "-"] for p in plans]
    print(report.render(head, rows, plain=args.plain))
    with open(os.path.join(own.out, "plan.json"), "w") as f:
        f.write(report.to_json([p.to_dict() for p in plans]))
    png = report.plot_memory_vs_size(plans, os.path.join(own.out, "memory_vs_size.png"))
    print(f"wrote {own.out}/plan.json and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
