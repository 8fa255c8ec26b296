"""Synthetic MATH-format problems with exact answers, for the CPU demo and tests.

Four mixed kinds (arithmetic, fractions, linear equations, word problems) at difficulty levels
1-5. Level 1 is single-digit addition only, which a tiny transformer can learn after a short SFT
warm-up; the worked solutions are one or two short steps ending in "The final answer is X"
(X in MATH's LaTeX style, e.g. ``\\frac{5}{6}``), so SFT sequences stay around 40 tokens or less.

A fifth kind, ``sums`` (asked for by name, never part of the default mix), is the task on which
RL on a tiny model visibly *generalises*: its levels add one skill at a time (level 2: three
single digits in two worked steps, 1,000 problems; level 4: two two-digit numbers, 10,000). A
training set of a few hundred covers a small part of that space, so held-out accuracy can only rise if the policy gets better at the
skill (carrying), not by recalling the answers it was trained on -- which is all the 100
single-digit sums of level 1 allow.
Everything is computed with ``fractions.Fraction`` and is a pure function of the seed.
"""
from __future__ import annotations

import random
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from .problem import Problem
from .prompt import FINAL_ANSWER_MARKER

LEVELS = (1, 2, 3, 4, 5)
SUBJECTS = {
    "arithmetic": "Arithmetic",
    "fractions": "Fractions",
    "linear": "Linear Equations",
    "word": "Word Problems",
    "sums": "Addition",
}
# What `kinds=None` means: the mixed MATH-like kinds. `sums` is only generated when named.
DEFAULT_KINDS = ("arithmetic", "fractions", "linear", "word")
# Level 1 of the default mix is kept to the one skill a tiny model learns first.
KINDS_AT_LEVEL = {1: ("arithmetic", "sums"), **{lv: DEFAULT_KINDS + ("sums",) for lv in (2, 3, 4, 5)}}

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ivy", "Max", "Zoe")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells")


def latex_number(value: Fraction | int) -> str:
    """Exact value in MATH's answer style: ``7``, ``-3``, ``\\frac{5}{6}``, ``-\\frac{1}{2}``."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _frac(num: int, den: int) -> str:
    return f"\\frac{{{num}}}{{{den}}}"


def _plain(value: Fraction) -> str:
    """A value inside a worked step: ``5`` or ``5/6``."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _affine(a: int, b: int) -> str:
    """``a x + b`` written the way a textbook would: ``3x - 4``, ``x``, ``-x + 2``."""
    coef = {1: "", -1: "-"}.get(a, str(a))
    text = f"{coef}x"
    if b:
        text += f" {'+' if b > 0 else '-'} {abs(b)}"
    return text


# Each generator returns (problem text, worked steps without the closing sentence, answer).
Generated = tuple[str, str, Fraction]


