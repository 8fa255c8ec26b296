"""`agro-sft CONFIG.yaml [key=value ...]`: only the SFT warm-up stage of a job.

Trains cfg.sft.steps steps from the job's starting weights and saves the model where agro-train
looks for it, <logging.dir>/sft_model, so a later `agro-train` of the same config (and logging.dir)
skips SFT and starts RL from it. When that model already exists nothing is trained. The last
line printed is the model's path. Multi-process: torchrun --nproc-per-node N -m agro_megatron.cli.sft ...

Exit status: 0 done, 2 bad configuration (or launcher environment), 1 a checkpoint that cannot be
written or read (the message says which and why), 75 stopped by SIGTERM/SIGUSR1 with the SFT state
saved: the same command resumes it.
"""
from __future__ import annotations

import sys

from agro_megatron.cli.job import destroy_process_groups, load_job_config


def main(argv: list[str] | None = None) -> int:
    cfg = load_job_config(sys.argv[1:] if argv is None else argv, prog="agro-sft", doc=__doc__,
                          help_tail="Overrides use dotted keys, e.g. sft.steps=100 logging.dir=runs/x.")
    if isinstance(cfg, int):
        return cfg
    from agro_megatron import parallel
    from agro_megatron.checkpoint.errors import CheckpointWriteError, CorruptCheckpointError
    from agro_megatron.cli.train import STOPPED_EXIT_CODE
    from agro_megatron.config import ConfigError
    from agro_megatron.train.loop import StopRequested

    if cfg.sft.steps <= 0:
        print(f"agro-sft: sft.steps={cfg.sft.steps}: agro-sft runs the SFT warm-up only and has nothing to train; "
              "set sft.steps > 0 (e.g. sft.steps=300), or run agro-train, which skips SFT when sft.steps=0",
              file=sys.stderr)
        return 2
    try:
        try:
            parallel.init_distributed(timeout_minutes=cfg.parallel.timeout_minutes)
        except RuntimeError as e:  # a partial launcher environment; the message says the fix
            print(f"agro-sft: {e}", file=sys.stderr)
            return 2
        path = run_sft_only(cfg)
        first = parallel.rank() == 0
    except ConfigError as e:
        print(f"agro-sft: {e}", file=sys.stderr)
        return 2
    except StopRequested:  # SIGTERM/SIGUSR1: the SFT state is saved and the message printed (train/sft.py)
        return STOPPED_EXIT_CODE
    except (CheckpointWriteError, CorruptCheckpointError) as e:  # disk full, read-only, damaged (train/state.py)
        print(f"agro-sft: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_process_groups()
    if first:
        print(path, flush=True)  # after every rank finished: the last line
    return 0


def run_sft_only(cfg) -> str:
    """agro-train's start-up (train/run.py start_job) and its SFT stage; returns the model's path
    once every rank finished."""
    import torch.distributed as dist

    from agro_megatron.train.run import run_sft_stage, start_job

    path = run_sft_stage(start_job(cfg))
    dist.barrier()
    return path


if __name__ == "__main__":
    sys.exit(main())
