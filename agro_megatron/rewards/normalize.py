"""MATH-convention answer normalisation and the exact numeric fast path.

``normalize`` rewrites an answer into a canonical LaTeX string the way the MATH benchmark's
graders do (Hendrycks et al. 2021; Lewkowycz et al. 2022): ``\\dfrac``->``\\frac``, no
``\\left``/``\\right``, spacing commands, thousands separators, degree signs, dollar and
percent signs or units, no ``x =`` prefix, mixed numbers as improper fractions. Two answers
whose canonical strings agree (ignoring whitespace) are equal without any SymPy work, and two
plain numbers are compared exactly with ``fractions.Fraction``; only the rest goes to the
sandboxed symbolic checker. This module runs in the trainer process on capped input, so it
uses only linear-time string operations and never evaluates anything.
"""
from __future__ import annotations

import re
from fractions import Fraction

from agro_megatron.rewards.extract import matching_brace

FLOAT_ROUNDING = 6
"""Decimal places a decimal answer is rounded to before comparing (math-verify's convention)."""

_THIN_SPACE = re.compile(r"(?<!\\)\\[!,]")  # negative / thin space: also a thousands separator, "1\\,000"
# A comma written as a thousands separator - "{,}" or ",\\!" (the comma's math spacing undone) -
# and the source spaces after it, which math mode ignores: "11,\\! 111" and "10{,} 000" are
# numbers, while a plain ", " still separates list items ("32, 349" is two numbers).
_SEPARATOR_COMMA = re.compile(r"\{,\}\s*|,\s*(?<!\\)\\!\s*")
_SPACING = re.compile(r"\\(?:displaystyle|textstyle|q?quad)(?![A-Za-z])|(?<!\\)\\[;: ]|[~\n\t]")
_FRAC_VARIANT = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_INVISIBLE_DELIM = re.compile(r"\\(?:left|right)\.")
_SIZE_CMD = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|°")
_TEXT_CMDS = r"(?:text|textrm|textnormal|textbf|textit|mbox|mathrm|mathbf|mathit|boldsymbol)"
_TRAILING_TEXT = re.compile(r"\\" + _TEXT_CMDS + r"\s*\{[^{}]*\}\s*(?:\^\s*\{?\s*\d\s*\}?)?\s*$")
_TEXT_WRAP = re.compile(r"\\" + _TEXT_CMDS + r"\s*\{([^{}]*)\}")
_UNIT_WORDS = (
    "mm|cm|m|km|in|inch|inches|ft|foot|feet|yd|yard|yards|mile|miles|meter|meters|metre|metres|"
    "centimeter|centimeters|millimeter|millimeters|kilometer|kilometers|unit|units|"
    "square units|square feet|square inches|square meters|square centimeters|sq units|"
    "cubic units|cubic feet|cubic inches|cubic centimeters|degree|degrees|dollar|dollars|"
    "cent|cents|second|seconds|minute|minutes|hour|hours|day|days|week|weeks|month|months|"
    "year|years|pound|pounds|lb|lbs|ounce|ounces|oz|gram|grams|kg|kilograms|liter|liters|"
    "litre|litres|gallon|gallons|mph|percent"
)
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s+(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?\d\}?)?\s*$")
_VAR_PREFIX = re.compile(r"^\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?=[^=]+$)")
_CHOICE = re.compile(r"^\(\s*([A-Ea-e])\s*\)$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d|\{)")
_FRAC_HALF_SHORT = re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9A-Za-z])")
_MIXED = re.compile(r"^([+-]?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_LEADING_DOT = re.compile(r"(^|[^\d}])\.(\d)")
_WS = re.compile(r"\s+")
_BOX_CMD = re.compile(r"^\\(?:boxed|fbox)\s*\{")

_INT = re.compile(r"^[+-]?\d+$")
_DEC = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+)$")
_SLASH = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")


def _outer_brace_wrapped(s: str, open_at: int) -> bool:
    """Whether the brace at ``open_at`` closes exactly at the end of ``s``."""
    return matching_brace(s, open_at) == len(s) - 1


def _unwrap_outer(s: str) -> str:
    """Strip math delimiters, a whole-answer ``\\boxed{}`` and whole-answer braces."""
    for _ in range(8):
        before = s
        s = s.strip()
        for opener, closer in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            if len(s) > len(opener) + len(closer) - 1 and s.startswith(opener) and s.endswith(closer):
                s = s[len(opener):len(s) - len(closer)].strip()
                break
        m = _BOX_CMD.match(s)
        if m and _outer_brace_wrapped(s, m.end() - 1):
            s = s[m.end():-1]
        if s.startswith("{") and _outer_brace_wrapped(s, 0):
            s = s[1:-1]
        if s == before:
            break
    return s


