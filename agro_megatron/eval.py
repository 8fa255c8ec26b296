"""Evaluation harness: accuracy, unbiased pass@k, response length, per-level/subject tables.

The model is only a callable, ``generate_fn(prompts, n, temperature) -> [[response] * n] per
prompt``, so any rollout engine (or a file of precomputed responses) plugs in. Scoring defaults
to the MATH reward (``agro_megatron.rewards.math.score_batch``), imported on first use.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .data.problem import Problem
from .data.prompt import FINAL_ANSWER_MARKER, SYSTEM_PROMPT, format_prompt
from .study.stats import pass_at_k  # noqa: F401  (one home for pass@k; eval re-exports it)

GenerateFn = Callable[[list[str], int, float], list[list[str]]]
ScoreFn = Callable[[list[str], list[str]], list[float]]

CORRECT_THRESHOLD = 0.5  # a sample counts as correct for pass@k when its reward exceeds this
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A folder holding any of these can be a tokenizer folder (transformers' AutoTokenizer)."""


class EvalInputError(ValueError):
    """Bad input to an evaluation, found before any work: the message names the option or file
    and the fix."""


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, not after generating and scoring, if the report cannot be written to ``path``:
    it must not be a directory, and its folder must exist (or be creatable) and accept files."""
    out = Path(path)
    if out.is_dir():
        raise EvalInputError(f"--out {out} is a directory: give a file path, e.g. {out / 'eval.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise EvalInputError(f"--out {out} cannot be written ({err.strerror or err}): choose a writable path "
                             "or fix the folder's permissions") from None
    return out


def tokenizer_dir(model_dir: str | os.PathLike | None, tokenizer: str | os.PathLike | None) -> str | None:
    """The tokenizer folder for ``--model``/``--tokenizer``: ``tokenizer`` if given, else the model
    folder (or its ``hf_assets/``, where ``agro-convert import`` copies them); an EvalInputError
    when that folder holds no tokenizer files."""
    if tokenizer is None and model_dir is None:
        return None
    if tokenizer is not None:
        where, option = os.fspath(tokenizer), "--tokenizer"
    else:
        where, option = os.fspath(model_dir), "--model"
        if os.path.isdir(os.path.join(where, "hf_assets")):
            where = os.path.join(where, "hf_assets")  # a checkpoint written by agro-convert
    if not os.path.isdir(where):
        raise EvalInputError(f"{option} {where}: not a folder with tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    if not any(os.path.exists(os.path.join(where, f)) for f in TOKENIZER_FILES):
        raise EvalInputError(
            f"{option} {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass --tokenizer DIR "
            "with the model's tokenizer (e.g. the HF checkpoint it was converted from)")
    return where


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EvalInputError(f"batch_size (--batch-size) must be an integer >= 1, got {batch_size!r}")
    return batch_size


def default_score_fn(*, timeout_s: float | None = None, workers: int | None = None) -> ScoreFn:
    """The MATH reward's batch scorer, with only the options the caller set."""
    try:
        from .rewards.math import score_batch, warm
    except ImportError as err:
        raise ImportError(
            "the default scorer needs agro_megatron.rewards.math.score_batch, which failed to "
            f"import ({err}); pass score_fn=... to score with something else"
        ) from err
    options = {k: v for k, v in (("timeout_s", timeout_s), ("workers", workers)) if v is not None}
    warm(workers=workers, wait=False)  # the sandbox starts while the model loads and generates
    return lambda responses, truths: score_batch(responses, truths, **options)


def rollout_factory() -> Callable[..., GenerateFn]:
    """Where a ``--model DIR`` run finds its engine: ``agro_megatron.rollout.make_generate_fn``
    (``make_generate_fn(model_dir, **options)`` returns a GenerateFn; options passed: engine,
    max_new_tokens, seed, tokenizer (may be None)), or a RuntimeError saying why it is missing.
    Imported on first use: the rollout package brings torch and megatron-core with it."""
    try:
        from .rollout import make_generate_fn
    except ImportError as err:
        raise RuntimeError(
            "evaluating a model folder needs agro_megatron.rollout.make_generate_fn(model_dir, "
            f"**options) -> generate_fn, which this install does not provide ({err}); generate "
            "responses another way and pass them with --responses FILE"
        ) from err
    return make_generate_fn


def generate_fn_from_model(model_dir: str | os.PathLike, **options: Any) -> GenerateFn:
    """A GenerateFn for a checkpoint folder, from the rollout package's factory."""
    return rollout_factory()(os.fspath(model_dir), **options)


@dataclass
class GroupStats:
    """Metrics over a set of problems; accuracy is the mean reward over every sample."""

    num_problems: int
    num_samples: int
    accuracy: float
    pass_at_k: dict[int, float]
    mean_length: float
    marker_rate: float  # share of responses containing "The final answer is"


