"""``agro-eval``: score a model, or precomputed responses, on a MATH/GSM8K split."""
from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agro-eval",
        description="Accuracy, pass@k and response length on a MATH-format dataset, overall and "
        "per level/subject. Prints a table; --out writes JSON.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help=".jsonl/.json/.parquet file, a save_to_disk folder, or hf:OWNER/NAME[:CONFIG]")
    data.add_argument("--split", default=None, help="split of a dataset folder or hf: source (hf: default: test)")
    data.add_argument("--format", default="auto", choices=("auto", "math", "gsm8k"), dest="fmt")
    data.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N problems")
    data.add_argument("--skip-malformed", action="store_true", help="skip malformed rows (each is reported) instead of failing")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--responses", help='JSONL of precomputed responses: {"id": ..., "responses": [...]} per problem')
    src.add_argument("--model", help="checkpoint folder, generated with agro_megatron.rollout's engine")
    gen = p.add_argument_group("generation (--model)")
    gen.add_argument("--n", type=_positive_int, default=1, help="responses per problem")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0 with --model; recorded only with --responses)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=1024)
    gen.add_argument("--engine", default="native", choices=["native", "vllm"], help="rollout engine for --model")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=_positive_int, default=64, help="problems per generate/score call")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder: prompt template and lengths in tokens (default: --model)")
    p.add_argument("--k", type=_positive_int, nargs="+", default=None, help="pass@k values (default: 1 and n)")
    p.add_argument("--workers", type=_positive_int, default=None, help="reward worker processes")
    p.add_argument("--timeout-s", type=_positive_float, default=None, help="time limit per answer check")
    p.add_argument("--out", default=None, help="write the full report (per problem too) as JSON here")
    p.add_argument("--save-responses", action="store_true", help="include the responses in the JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agro_megatron.data import load_problems, load_tokenizer
    from agro_megatron import eval as harness

    try:
        # every input checked before any work: the output path, the engine, the tokenizer files
        if args.out:
            harness.check_output_file(args.out)
        if args.model:
            harness.rollout_factory()
        tok_dir = harness.tokenizer_dir(args.model, args.tokenizer)
        problems = load_problems(args.data, split=args.split, fmt=args.fmt, skip_malformed=args.skip_malformed, limit=args.limit)
        tokenizer = load_tokenizer(tok_dir) if tok_dir else None
        common = dict(score_fn=None, tokenizer=tokenizer, batch_size=args.batch_size, keep_responses=args.save_responses,
                      progress=not args.no_progress, timeout_s=args.timeout_s, workers=args.workers)
        if args.responses:
            responses = harness.load_responses(args.responses, problems)
            n_min = min(len(r) for r in responses)
            ks = args.k or sorted({1, n_min})
            report = harness.score_responses(problems, responses, k_values=ks, temperature=args.temperature, **common)
        else:
            temperature = 1.0 if args.temperature is None else args.temperature
            generate_fn = harness.generate_fn_from_model(
                args.model, engine=args.engine, max_new_tokens=args.max_new_tokens, seed=args.seed, tokenizer=tokenizer)
            ks = args.k or sorted({1, args.n})
            report = harness.evaluate(generate_fn, problems, n=args.n, temperature=temperature, k_values=ks, **common)
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        print(f"agro-eval: error: {err}", file=sys.stderr)
        return 2
    report.config["data"] = args.data
    report.config["source"] = args.responses or args.model
    print(report.format_table())
    if args.out:
        try:
            print(f"wrote {report.save_json(args.out)}")
        except OSError as err:  # e.g. the disk filled up since the check
            print(f"agro-eval: error: writing --out {args.out} failed ({err.strerror or err}); the table above "
                  "is the result: free space or choose another --out and run again", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
