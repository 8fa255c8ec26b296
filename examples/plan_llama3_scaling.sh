#!/usr/bin/env bash
# What fits where for AGRO on Llama-3, 8B -> 405B (agro-plan; no GPU needed).
set -euo pipefail
OUT=${OUT:-runs/plan}
mkdir -p "$OUT"
# 8B on one 8x H100 node, the trainer's default layout
agro-plan --model llama3-8b --gpu H100 --nodes 1 --tp 2 --pp 1 --json "$OUT/llama3-8b.json"
# 70B on 2 nodes: nothing fits with a GPU-resident optimizer; rank what would, then the offloaded plan
agro-plan --model llama3-70b --gpu H100 --nodes 2 --search --top 5
agro-plan --model llama3-70b --gpu H100 --nodes 2 --tp 8 --pp 2 --offload-train-state --optimizer-offload-fraction 1
# 70B on 4 nodes: search the layouts
agro-plan --model llama3-70b --gpu H100 --nodes 4 --search --offload-train-state
# 405B: 28 nodes (PP must divide the 126 layers)
agro-plan --model llama3-405b --gpu H100 --nodes 28 --tp 8 --pp 14 --offload-train-state
# the sweep: default layouts, JSON + memory-vs-size PNG
python tools/plan_scaling.py --gpu H100 --out "$OUT"
