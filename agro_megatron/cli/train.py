"""`agro-train [CONFIG.yaml] [key=value ...]`: an AGRO run (default: the tiny CPU demo).

Exit status: 0 done, 2 bad configuration, 1 a checkpoint that cannot be written (no space left,
read-only) or read (damaged; the message names it), 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1
after saving a checkpoint (during SFT too): the run is not finished and the same command resumes
it (slurm/train.sbatch requeues the job on 75).
"""
from __future__ import annotations

import sys

from agro_megatron.cli.job import destroy_process_groups, load_job_config

STOPPED_EXIT_CODE = 75


def main(argv: list[str] | None = None) -> int:
    cfg = load_job_config(sys.argv[1:] if argv is None else argv, prog="agro-train", doc=__doc__,
                          help_tail="Overrides use dotted keys, e.g. train.steps=10 parallel.tp=2. Launch "
                                    "multi-process runs with torchrun --nproc-per-node N -m agro_megatron.train ...")
    if isinstance(cfg, int):
        return cfg
    from agro_megatron.checkpoint.errors import CheckpointWriteError, CorruptCheckpointError, IncompatibleCheckpointError
    from agro_megatron.config import ConfigError
    from agro_megatron.train.run import run_job

    try:
        result = run_job(cfg)
    except (ConfigError, IncompatibleCheckpointError) as e:  # e.g. a resume at another layout (train/state.py)
        print(f"agro-train: {e}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, CorruptCheckpointError) as e:  # disk full, read-only, damaged (train/state.py)
        print(f"agro-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_process_groups()
    return STOPPED_EXIT_CODE if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