@dataclass
class EvalReport:
    config: dict[str, Any]
    overall: GroupStats
    by_level: dict[str, GroupStats]
    by_subject: dict[str, GroupStats]
    problems: list[dict[str, Any]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        def stats(s: GroupStats) -> dict[str, Any]:
            d = dict(vars(s))
            d["pass_at_k"] = {str(k): v for k, v in s.pass_at_k.items()}
            return d

        return {
            "config": self.config,
            "overall": stats(self.overall),
            "by_level": {k: stats(v) for k, v in self.by_level.items()},
            "by_subject": {k: stats(v) for k, v in self.by_subject.items()},
            "problems": self.problems,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        return out

    def format_table(self) -> str:
        ks = list(self.config["k_values"])
        unit = self.config["length_unit"]
        header = ["group", "problems", "samples", "accuracy", *[f"pass@{k}" for k in ks], f"len({unit})", "marker"]
        rows = [("all", self.overall)]
        rows += [(f"level {k}", v) for k, v in self.by_level.items()]
        rows += [(f"subject {k}", v) for k, v in self.by_subject.items()]
        cells = [header] + [
            [name, str(s.num_problems), str(s.num_samples), f"{s.accuracy:.4f}",
             *[f"{s.pass_at_k[k]:.4f}" for k in ks], f"{s.mean_length:.1f}", f"{s.marker_rate:.3f}"]
            for name, s in rows
        ]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="problem", disable=not enabled)


def _check_k(k_values: Sequence[int], min_n: int) -> list[int]:
    ks = sorted(set(int(k) for k in k_values))
    if not ks or ks[0] < 1 or ks[-1] > min_n:
        raise ValueError(
            f"k_values {list(k_values)} must lie in 1..n, and the smallest number of responses per "
            f"problem is {min_n}; sample more responses (n) or lower k"
        )
    return ks


def _lengths(responses: list[str], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [len(r) for r in responses]
    if not responses:
        return []
    return [len(ids) for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]


def _record(problem: Problem, responses: list[str], scores: list[float], lengths: list[int], keep: bool) -> dict:
    record = {
        "id": problem.id, "level": problem.level, "subject": problem.subject, "answer": problem.answer,
        "n": len(responses), "num_correct": sum(s > CORRECT_THRESHOLD for s in scores),
        "scores": [float(s) for s in scores], "lengths": lengths,
        "markers": sum(FINAL_ANSWER_MARKER.lower() in r.lower() for r in responses),
    }
    if keep:
        record["responses"] = list(responses)
    return record


def _group(records: list[dict], ks: list[int]) -> GroupStats:
    samples = sum(r["n"] for r in records)
    return GroupStats(
        num_problems=len(records),
        num_samples=samples,
        accuracy=math.fsum(s for r in records for s in r["scores"]) / samples,
        pass_at_k={k: math.fsum(pass_at_k(r["n"], r["num_correct"], k) for r in records) / len(records) for k in ks},
        mean_length=math.fsum(x for r in records for x in r["lengths"]) / samples,
        marker_rate=sum(r["markers"] for r in records) / samples,
    )


def _by(records: list[dict], key: str, ks: list[int]) -> dict[str, GroupStats]:
    groups: dict[Any, list[dict]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    order = sorted(groups, key=lambda g: (g is None, str(g) if not isinstance(g, int) else f"{g:09d}"))
    return {("unknown" if g is None else str(g)): _group(groups[g], ks) for g in order}


def _report(records: list[dict], ks: list[int], config: dict) -> EvalReport:
    if not records:
        raise ValueError("nothing to evaluate: no problems")
    return EvalReport(config, _group(records, ks), _by(records, "level", ks), _by(records, "subject", ks), records)


def _score_chunk(problems, responses, score_fn, tokenizer, keep) -> list[dict]:
    flat = [r for rs in responses for r in rs]
    truths = [p.answer for p, rs in zip(problems, responses) for _ in rs]
    scores = list(score_fn(flat, truths))
    if len(scores) != len(flat):
        raise ValueError(f"score_fn returned {len(scores)} scores for {len(flat)} responses")
    lengths = _lengths(flat, tokenizer)
    records, pos = [], 0
    for p, rs in zip(problems, responses):
        m = len(rs)
        records.append(_record(p, rs, scores[pos : pos + m], lengths[pos : pos + m], keep))
        pos += m
    return records


def score_responses(
    problems: Sequence[Problem],
    responses: Sequence[Sequence[str]],
    *,
    k_values: Sequence[int] = (1,),
    score_fn: ScoreFn | None = None,
    tokenizer: Any = None,
    temperature: float | None = None,
    batch_size: int = 64,
    keep_responses: bool = False,
    progress: bool = True,
    timeout_s: float | None = None,
    workers: int | None = None,
) -> EvalReport:
    """Score precomputed responses (``responses[i]`` answers ``problems[i]``; counts may differ)."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} response lists")
    empty = [p.id for p, rs in zip(problems, responses) if not rs]
    if empty:
        raise ValueError(f"no responses for problems {empty[:5]}{' ...' if len(empty) > 5 else ''}")
    ks = _check_k(k_values, min((len(rs) for rs in responses), default=1))
    _check_batch_size(batch_size)
    score_fn = score_fn or default_score_fn(timeout_s=timeout_s, workers=workers)
    records: list[dict] = []
    with _progress(len(problems), "scoring", progress) as bar:
        for start in range(0, len(problems), batch_size):
            chunk = slice(start, start + batch_size)
            records += _score_chunk(problems[chunk], [list(r) for r in responses[chunk]], score_fn, tokenizer, keep_responses)
            bar.update(len(problems[chunk]))
    return _report(records, ks, _config(records, ks, temperature, tokenizer))


def _config(records, ks, temperature, tokenizer) -> dict:
    ns = sorted({r["n"] for r in records})
    return {
        "num_problems": len(records), "n": ns[0] if len(ns) == 1 else ns, "temperature": temperature,
        "k_values": ks, "length_unit": "chars" if tokenizer is None else "tokens",
        "correct_threshold": CORRECT_THRESHOLD,
    }


def evaluate(
    generate_fn: GenerateFn,
    problems: Sequence[Problem],
    *,
    n: int = 1,
    temperature: float = 1.0,
    k_values: Sequence[int] = (1,),
    score_fn: ScoreFn | None = None,
    tokenizer: Any = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    prompt_fn: Callable[[Problem], str] | None = None,
    batch_size: int = 64,
    keep_responses: bool = False,
    progress: bool = True,
    timeout_s: float | None = None,
    workers: int | None = None,
) -> EvalReport:
    """Sample ``n`` responses per problem at ``temperature`` and score them.

    Prompts come from ``prompt_fn(problem)`` or else :func:`format_prompt` with ``tokenizer``
    (its chat template when it has one). Response length is in tokens when ``tokenizer`` is
    given, else in characters (``config["length_unit"]`` says which).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = _check_k(k_values, n)
    _check_batch_size(batch_size)
    score_fn = score_fn or default_score_fn(timeout_s=timeout_s, workers=workers)
    make_prompt = prompt_fn or (lambda p: format_prompt(p, tokenizer, system_prompt=system_prompt))
    records: list[dict] = []
    with _progress(len(problems), "eval", progress) as bar:
        for start in range(0, len(problems), batch_size):
            chunk = list(problems[start : start + batch_size])
            prompts = [make_prompt(p) for p in chunk]
            out = generate_fn(prompts, n, temperature)
            _check_generated(out, len(prompts), n)
            records += _score_chunk(chunk, [list(rs) for rs in out], score_fn, tokenizer, keep_responses)
            bar.update(len(chunk))
    return _report(records, ks, _config(records, ks, temperature, tokenizer))


def _check_generated(out: Any, num_prompts: int, n: int) -> None:
    if not isinstance(out, (list, tuple)) or len(out) != num_prompts:
        got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
        raise ValueError(f"generate_fn returned {got} for {num_prompts} prompts; it must return one list of n responses per prompt")
    for i, rs in enumerate(out):
        if isinstance(rs, str) or len(rs) != n or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"generate_fn output for prompt {i} is not a list of {n} strings")


def load_responses(path: str | os.PathLike, problems: Sequence[Problem]) -> list[list[str]]:
    """Responses per problem from JSONL lines ``{"id": ..., "responses": [...]}``
    (``"response": "..."`` for one), matched to ``problems`` by id."""
    path = Path(path)
    by_id: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg}); fix the line") from None
            rs = row.get("responses", [row["response"]] if "response" in row else None) if isinstance(row, dict) else None
            if not isinstance(row, dict) or "id" not in row or not isinstance(rs, list) or not all(isinstance(r, str) for r in rs):
                raise ValueError(f'{where}: expected {{"id": ..., "responses": ["...", ...]}}')
            by_id.setdefault(str(row["id"]), []).extend(rs)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids are not unique, so responses cannot be matched; give each row an 'id'")
    missing = [i for i in ids if i not in by_id]
    extra = sorted(set(by_id) - set(ids))
    if missing or extra:
        raise ValueError(
            f"{path}: responses do not match the data: missing ids {missing[:5]}, unknown ids "
            f"{extra[:5]}; check that --data and --responses belong together"
        )
    return [by_id[i] for i in ids]
