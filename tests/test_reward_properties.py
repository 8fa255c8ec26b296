"""Property-based tests (hypothesis) and the batch API's contract."""
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agro_megatron.rewards import is_equivalent, score, score_batch

# Verdicts, not speed, are under test here (the fixture lives in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("generous_reward_timeout")


FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# Text near the answer grammar: LaTeX commands, braces, digits, markers, code-like fragments.
_TOKENS = st.sampled_from([
    "\\frac", "\\sqrt", "\\boxed", "{", "}", "(", ")", "[", "]", "^", "_", "\\pi", "\\infty",
    "\\left", "\\right", "\\text", "$", ",", ".", "=", "+", "-", "*", "/", "!", "x", "i", "e",
    "1", "2", "9", "0.5", " ", "\n", "The final answer is ", "\\{", "\\}", "__import__", "'",
    "\\cup", "\\cdot", "%", "\\%", "\\$", "\\circ", "\\dfrac", "\\operatorname", "\\begin{pmatrix}",
])
_near_latex = st.lists(_TOKENS, max_size=25).map("".join)


@FAST
@given(response=st.one_of(st.text(max_size=80), _near_latex), gold=st.one_of(_near_latex, st.text(max_size=10)))
def test_score_never_raises_and_is_binary(response, gold):
    assert score(response, gold) in (0.0, 1.0)


@FAST
@given(body=_near_latex)
def test_marker_answers_never_raise(body):
    assert score("Reasoning... The final answer is " + body, "\\frac{1}{2}") in (0.0, 1.0)


_int = st.integers(-50, 50)
_atom = st.one_of(
    _int.map(str),
    st.tuples(_int, st.integers(1, 12)).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
    st.integers(2, 30).map(lambda n: f"\\sqrt{{{n}}}"),
    _int.map(lambda n: f"{n}\\pi"),
    st.tuples(_int, _int).map(lambda t: f"x^2 + {t[0]}x + {t[1]}".replace("+ -", "- ")),
    st.tuples(_int, _int).map(lambda t: f"({min(t)}, {max(t) + 1}]"),
    st.tuples(_int, _int).map(lambda t: f"({t[0]}, {t[1]})"),
    st.lists(_int, min_size=1, max_size=4, unique=True).map(lambda v: "\\{" + ",".join(map(str, v)) + "\\}"),
)


@FAST
@given(answer=_atom, boxed=st.booleans())
def test_identical_well_formed_answers_score_one(answer, boxed):
    shown = f"\\boxed{{{answer}}}" if boxed else f"${answer}$"
    assert score(f"Step 1: work.\nThe final answer is {shown}.", answer) == 1.0


@FAST
@given(a=st.tuples(_int, st.integers(1, 12)), b=st.tuples(_int, st.integers(1, 12)), k=st.integers(2, 5))
def test_fractions_match_exact_arithmetic(a, b, k):
    """Reference: Fraction equality. The prediction is a product form, so SymPy must decide."""
    pred = f"\\frac{{{a[0]} \\cdot {k}}}{{{a[1]} \\cdot {k}}}"
    gold = f"\\dfrac{{{b[0]}}}{{{b[1]}}}"
    assert is_equivalent(pred, gold) == (Fraction(*a) == Fraction(*b))


@FAST
@given(r=st.integers(-6, 6), s=st.integers(-6, 6), shift=st.integers(-2, 2))
def test_factored_polynomials_match_expanded(r, s, shift):
    """(x - r)(x - s) against its expansion from exact coefficients (plus an optional error)."""
    b, c = -(r + s), r * s + shift
    expanded = f"x^2 {'+' if b >= 0 else '-'} {abs(b)}x {'+' if c >= 0 else '-'} {abs(c)}"
    factored = f"(x {'-' if r >= 0 else '+'} {abs(r)})(x {'-' if s >= 0 else '+'} {abs(s)})"
    assert is_equivalent(factored, expanded) == (shift == 0)


@FAST
@given(n=st.integers(2, 200), m=st.integers(2, 200))
def test_radicals_match_integer_reference(n, m):
    """sqrt(n) vs sqrt(m) written as a*sqrt(b) with b squarefree: equal iff n == m."""
    a, b = 1, m
    for f in range(2, 15):
        while b % (f * f) == 0:
            a, b = a * f, b // (f * f)
    simplified = str(a) if b == 1 else (f"{a}\\sqrt{{{b}}}" if a > 1 else f"\\sqrt{{{b}}}")
    assert is_equivalent(f"\\sqrt{{{n}}}", simplified) == (n == m)


RESPONSES = [
    ("The final answer is $\\frac{1}{2}$.", "0.5", 1.0),
    ("The final answer is 3.", "4", 0.0),
    ("Thus \\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("The final answer is $(1,2]$.", "(1,2)", 0.0),
    ("no answer at all", "1", 0.0),
    ("The final answer is $x^2-1$.", "(x-1)(x+1)", 1.0),
    ("The final answer is $\\{3,1,2\\}$.", "\\{1,2,3\\}", 1.0),
    ("The final answer is $2\\pi$.", "\\pi", 0.0),
    ("The final answer is 1,000.", "1000", 1.0),
    ("The final answer is $\\frac{1}{2}$.", "0.5", 1.0),  # a duplicate: checked once, both filled
]


def test_score_batch_matches_score_and_keeps_order():
    responses, golds, expected = map(list, zip(*RESPONSES))
    for order in (list(range(len(RESPONSES))), list(range(len(RESPONSES)))[::-1]):
        got = score_batch([responses[i] for i in order], [golds[i] for i in order], workers=2)
        assert got == [expected[i] for i in order]
    assert [score(r, g) for r, g in zip(responses, golds)] == expected


def test_score_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="ground truths"):
        score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="workers"):
        score_batch(["a"], ["1"], workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        score_batch(["a"], ["1"], timeout_s=float("nan"))
    with pytest.raises(TypeError, match="convert it with str"):
        score_batch(["The final answer is 3"], [3])
    assert score_batch([], []) == []
