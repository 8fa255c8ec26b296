"""Synthetic problems: determinism, and every answer re-derived independently from the text."""
import ast
import operator
import re
from collections import Counter
from fractions import Fraction

import pytest
import sympy

from agro_megatron.data import FINAL_ANSWER_MARKER, generate_problems, split_problems

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_exact(expr: str) -> Fraction:
    """Exact value of a LaTeX arithmetic expression (\\frac, \\times, \\div, parentheses)."""
    expr = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"(\1/\2)", expr).replace("\\times", "*").replace("\\div", "/")

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _parse_answer(answer: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        assert value.denominator == int(m.group(3)), f"{answer} is not in lowest terms"
        return -value if m.group(1) else value
    assert re.fullmatch(r"-?\d+", answer), answer
    return Fraction(int(answer))


def _solve(problem: str) -> Fraction:
    """The answer, recomputed from the problem text alone."""
    if m := re.fullmatch(r"What is \$(.+)\$\?( Express your answer in simplest form\.)?", problem):
        return _eval_exact(m.group(1))
    if m := re.fullmatch(r"Solve for \$x\$: \$(.+) = (.+)\$\.", problem):
        x = sympy.Symbol("x")
        side = lambda s: sympy.sympify(re.sub(r"(\d)x", r"\1*x", s))  # noqa: E731  (our own text)
        (root,) = sympy.solve(sympy.Eq(side(m.group(1)), side(m.group(2))), x)
        return Fraction(int(root.p), int(root.q))
    nums = [int(v) for v in re.findall(r"\d+", problem)]
    if "more" in problem:
        return Fraction(nums[0] + nums[1])
    if "packs" in problem:
        return Fraction(nums[0] * nums[1] - nums[2])
    if "boxes" in problem:
        return Fraction(nums[0] * nums[1])
    if "gives away" in problem:
        return Fraction(nums[0] - nums[1])
    raise AssertionError(f"unknown template: {problem}")


def test_answers_are_exact_and_solutions_end_with_marker():
    problems = generate_problems(600, seed=11)
    assert Counter(p.level for p in problems).keys() == {1, 2, 3, 4, 5}
    assert len({p.subject for p in problems}) == 4
    for p in problems:
        assert _parse_answer(p.answer) == _solve(p.problem), p
        assert p.solution.endswith(f"{FINAL_ANSWER_MARKER} {p.answer}")
        steps = p.solution[: -len(f"{FINAL_ANSWER_MARKER} {p.answer}")]
        # the last value the worked steps reach is the answer
        last = re.findall(r"= (-?\d+(?:/\d+)?)", steps)[-1]
        assert Fraction(last) == _parse_answer(p.answer), p


def test_level_one_is_single_digit_addition():
    problems = generate_problems(100, seed=0, levels=[1])
    assert len({p.problem for p in problems}) == 100  # the whole pool, no repeats
    for p in problems:
        a, b = map(int, re.fullmatch(r"What is \$(\d) \+ (\d)\$\?", p.problem).groups())
        assert p.answer == str(a + b) and p.subject == "Arithmetic"
    with pytest.raises(ValueError, match="distinct problems"):
        generate_problems(101, seed=0, levels=[1])


def test_deterministic_by_seed():
    a, b = generate_problems(200, seed=3), generate_problems(200, seed=3)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.problem for p in generate_problems(200, seed=4)] != [p.problem for p in a]


def test_options_are_validated():
    with pytest.raises(ValueError, match="level 1 only has 'arithmetic'"):
        generate_problems(5, levels=[1], kinds=["fractions"])
    with pytest.raises(ValueError, match="unknown kinds"):
        generate_problems(5, kinds=["calculus"])
    assert {p.subject for p in generate_problems(50, levels=[2, 3], kinds=["linear"])} == {"Linear Equations"}


def test_split_is_disjoint_deterministic_and_complete():
    problems = generate_problems(400, seed=2, levels=[1, 2], unique=False)
    train, test = split_problems(problems, 0.25, seed=1)
    assert len(train) + len(test) == len(problems)
    assert not {p.problem for p in train} & {p.problem for p in test}
    assert abs(len(test) - 100) <= max(Counter(p.problem for p in problems).values())
    assert sorted(p.id for p in train + test) == sorted(p.id for p in problems)
    again = split_problems(problems, 0.25, seed=1)
    assert (train, test) == again
    assert split_problems(problems, 0.25, seed=2)[1] != test
    assert len(split_problems(generate_problems(50, seed=0), 10)[1]) == 10
    with pytest.raises(ValueError):
        split_problems(problems, 1.5)


# --- the `sums` kind: the generalisation task of the CPU demo -------------------------------------
SUMS_SPACE = {1: 100, 2: 1000, 3: 1000, 4: 10_000, 5: 100_000}


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_sums_answers_and_worked_steps_are_exact(level):
    for p in generate_problems(300, seed=level, levels=[level], kinds=["sums"], unique=False):
        terms = [int(t) for t in re.fullmatch(r"What is \$(\d+(?: \+ \d+)+)\$\?", p.problem).group(1).split(" + ")]
        assert p.answer == str(sum(terms)) and p.subject == "Addition"
        assert p.solution.endswith(f"{FINAL_ANSWER_MARKER} {sum(terms)}")
        # every worked step is a true equation (checked from the text alone)
        for lhs, rhs in re.findall(r"(\d+ \+ \d+) = (\d+)", p.solution):
            a, b = map(int, lhs.split(" + "))
            assert a + b == int(rhs)
        assert len(terms) == (3 if level == 2 else 2)


def test_sums_space_sizes_by_exact_enumeration():
    # small levels: draw until every problem has been seen, and compare with the enumerated count
    for level in (1, 2, 3):
        seen = {p.problem for p in generate_problems(20 * SUMS_SPACE[level], seed=0, levels=[level],
                                                     kinds=["sums"], unique=False)}
        assert len(seen) == SUMS_SPACE[level], level
    with pytest.raises(ValueError, match="found only 100 distinct"):
        generate_problems(101, seed=0, levels=[1], kinds=["sums"])
    # the demo's split: 400 training problems leave most of the level-2 space unseen
    assert len(generate_problems(600, seed=0, levels=[2], kinds=["sums"])) == 600


def test_sums_are_never_part_of_the_default_mix():
    mixed = generate_problems(2000, seed=0, unique=False)
    assert "Addition" not in {p.subject for p in mixed}
    assert {p.meta["kind"] for p in mixed} == {"arithmetic", "fractions", "linear", "word"}
