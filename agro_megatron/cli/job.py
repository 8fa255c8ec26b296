"""What the job commands (agro-train, agro-sft) share: reading `[CONFIG.yaml] [key=value ...]` into a
validated JobConfig, or the exit code that ends the command, and leaving the process groups."""
from __future__ import annotations

import sys


def load_job_config(argv: list[str], *, prog: str, doc: str, help_tail: str):
    """The validated JobConfig, or an exit code: 0 after --help, 2 after printing a config error.

    Without a file the built-in defaults are the tiny CPU demo. Also silences megatron-core's
    notices about the optional GPU dependencies it falls back from: we choose those fallbacks on
    purpose (README: Installing), so the console stays readable.
    """
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(doc.strip() + "\n\n" + help_tail)
        return 0
    config = argv.pop(0) if argv and "=" not in argv[0] else None
    import warnings

    for pattern in (r".*(Apex|Transformer Engine).* not installed.*", r".*full scope is deprecated.*",
                    r".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=pattern)
    from agro_megatron.config import ConfigError, JobConfig

    try:
        return JobConfig.load(config, argv).validate()
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def destroy_process_groups() -> None:
    """Leave megatron's and torch's process groups, whatever state a failed job left them in."""
    from agro_megatron import parallel

    try:
        parallel.destroy()
    except Exception:
        pass
