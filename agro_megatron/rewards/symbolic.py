"""Symbolic equivalence of two canonical answers: LaTeX -> SymPy -> math-verify's comparison.

Runs ONLY inside a sandbox worker process (``sandbox.py``): SymPy can take unbounded time and
memory on hostile input (power towers, huge factorials), and only a process can be stopped
from outside. Parsing uses latex2sympy2_extended's ANTLR grammar, which builds SymPy objects
node by node (``evaluate=False``); we deliberately bypass ``math_verify.parse``, whose plain-
expression fallback hands regex-matched text to ``sympy.parse_expr``. The grammar's numeric
literals do reach ``sympy.Number(str)`` (which calls ``sympify``), but the lexer admits only
digits there; the worker's audit hook enforces that no other text is ever compiled.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, latex2sympy
from math_verify import verify
from math_verify.grader import should_treat_as_complex

# latex2sympy's own clean-up on top of ours. units=False: its unit list strips single letters
# after a number ("3t" -> "3", "5 m" -> "5"), which would accept wrong algebraic answers;
# normalize.py handles units conservatively instead.
_CONFIG = NormalizationConfig(
    basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
)
# A standalone i ("3+4i", "2i", "i\\cdot 2") is the imaginary unit; math-verify's detector
# misses "2i" (no word boundary), so both answers are parsed as complex if either has one.
_IMAGINARY = re.compile(r"(?<![A-Za-z\\])i(?![A-Za-z])")
FLOAT_ROUNDING = 6
NUMERIC_PRECISION = 15

# verify(timeout_seconds=None) warns once that no timeout is set: the sandbox provides it.
logging.getLogger("math_verify").setLevel(logging.ERROR)
logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)


def _last_equation(latex: str) -> str:
    """Right-hand side of an equation chain "a = b = 5" (not of "a=1, b=2")."""
    if "," in latex or ";" in latex:
        return latex
    parts = latex.split("=")
    return parts[-1] if len(parts) > 2 else latex


def is_complex(latex: str) -> bool:
    return bool(_IMAGINARY.search(latex)) or should_treat_as_complex(latex)


@lru_cache(maxsize=4096)
def parse(latex: str, complex_: bool = False):
    """SymPy object for a canonical LaTeX answer, or None when it does not parse.

    Symbols are real unless ``complex_`` (then ``i`` is the imaginary unit).
    """
    for candidate in dict.fromkeys((latex, _last_equation(latex))):
        try:
            return latex2sympy(
                candidate,
                is_real=not complex_,
                convert_degrees=False,
                normalization_config=_CONFIG,
            )
        except Exception:  # the grammar rejects it: try the next form
            continue
    return None


def equivalent(pred: str, gold: str) -> bool:
    """Whether canonical answers ``pred`` and ``gold`` denote the same mathematical object."""
    complex_ = is_complex(pred) or is_complex(gold)
    g = parse(gold, complex_)
    if g is None:
        return False
    p = parse(pred, complex_)
    if p is None:
        return False
    # allow_set_relation_comp: "x < 3" answers "(-\\infty, 3)" as well as the reverse.
    return bool(verify(g, p, float_rounding=FLOAT_ROUNDING, numeric_precision=NUMERIC_PRECISION,
                       allow_set_relation_comp=True, timeout_seconds=None))
