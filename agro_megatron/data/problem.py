"""The one in-memory shape of a maths problem, and how its ground truth is read from raw rows.

Every source (MATH, GSM8K, synthetic) becomes a :class:`Problem`, so prompts, rewards and the
eval harness never see dataset-specific field names.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from agro_megatron.rewards.extract import boxed_answer, last_boxed

__all__ = ["MalformedRowError", "MalformedRowWarning", "Problem", "boxed_answer", "detect_format",
           "last_boxed", "parse_level", "problem_from_row", "split_gsm8k_answer"]


@dataclass(frozen=True)
class Problem:
    """A problem with its exact ground-truth answer (a LaTeX string, MATH style)."""

    id: str
    problem: str
    answer: str
    solution: str | None = None
    level: int | None = None  # 1 (easiest) .. 5 (hardest) in MATH; None when unknown
    subject: str | None = None  # MATH's "type"/"subject", e.g. "Algebra"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MalformedRowError(ValueError):
    """A row that cannot become a Problem; the message names where it is and how to fix it."""


class MalformedRowWarning(UserWarning):
    """Emitted once per skipped row when loading with ``skip_malformed=True``."""


_GSM8K_MARK = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """GSM8K's ``answer`` field -> (worked solution, final answer).

    The final answer is what follows the last ``####``; thousands separators are dropped and the
    ``<<48/2=24>>`` calculator annotations are removed from the solution (they are tool traces,
    not prose a model should imitate). Raises ValueError when there is no ``#### N``.
    """
    idx = answer.rfind("####")
    if idx == -1:
        raise ValueError("no '#### <answer>' marker in the GSM8K answer field")
    final = answer[idx + 4 :].strip()
    if not final:
        raise ValueError("empty answer after '####'")
    if _THOUSANDS.match(final):
        final = final.replace(",", "")
    solution = _CALCULATOR.sub("", answer[:idx]).strip()
    return solution, final


def parse_level(value: Any) -> int | None:
    """``5``, ``"5"``, ``"Level 5"`` -> 5; ``None``/``"Level ?"`` -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _first(row: dict, *keys: str) -> Any:
    """The first of ``keys`` with a value; tabular sources fill absent fields with None."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def detect_format(row: dict) -> str:
    """"math" when the row has ``problem``, "gsm8k" when it has ``question`` and ``answer``."""
    if row.get("problem") is not None:
        return "math"
    if row.get("question") is not None and row.get("answer") is not None:
        return "gsm8k"
    raise ValueError(
        f"cannot tell the format from fields {sorted(row)}: a MATH row needs 'problem' and "
        "'solution' or 'answer'; a GSM8K row needs 'question' and 'answer' ('... #### N')"
    )


def problem_from_row(row: Any, *, default_id: str, fmt: str = "auto") -> Problem:
    """One raw row (a dict) -> Problem; raises ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object per row, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
    rid = _first(row, "unique_id", "id")
    rid = default_id if rid is None else str(rid)
    if fmt == "gsm8k":
        question, raw = _text(row, "question"), _text(row, "answer")
        if not question or not question.strip():
            raise ValueError("missing or empty 'question'")
        if raw is None:
            raise ValueError("missing 'answer'")
        solution, answer = split_gsm8k_answer(raw)
        return Problem(rid, question.strip(), answer, solution or None, None, "gsm8k")
    if fmt != "math":
        raise ValueError(f"unknown format {fmt!r}; use 'auto', 'math' or 'gsm8k'")
    problem, solution = _text(row, "problem"), _text(row, "solution")
    if not problem or not problem.strip():
        raise ValueError("missing or empty 'problem'")
    answer = _text(row, "answer")
    if answer is None or not answer.strip():
        # the reward's own box parser, so ground truth and responses are read alike
        answer = boxed_answer(solution) if solution else None
        if not answer:
            why = "no \\boxed{...} with balanced braces in 'solution'" if solution else "no 'solution'"
            raise ValueError(f"no ground truth: missing 'answer' and {why}")
    subject = _first(row, "subject", "type")
    return Problem(
        id=rid,
        problem=problem.strip(),
        answer=answer.strip(),
        solution=solution,
        level=parse_level(row.get("level")),
        subject=None if subject is None else str(subject),
    )
