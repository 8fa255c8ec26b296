"""``agro-convert``: HF <-> Megatron-core checkpoint conversion (one plain CPU process, no torchrun).

    agro-convert import --hf DIR --out DIR --tp N --pp M [--dtype bf16|fp32] [--overwrite]
    agro-convert export --megatron DIR --out DIR [--max-shard-size 5GB] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agro-convert",
        description="Stream a Llama-3 checkpoint between Hugging Face safetensors and a Megatron-core "
        "torch_dist checkpoint sharded for TP x PP. Output is written to a temp dir and renamed at the end.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> Megatron-core checkpoint")
    imp.add_argument("--hf", required=True, help="HF checkpoint dir (config.json, *.safetensors, tokenizer files)")
    imp.add_argument("--out", required=True, help="output dir for the Megatron-core checkpoint")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is sharded for")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is sharded for")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                     help="weight dtype in the checkpoint (default: the source's)")
    exp = sub.add_parser("export", help="Megatron-core checkpoint -> HF checkpoint")
    exp.add_argument("--megatron", required=True, help="checkpoint dir written by `agro-convert import`")
    exp.add_argument("--out", required=True, help="output dir for the HF checkpoint")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    for sp in (imp, exp):
        sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agro_megatron.checkpoint.convert import export_hf, import_hf
    from agro_megatron.checkpoint.errors import ConversionError

    try:
        if args.command == "import":
            out = import_hf(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                            overwrite=args.overwrite, progress=not args.quiet)
        else:
            out = export_hf(args.megatron, args.out, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, progress=not args.quiet)
    except ConversionError as e:
        print(f"agro-convert: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a source file that cannot be read: named, without a traceback
        print(f"agro-convert: error: {type(e).__name__}: {e}; nothing was written", file=sys.stderr)
        return 1
    print(f"agro-convert: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
