#!/usr/bin/env bash
# beta ablation (Fig. 6): larger beta is slower but more KL-efficient. One sbatch job per beta.
set -euo pipefail
cd "$(dirname "$0")/../.."
for beta in 0.01 0.05 0.1 0.5; do
  sbatch slurm/train.sbatch examples/paper/onpolicy_agro_on.yaml \
    algorithm.beta=$beta logging.dir=runs/paper/beta_$beta
done
