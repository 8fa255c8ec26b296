"""MATH-style answer equivalence: a table of (prediction, ground truth) pairs with known verdicts.

The verdicts are the MATH grading conventions a human grader applies (Hendrycks et al. 2021):
same number in another notation, same set/interval/tuple, same expression after algebra, units
and formatting ignored; different values, open vs closed ends, different order in a tuple,
missing elements are wrong.
"""
import pytest

from agro_megatron.rewards import is_equivalent
from agro_megatron.rewards.math import _quick
from agro_megatron.rewards.normalize import compare_key
from agro_megatron.rewards.sandbox import get_pool

# Verdicts, not speed, are under test here (the fixture lives in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("generous_reward_timeout")


EQUIVALENT = [
    # fractions, decimals, integers
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "0.75"),
    ("1/2", "\\frac{1}{2}"),
    ("-\\frac{1}{3}", "\\frac{-1}{3}"),
    ("\\frac{-1}{3}", "-\\frac13"),
    ("\\frac{6}{8}", "\\frac{3}{4}"),
    ("\\frac{1}{3}", "0.333333"),
    ("2.50", "\\frac{5}{2}"),
    ("5.0", "5"),
    (".5", "0.5"),
    ("-.25", "-\\frac{1}{4}"),
    ("007", "7"),
    ("\\frac{10}{5}", "2"),
    ("3", "\\frac{9}{3}"),
    # thousands separators, spacing, dollars, percent, degrees, units
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("1\\,000\\,000", "1000000"),
    ("12,345.5", "12345.5"),
    ("\\$5", "5"),
    ("\\$ 12.50", "12.5"),
    ("50\\%", "50"),
    ("25 \\%", "25"),
    ("90^\\circ", "90"),
    ("45^{\\circ}", "45"),
    ("30°", "30"),
    ("5\\text{ cm}", "5"),
    ("12 \\text{ inches}^2", "12"),
    ("7 \\mbox{ units}", "7"),
    ("18 square units", "18"),
    ("4 \\text{ meters}", "4"),
    ("20 degrees", "20"),
    ("6 \\text{ dollars}", "6"),
    ("10\\!000", "10000"),
    # prefixes, wrappers, markup
    ("x = 5", "5"),
    ("x=\\frac{1}{2}", "0.5"),
    ("k = 3", "3"),
    ("\\theta = 30", "30"),
    ("y = 2x + 3", "2x+3"),
    ("\\boxed{7}", "7"),
    ("\\fbox{7}", "7"),
    ("$7$", "7"),
    ("\\(7\\)", "7"),
    ("{7}", "7"),
    ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\left[ 0, 1 \\right)", "[0,1)"),
    ("\\text{(C)}", "(C)"),
    ("(C)", "C"),
    ("\\textbf{(B)}", "\\text{(B)}"),
    ("\\text{Monday}", "Monday"),
    ("\\mathrm{odd}", "\\text{odd}"),
    # mixed numbers
    ("2\\frac{1}{2}", "\\frac{5}{2}"),
    ("3 \\frac{1}{4}", "3.25"),
    ("-1\\frac{1}{2}", "-\\frac{3}{2}"),
    # radicals
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\sqrt{50}", "5\\sqrt{2}"),
    ("\\sqrt[3]{8}", "2"),
    ("3+2\\sqrt{2}", "(1+\\sqrt{2})^2"),
    ("\\frac{3\\sqrt{5}}{5}", "\\frac{3}{\\sqrt{5}}"),
    # pi
    ("2\\pi", "\\pi \\cdot 2"),
    ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi"),
    ("\\pi/4", "\\frac{\\pi}{4}"),
    ("36\\pi", "36 \\pi"),
    ("\\frac{4\\pi}{3}", "\\frac{4}{3}\\pi"),
    # powers, exponentials, logs
    ("2^{10}", "1024"),
    ("10^3", "1000"),
    ("2^{-1}", "\\frac{1}{2}"),
    ("\\log_2 8", "3"),
    ("e^{0}", "1"),
    ("3^4", "81"),
    # polynomials and expressions
    ("(x+1)^2", "x^2+2x+1"),
    ("x^2-1", "(x-1)(x+1)"),
    ("2x+3", "3+2x"),
    ("\\frac{x}{2}", "0.5x"),
    ("a^2+2ab+b^2", "(a+b)^2"),
    ("x(x+1)", "x^2+x"),
    ("3x^2 - 6x + 3", "3(x-1)^2"),
    ("\\frac{x+1}{x}", "1+\\frac{1}{x}"),
    ("6x^3-12x", "6x(x^2-2)"),
    ("\\sin^2 x + \\cos^2 x", "1"),
    # intervals and inequalities
    ("(1,2]", "(1, 2]"),
    ("[-3, 5)", "[-3,5)"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("(-\\infty,-2] \\cup [2,\\infty)", "(-\\infty,-2]\\cup[2,\\infty)"),
    ("[0,\\frac{1}{2}]", "[0,0.5]"),
    ("(\\sqrt{2}, 4)", "(\\sqrt{2},4)"),
    ("x < 3", "(-\\infty, 3)"),
    ("2 \\le x \\le 5", "[2,5]"),
    ("x \\in [2, 5)", "[2,5)"),
    ("(-\\infty, \\infty)", "\\mathbb{R}"),
    ("\\emptyset", "\\{\\}"),
    # sets and tuples, lists of solutions
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("1, 2", "2, 1"),
    ("-2, 3", "3, -2"),
    ("(1,2)", "(1, 2)"),
    ("(\\frac{1}{2}, 3)", "(0.5, 3)"),
    ("(3, -1, 2)", "(3,-1,2)"),
    ("\\left(2, \\frac{\\pi}{3}\\right)", "(2,\\frac{\\pi}{3})"),
    ("1 \\text{ and } 2", "1, 2"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\pm 2", "2, -2"),
    ("a=2, b=3", "b=3, a=2"),
    ("y = -x + 1", "y = 1 - x"),
    ("3^{\\frac{1}{2}}", "\\sqrt{3}"),
    ("-\\frac{\\sqrt{3}}{2}", "-\\frac{1}{2}\\sqrt{3}"),
    ("1.5\\pi", "\\frac{3\\pi}{2}"),
    # complex numbers
    ("3+4i", "4i+3"),
    ("1-i", "-i+1"),
    ("2i", "i\\cdot 2"),
    # scientific notation and percentages as written
    ("1.5\\times 10^{3}", "1500"),
    ("2 \\times 10^{-2}", "0.02"),
    # thousands separators written as ",\\!" or "{,}", with the source spaces math mode ignores
    # (Math-Verify's, hendrycks/math's and verl's suites agree; we used to read them as sets)
    ("\\boxed{11,\\! 111,\\! 111,\\! 100}", "11111111100"),
    ("\\boxed{32,\\! 349}", "32349"),
    ("\\boxed{10{,} 000}", "10000"),
    ("1{,}000{,}000", "1000000"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("32, 349", "32349"),  # a plain ", " separates two numbers; only ",\\!" / "{,}" are separators
    ("\\boxed{32,\\! 349}", "32, 349"),
    ("0.33", "\\frac{1}{3}"),
    ("0.5", "5"),
    ("2", "-2"),
    ("1000", "100"),
    ("1,001", "1000"),
    ("\\sqrt{2}", "2"),
    ("\\sqrt{8}", "4\\sqrt{2}"),
    ("\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"),
    ("2\\pi", "\\pi"),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}"),
    ("3.14", "\\pi"),
    ("(x+1)^2", "x^2+1"),
    ("x^2-1", "(x-1)^2"),
    ("2x+3", "2x-3"),
    ("3t", "3"),
    ("5m", "5"),
    ("x", "y"),
    ("(1,2]", "(1,2)"),
    ("[1,2]", "(1,2)"),
    ("[-3,5)", "[-3,5]"),
    ("(-\\infty,3)", "(-\\infty,3]"),
    ("(-\\infty, 3)", "(3, \\infty)"),
    ("\\{1,2,3\\}", "\\{1,2\\}"),
    ("1, 2", "1, 2, 3"),
    ("(1,2)", "(2,1)"),
    ("(3,-1,2)", "(3,1,2)"),
    ("3+4i", "3-4i"),
    ("i", "1"),
    ("10^3", "10^4"),
    ("2^{10}", "1000"),
    ("\\log_2 8", "2"),
    ("\\text{(B)}", "\\text{(C)}"),
    ("B", "C"),
    ("\\text{Monday}", "\\text{Tuesday}"),
    ("\\text{odd}", "\\text{even}"),
    ("2\\frac{1}{2}", "\\frac{1}{2}"),
    ("1\\frac{1}{3}", "\\frac{1}{3}"),
    ("12", "21"),
    ("-\\frac{1}{3}", "\\frac{1}{3}"),
    ("0", "1"),
    ("\\infty", "-\\infty"),
    ("1.5 \\times 10^{3}", "150"),
    ("a^2+b^2", "(a+b)^2"),
    ("\\frac{x}{2}", "2x"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("y = 2x + 3", "2x + 4"),
    ("5 \\text{ cm}", "6"),
    ("50\\%", "5"),
    ("", "0"),
    ("\\text{none}", "0"),
]


def test_table_is_large_and_has_no_duplicates():
    pairs = EQUIVALENT + NOT_EQUIVALENT
    assert len(pairs) >= 150
    assert len(set(pairs)) == len(pairs)


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold), (pred, gold)


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalence_is_symmetric(pred, gold):
    assert is_equivalent(gold, pred), (gold, pred)


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold), (pred, gold)