def _arithmetic(rng: random.Random, level: int) -> Generated:
    r = rng.randint
    if level == 1:
        a, b = r(0, 9), r(0, 9)
        return f"What is ${a} + {b}$?", f"{a} + {b} = {a + b}.", Fraction(a + b)
    if level == 2:
        op = rng.choice(("-", "x", "+"))
        if op == "-":
            a = r(1, 9)
            b = r(0, a)
            return f"What is ${a} - {b}$?", f"{a} - {b} = {a - b}.", Fraction(a - b)
        if op == "x":
            a, b = r(2, 9), r(2, 9)
            return f"What is ${a} \\times {b}$?", f"{a} \\times {b} = {a * b}.", Fraction(a * b)
        a, b = r(10, 99), r(1, 9)
        return f"What is ${a} + {b}$?", f"{a} + {b} = {a + b}.", Fraction(a + b)
    if level == 3:
        a, b = r(10, 99), r(10, 99)
        if rng.random() < 0.5:
            return f"What is ${a} + {b}$?", f"{a} + {b} = {a + b}.", Fraction(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is ${a} - {b}$?", f"{a} - {b} = {a - b}.", Fraction(a - b)
    if level == 4:
        a, b, c = r(2, 9), r(11, 49), r(1, 30)
        p = a * b
        steps = f"{a} \\times {b} = {p}, {p} + {c} = {p + c}."
        return f"What is ${a} \\times {b} + {c}$?", steps, Fraction(p + c)
    a, b, c, d = r(1, 20), r(1, 20), r(2, 9), r(1, 99)
    p = (a + b) * c
    steps = f"({a} + {b}) \\times {c} = {p}, {p} - {d} = {p - d}."
    return f"What is $({a} + {b}) \\times {c} - {d}$?", steps, Fraction(p - d)


def _fractions(rng: random.Random, level: int) -> Generated:
    r = rng.randint
    ask = "Express your answer in simplest form."
    if level == 2:
        d = r(3, 9)
        a, b = r(1, d - 1), r(1, d - 1)
        value = Fraction(a + b, d)
        steps = f"{a}/{d} + {b}/{d} = {a + b}/{d}"
        text = f"What is ${_frac(a, d)} + {_frac(b, d)}$? {ask}"
    elif level in (3, 4):
        b, d = rng.sample(range(2, 7), 2)
        a, c = r(1, b - 1), r(1, d - 1)
        op = "+" if level == 3 else rng.choice(("-", "\\times"))
        if op == "\\times":
            value = Fraction(a, b) * Fraction(c, d)
            steps = f"{a}/{b} \\times {c}/{d} = {a * c}/{b * d}"
        else:
            lcm = b * d // _gcd(b, d)
            x, y = a * lcm // b, c * lcm // d
            value = Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)
            steps = f"{a}/{b} {op} {c}/{d} = {x}/{lcm} {op} {y}/{lcm}"
        text = f"What is ${_frac(a, b)} {op} {_frac(c, d)}$? {ask}"
    else:
        b, d = r(2, 9), r(2, 9)
        a, c = r(1, b - 1), r(1, d - 1)
        value = Fraction(a, b) / Fraction(c, d)
        steps = f"{a}/{b} \\times {d}/{c} = {a * d}/{b * c}"
        text = f"What is ${_frac(a, b)} \\div {_frac(c, d)}$? {ask}"
    last = steps.rsplit(" = ", 1)[-1]
    if last != _plain(value):
        steps += f" = {_plain(value)}"
    return text, steps + ".", value


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _linear(rng: random.Random, level: int) -> Generated:
    r = rng.randint
    ask = "Solve for $x$: "
    if level == 2:
        x, a = r(0, 20), r(1, 20)
        return f"{ask}$x + {a} = {x + a}$.", f"x = {x + a} - {a} = {x}.", Fraction(x)
    if level == 3:
        x, a = r(1, 12), r(2, 9)
        return f"{ask}${a}x = {a * x}$.", f"x = {a * x} / {a} = {x}.", Fraction(x)
    if level == 4:
        x, a, b = r(1, 12), r(2, 9), r(1, 30)
        c = a * x + b
        steps = f"{a}x = {c} - {b} = {a * x}, so x = {a * x} / {a} = {x}."
        return f"{ask}${_affine(a, b)} = {c}$.", steps, Fraction(x)
    x = r(-10, 10)
    a, c = rng.sample([k for k in range(-9, 10) if k != 0], 2)
    b = r(-20, 20)
    d = a * x + b - c * x
    steps = f"{_affine(a - c, 0)} = {d - b}, so x = {x}."
    return f"{ask}${_affine(a, b)} = {_affine(c, d)}$.", steps, Fraction(x)


def _word(rng: random.Random, level: int) -> Generated:
    r = rng.randint
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if level == 2:
        a, b = r(1, 9), r(1, 9)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return text, f"{a} + {b} = {a + b}.", Fraction(a + b)
    if level == 3:
        a = r(10, 50)
        b = r(1, a - 1)
        text = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return text, f"{a} - {b} = {a - b}.", Fraction(a - b)
    if level == 4:
        a, b = r(2, 9), r(2, 12)
        text = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        return text, f"{a} \\times {b} = {a * b}.", Fraction(a * b)
    a, b = r(2, 9), r(2, 12)
    c = r(1, a * b - 1)
    text = f"{name} buys {a} packs of {b} {item} and gives away {c}. How many {item} are left?"
    return text, f"{a} \\times {b} = {a * b}, {a * b} - {c} = {a * b - c}.", Fraction(a * b - c)


