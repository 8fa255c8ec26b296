#!/usr/bin/env python
"""HF <-> Megatron-core checkpoint conversion; the same as the `agro-convert` console script.

    python tools/convert_checkpoint.py import --hf DIR --out DIR --tp 2 --pp 2
    python tools/convert_checkpoint.py export --megatron DIR --out DIR
"""
import sys

from agro_megatron.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