STRUCTURED = [  # more pairs the in-process exact path decides
    ("(1, 2]", "(1,2]"), ("[0,\\frac{1}{2}]", "[0,0.5]"), ("(0, -5)", "(0,-6)"),
    ("\\{4,-7,-2\\}", "-2, 4, -7"), ("\\{3\\}", "\\{3, -1\\}"), ("(3, 1, 2)", "(3, 1, 2.0)"),
    ("[-1, 4)", "[-1, 4]"), ("(2, 3)", "(3, 2)"), ("1, 2, 2", "\\{2, 1\\}"), ("\\frac{7}{3}", "2.333333"),
]


def test_exact_fast_paths_agree_with_sympy():
    """Numbers and number tuples/intervals/sets are decided in-process with Fraction; SymPy
    in a sandbox worker (math-verify's comparison) must reach the same verdicts."""
    decided = []
    for pred, gold in EQUIVALENT + NOT_EQUIVALENT + STRUCTURED:
        verdict, p, g = _quick(pred, gold)
        if verdict is not None and compare_key(p) != compare_key(g):
            decided.append(((p, g), verdict))
    assert len(decided) >= 40
    pairs = [pg for pg, _ in decided]
    fast = [v for _, v in decided]
    pool = get_pool()
    blocked = pool.stats["blocked"]
    slow = pool.check(pairs, timeout_s=10.0, workers=2)
    assert fast == slow, [(pg, f, s) for pg, f, s in zip(pairs, fast, slow) if f != s]
    assert pool.stats["blocked"] == blocked  # the audit hook never fires on legitimate answers
    assert any(fast) and not all(fast)