def _sums(rng: random.Random, level: int) -> Generated:
    """Sums that grow one skill at a time: level 1, ``a + b`` of single digits (100 problems);
    2, three single digits, worked in two steps (1,000); 3, a two-digit plus a one-digit number
    (1,000); 4, two two-digit numbers (10,000); 5, a three-digit plus a two-digit number (10^5)."""
    r = rng.randint
    if level == 2:
        a, b, c = r(0, 9), r(0, 9), r(0, 9)
        return f"What is ${a} + {b} + {c}$?", f"{a} + {b} = {a + b}, {a + b} + {c} = {a + b + c}.", Fraction(a + b + c)
    digits_a, digits_b = {1: (1, 1), 3: (2, 1), 4: (2, 2), 5: (3, 2)}[level]
    a, b = r(0, 10 ** digits_a - 1), r(0, 10 ** digits_b - 1)
    return f"What is ${a} + {b}$?", f"{a} + {b} = {a + b}.", Fraction(a + b)


GENERATORS: dict[str, Callable[[random.Random, int], Generated]] = {
    "arithmetic": _arithmetic,
    "fractions": _fractions,
    "linear": _linear,
    "word": _word,
    "sums": _sums,
}


def generate_problems(
    n: int,
    *,
    seed: int = 0,
    levels: Iterable[int] = LEVELS,
    kinds: Iterable[str] | None = None,
    unique: bool = True,
) -> list[Problem]:
    """``n`` problems; each draws a level uniformly from ``levels``, then a kind available at it.

    ``kinds`` defaults to the mixed kinds (``DEFAULT_KINDS``). ``unique`` (default) rejects repeated
    problem texts; level 1 alone has only 100 distinct problems, so asking for more raises an
    error that says so.
    """
    levels = tuple(levels)
    kinds = DEFAULT_KINDS if kinds is None else tuple(kinds)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad = [k for k in kinds if k not in GENERATORS]
    if bad or not kinds:
        raise ValueError(f"unknown kinds {bad or kinds}; choose from {list(GENERATORS)}")
    choices = {lv: [k for k in KINDS_AT_LEVEL.get(lv, ()) if k in kinds] for lv in levels}
    empty = [lv for lv, ks in choices.items() if not ks]
    if not levels or empty:
        raise ValueError(
            f"no generator for levels {empty or levels} with kinds {list(kinds)}; levels are 1-5 "
            "and level 1 only has 'arithmetic'"
        )
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"found only {len(problems)} distinct problems for levels {list(levels)} and kinds "
                f"{list(kinds)}; ask for fewer, add levels, or pass unique=False"
            )
        level = rng.choice(levels)
        kind = rng.choice(choices[level])
        text, steps, value = GENERATORS[kind](rng, level)
        if unique and text in seen:
            continue
        seen.add(text)
        answer = latex_number(value)
        problems.append(
            Problem(
                id=f"synthetic-{seed}-{len(problems)}",
                problem=text,
                answer=answer,
                solution=f"{steps} {FINAL_ANSWER_MARKER} {answer}",
                level=level,
                subject=SUBJECTS[kind],
                meta={"kind": kind, "seed": seed},
            )
        )
    return problems


def split_problems(
    problems: Sequence[Problem], held_out: float | int = 0.1, *, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) with no problem text in both; order within each part is kept.

    ``held_out`` is a fraction in (0, 1) or a count. Problems sharing a text go to the same side,
    so the held-out part measures generalisation, not recall.
    """
    if isinstance(held_out, float) and not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out fraction must be in (0, 1), got {held_out}")
    target = round(held_out * len(problems)) if isinstance(held_out, float) else int(held_out)
    if not 0 <= target <= len(problems):
        raise ValueError(f"held_out={held_out} asks for {target} of {len(problems)} problems")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(p.problem.strip(), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    chosen: set[int] = set()
    for key in keys:
        if len(chosen) >= target:
            break
        chosen.update(groups[key])
    train = [p for i, p in enumerate(problems) if i not in chosen]
    test = [p for i, p in enumerate(problems) if i in chosen]
    return train, test
