"""Load MATH / GSM8K problems from local files, saved HF ``datasets`` folders or the Hub.

One entry point, :func:`load_problems`. A malformed row stops the load with a message naming
the file and line (or row) and the fix; ``skip_malformed=True`` skips such rows instead and
warns once per row (:class:`MalformedRowWarning`), so bad data is never dropped silently.
A row that is not UTF-8 text is malformed like any other; a caller's ``check`` (e.g. a prompt
length limit) rejects rows the same way, so every rejected row is named by its location.
Each loaded Problem records that location in ``meta["where"]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .problem import MalformedRowError, MalformedRowWarning, Problem, problem_from_row

HUB_PREFIX = "hf:"
SKIP_OPTION = "skip_malformed=True (--skip-malformed)"


def load_problems(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    fmt: str = "auto",
    skip_malformed: bool = False,
    limit: int | None = None,
    check: Callable[[Problem], str | None] | None = None,
    skip_option: str = SKIP_OPTION,
) -> list[Problem]:
    """Problems from ``source``.

    ``source`` is one of:
      - a ``.jsonl`` file (one JSON object per line), a ``.json`` file (an array of objects, or
        JSON Lines as written by ``Dataset.to_json``), a ``.parquet`` file;
      - a folder written by ``datasets``' ``save_to_disk`` (``split`` picks from a DatasetDict);
      - ``hf:OWNER/NAME`` or ``hf:OWNER/NAME:CONFIG`` to call ``datasets.load_dataset`` (needs
        network and the ``datasets`` package; ``split`` defaults to "test").
    ``fmt`` is "auto" (per row: ``problem`` -> MATH, ``question``+``answer`` -> GSM8K), "math"
    or "gsm8k". ``limit`` keeps the first N valid problems. ``check(problem)`` returns None for a
    row to keep, or why it is rejected (handled like a malformed row). ``skip_option`` is how the
    caller's user turns on skipping (agro-train: ``data.skip_malformed=true``), named in errors.
    """
    if fmt not in ("auto", "math", "gsm8k"):
        raise ValueError(f"fmt must be 'auto', 'math' or 'gsm8k', got {fmt!r}")
    rows = _rows(source, split)
    problems: list[Problem] = []
    for where, default_id, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            problem = problem_from_row(row, default_id=default_id, fmt=fmt)
            problem = dataclasses.replace(problem, meta={**problem.meta, "where": where})
            reason = check(problem) if check is not None else None
            if reason:
                raise ValueError(reason)
            problems.append(problem)
        except ValueError as err:
            msg = f"{where}: malformed row: {err}"
            if not skip_malformed:
                raise MalformedRowError(f"{msg}; fix the row, or pass {skip_option} to skip such rows") from None
            warnings.warn(f"{msg} (skipped)", MalformedRowWarning, stacklevel=2)
    if not problems:
        raise ValueError(f"{source}: no problems loaded (empty source, or every row malformed)")
    return problems


def _rows(source: str | os.PathLike, split: str | None) -> Iterator[tuple[str, str, Any]]:
    """(location for messages, default id, row dict or the ValueError that parsing it raised)."""
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        return _hub_rows(text[len(HUB_PREFIX) :], split or "test")
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; to load from the Hugging Face Hub write "
            f"{HUB_PREFIX}OWNER/NAME[:CONFIG] (e.g. {HUB_PREFIX}HuggingFaceH4/MATH-500)"
        )
    if path.is_dir():
        return _saved_dataset_rows(path, split)
    suffix = path.suffix.lower()
    if split is not None:
        raise ValueError(f"{path}: split={split!r} only applies to dataset folders and hf: sources")
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


_BOM = b"\xef\xbb\xbf"


def _jsonl_rows(path: Path, data: bytes | None = None) -> Iterator:
    """One row per line, split on newline bytes only (JSON strings may hold U+2028 and the like),
    each decoded on its own: a line that is not UTF-8 is one malformed row, located."""
    if data is None:
        data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            row = ValueError(f"not UTF-8 text (byte {err.start + 1} of the line: {err.reason}); save the "
                             "file as UTF-8")
        except json.JSONDecodeError as err:
            row = ValueError(f"invalid JSON ({err.msg} at column {err.colno})")
        yield f"{path}:{lineno}", f"{path.stem}-{lineno}", row


def _json_rows(path: Path) -> Iterator:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data.lstrip().startswith(b"["):
        # Not an array: JSON Lines under a .json name (what datasets' to_json writes).
        return _jsonl_rows(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise MalformedRowError(f"{path}:{line}: not UTF-8 text ({err.reason}); the file cannot be read past "
                                "this point, so save it as UTF-8 (skip_malformed cannot skip it)") from None
    return _json_array_rows(path, text, len(text) - len(text.lstrip()))


def _json_array_rows(path: Path, text: str, start: int) -> Iterator:
    """Elements of a top-level JSON array, each located by the line where it begins."""
    decoder = json.JSONDecoder()
    pos, index = start + 1, 0

    def skip_blank(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_blank(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_blank(pos)
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise MalformedRowError(
                f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); the "
                "file cannot be read past this point, so fix it (skip_malformed cannot skip it)"
            ) from None
        yield f"{path}:{line}", f"{path.stem}-{index}", row
        index += 1
        pos = skip_blank(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            line = text.count("\n", 0, pos) + 1
            raise MalformedRowError(f"{path}:{line}: expected ',' or ']' in the JSON array; fix the file")


def _parquet_rows(path: Path) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from err
    table = pq.read_table(path)
    for index, row in enumerate(table.to_pylist()):
        yield f"{path} row {index}", f"{path.stem}-{index}", row


def _require_datasets(what: str):
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{what} needs the 'datasets' package: pip install datasets "
            "(or pip install 'agro-megatron[hf]'); or export the data to .jsonl/.parquet"
        ) from err
    return datasets


def _saved_dataset_rows(path: Path, split: str | None) -> Iterator:
    if not any((path / marker).exists() for marker in ("dataset_dict.json", "state.json")):
        raise ValueError(
            f"{path}: a folder must be a dataset saved with datasets' save_to_disk "
            "(it has dataset_dict.json or state.json); point at a .jsonl/.json/.parquet file instead"
        )
    datasets = _require_datasets(f"loading the saved dataset folder {path}")
    ds = datasets.load_from_disk(str(path))
    return _dataset_rows(ds, str(path), split)


def _hub_rows(spec: str, split: str) -> Iterator:
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"{HUB_PREFIX}{spec}: write {HUB_PREFIX}OWNER/NAME or {HUB_PREFIX}OWNER/NAME:CONFIG")
    datasets = _require_datasets(f"loading {HUB_PREFIX}{spec} from the Hub")
    ds = datasets.load_dataset(name, config or None, split=split)
    return _dataset_rows(ds, f"{HUB_PREFIX}{spec}", split)


def _dataset_rows(ds: Any, where: str, split: str | None) -> Iterator:
    if isinstance(ds, dict):  # DatasetDict / IterableDatasetDict subclass dict
        splits = sorted(ds.keys())
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{where}: holds splits {splits}; choose one with split=... (--split)")
            split = splits[0]
        if split not in ds:
            raise ValueError(f"{where}: no split {split!r}; it has {splits}")
        ds = ds[split]
    elif split is not None and not where.startswith(HUB_PREFIX):
        raise ValueError(f"{where}: holds one dataset without splits; drop split={split!r}")
    label = f"{where}[{split}]" if split else where
    stem = Path(where).name or where
    return ((f"{label} row {i}", f"{stem}-{i}", row) for i, row in enumerate(_iter(ds)))


def _iter(ds: Iterable) -> Iterator[dict]:
    for row in ds:
        yield dict(row)


def save_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> Path:
    """Write problems as MATH-format JSONL that :func:`load_problems` reads back unchanged."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in problems:
            row = {"id": p.id, "problem": p.problem, "solution": p.solution, "answer": p.answer,
                   "level": p.level, "subject": p.subject}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
