"""`agro-train [CONFIG.yaml] [key=value ...]`: an AGRO run (default: the tiny CPU demo).

Exit status: 0 done, 2 bad configuration, 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after
saving a checkpoint: the run is not finished and the same command resumes it (slurm/train.sbatch
requeues the job on 75).
"""
from __future__ import annotations

import os
import sys

STOPPED_EXIT_CODE = 75

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nOverrides use dotted keys, e.g. train.steps=10 parallel.tp=2. "
              "Launch multi-process runs with torchrun --nproc-per-node N -m agro_megatron.train ...")
        return 0
    config = None
    if argv and "=" not in argv[0]:
        config = argv.pop(0)  # without a file, the built-in defaults are the tiny CPU demo
    import warnings

    # megatron-core announces every optional GPU dependency it falls back from; we choose those
    # fallbacks on purpose (README: Installing), so keep the console readable.
    for pattern in (r".*(Apex|Transformer Engine).* not installed.*", r".*full scope is deprecated.*",
                    r".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=pattern)
    from agro_megatron.config import ConfigError, JobConfig

    try:
        cfg = JobConfig.load(config, argv)
        cfg.validate()
    except (ConfigError, FileNotFoundError) as e:
        print(f"agro-train: {e}", file=sys.stderr)
        return 2
    from agro_megatron.train.run import run_job

    try:
        result = run_job(cfg)
    except ConfigError as e:
        print(f"agro-train: {e}", file=sys.stderr)
        return 2
    finally:
        from agro_megatron import parallel

        try:
            parallel.destroy()
        except Exception:
            pass
    return STOPPED_EXIT_CODE if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