def normalize(answer: str) -> str:
    """Canonical LaTeX form of ``answer`` under MATH grading conventions (whitespace kept single)."""
    s = _unwrap_outer(answer)
    s = _SEPARATOR_COMMA.sub(",", s)
    s = _THIN_SPACE.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _FRAC_VARIANT.sub(r"\\frac", s)
    s = _INVISIBLE_DELIM.sub("", s)
    s = _SIZE_CMD.sub("", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    for _ in range(2):  # "5\text{ cm}^2", "\$5\text{ per}\text{ hour}"
        rest = _TRAILING_TEXT.sub("", s)
        if rest.strip() and rest != s:
            s = rest
    for _ in range(4):  # innermost first: \text{\textbf{odd}}
        s2 = _TEXT_WRAP.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    rest = _TRAILING_UNIT.sub("", s)
    if rest.strip():
        s = rest
    s = _unwrap_outer(s)
    s = _VAR_PREFIX.sub("", s, count=1)
    s = _WS.sub(" ", s).strip().rstrip(".").strip()
    m = _CHOICE.match(s)
    if m:
        s = m.group(1).upper()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = _FRAC_SHORT.sub(lambda m: "\\frac{" + m.group(1) + "}" + ("{" if m.group(2) == "{" else "{" + m.group(2) + "}"), s)
    s = _FRAC_HALF_SHORT.sub(r"\\frac\1{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    m = _MIXED.match(s)
    if m and int(m.group(3)) < int(m.group(4)):
        sign, whole, num, den = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{'-' if sign == '-' else ''}\\frac{{{whole * den + num}}}{{{den}}}"
    s = _LEADING_DOT.sub(r"\g<1>0.\2", s)
    return _unwrap_outer(s)


def compare_key(canonical: str) -> str:
    """What two canonical answers must share to be equal as strings: no whitespace at all."""
    return _WS.sub("", canonical)


def as_number(canonical: str) -> tuple[Fraction, bool] | None:
    """(exact value, written as a decimal) when ``canonical`` is a plain number, else None.

    Plain numbers: integers, decimals, ``a/b`` and ``\\frac{a}{b}`` with integer a, b != 0.
    """
    s = canonical.replace(" ", "")
    if _INT.match(s):
        return Fraction(int(s)), False
    if _DEC.match(s):
        return Fraction(s), True
    m = _SLASH.match(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return (Fraction(num, den), False) if den else None
    m = _FRAC.match(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if not den:
            return None
        value = Fraction(num, den)
        return (-value if m.group(1) == "-" else value), False
    return None


def numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """Exact equality, or equality after rounding to FLOAT_ROUNDING places if either is a decimal."""
    (x, x_dec), (y, y_dec) = a, b
    if x_dec or y_dec:
        return round(x, FLOAT_ROUNDING) == round(y, FLOAT_ROUNDING)
    return x == y


def as_numbers(canonical: str) -> tuple[str, list[tuple[Fraction, bool]]] | None:
    """(shape, plain numbers) for a set, list, tuple or interval of plain numbers, else None.

    Shape ``"set"`` for ``\\{a, b\\}`` and bare lists ``a, b`` (solutions: order-free), or the
    bracket pair, e.g. ``"(]"``, for tuples and intervals (ordered).
    """
    s = canonical.replace(" ", "")
    if s.startswith("\\{") and s.endswith("\\}"):
        shape, inner = "set", s[2:-2]
    elif len(s) > 1 and s[0] in "([" and s[-1] in ")]":
        shape, inner = s[0] + s[-1], s[1:-1]
    elif "," in s:
        shape, inner = "set", s
    else:
        return None
    values = [as_number(part) for part in inner.split(",")]
    if not inner or any(v is None for v in values):
        return None
    return shape, values


def structures_equal(a, b) -> bool | None:
    """Verdict for two ``as_numbers`` results of the same shape; None (undecided) otherwise."""
    (shape_a, xs), (shape_b, ys) = a, b
    if (shape_a == "set") != (shape_b == "set"):
        return None  # "3" vs "{3}", "(1, 2)" vs "1, 2": SymPy's conventions decide
    if shape_a == "set":
        if any(dec for _, dec in xs + ys):
            return None  # pairing rounded decimals with set elements is SymPy's job
        return {x for x, _ in xs} == {y for y, _ in ys}
    return shape_a == shape_b and len(xs) == len(ys) and all(map(numbers_equal, xs, ys))


def nesting_depth(s: str) -> int:
    """Deepest bracket nesting in ``s`` (any of ``{([``); parsers recurse once per level."""
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            if depth > best:
                best = depth
        elif c in "})]" and depth:
            depth -= 1
    return best
