"""Answer extraction and normalisation (pure string code that runs in the trainer process)."""
import time

import pytest

from agro_megatron.rewards import extract_answer
from agro_megatron.rewards.extract import MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS, last_boxed
from agro_megatron.rewards.normalize import as_number, nesting_depth, normalize

EXTRACTION = [
    ("Step 1: 2+2=4.\nThe final answer is 4.", "4"),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("the final answer is: $$\n\\sqrt{2}\n$$", "\\sqrt{2}"),
    ("THE FINAL ANSWER IS 12", "12"),
    ("The  final\nanswer is 8", "8"),
    ("The final answer is 3.5.", "3.5"),
    ("The final answer is **42**.", "42"),
    ("The final answer is $\\$5$.", "\\$5"),
    ("The final answer is \\boxed{(1, 2]}.", "(1, 2]"),
    ("The final answer is 5. Then we double-check it.", "5"),
    ("The final answer is 7 I hope it is correct.", "7"),
    ("The final answer is 3. Wait, no: the final answer is 4.", "4"),  # the LAST marker wins
    ("The final answer is\n\\boxed{9}", "9"),
    ("The final answer is $x \\in [2, 5)$", "x \\in [2, 5)"),
    ("The final answer is \\(\\frac{3}{4}\\).", "\\frac{3}{4}"),
    ("The final answer is \\[ 6 \\]", "6"),
    ("The final answer is $(2, 3)$ and that is all.", "(2, 3)"),
    ("The final answer is 1,000.", "1,000"),
    ("The final answer is 10\\%.\nMore text follows.", "10\\%"),
    ("The final answer is $5", "5"),
    # no marker: last \boxed / \fbox, braces balanced
    ("We get \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
    ("First \\boxed{1}, then \\boxed{2}.", "2"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("so $\\fbox{x^{2}}$", "x^{2}"),
    ("\\boxed 5 is the result", "5"),
    ("The final answer is\n\nWe find \\boxed{11}", "11"),  # empty after marker: box fallback
]

NO_ANSWER = [
    "no answer here",
    "The final answer is",
    "The final answer is $$",
    "unclosed \\boxed{1 + ",
    "",
    "The final answer is " + "9" * (MAX_ANSWER_CHARS + 1),
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", NO_ANSWER)
def test_no_answer(response):
    assert extract_answer(response) is None


def test_only_the_tail_of_a_huge_response_is_searched():
    head = "The final answer is 1.\n" + "x" * (MAX_RESPONSE_CHARS + 10)
    assert extract_answer(head) is None  # the marker lies before the searched tail
    huge = "y" * (8 << 20) + "\nThe final answer is 2."
    t = time.perf_counter()
    assert extract_answer(huge) == "2"
    assert time.perf_counter() - t < 2.0  # ~1 ms: only the tail is scanned


def test_last_boxed_skips_escaped_braces():
    assert last_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"
    assert last_boxed("\\boxed{a\\}") is None  # the escaped brace does not close the box


def test_non_string_is_a_clear_error():
    with pytest.raises(TypeError, match="response must be str"):
        extract_answer(None)


NORMALIZE = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("$\\boxed{5}$", "5"),
    ("1,000,000", "1000000"),
    ("1\\,000", "1000"),
    ("10^\\circ", "10"),
    ("5\\text{ cm}^2", "5"),
    ("x = 5", "5"),
    ("a = 1, b = 2", "a = 1, b = 2"),  # a system of assignments keeps its names
    ("2\\frac{1}{2}", "\\frac{5}{2}"),
    ("\\left( 1, 2 \\right]", "( 1, 2 ]"),
    ("\\text{(C)}", "C"),
    ("\\$5.00", "5.00"),
    ("50\\%", "50"),
    (".5", "0.5"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{x}", "\\frac{1}{x}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("12 inches", "12"),
    ("3t", "3t"),  # a variable is not a unit
    ("\\text{Monday}", "Monday"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]


@pytest.mark.parametrize("raw,canonical", NORMALIZE)
def test_normalize(raw, canonical):
    assert normalize(raw) == canonical


def test_as_number():
    from fractions import Fraction

    assert as_number("\\frac{3}{6}") == (Fraction(1, 2), False)
    assert as_number("-\\frac{1}{3}") == (Fraction(-1, 3), False)
    assert as_number("0.25") == (Fraction(1, 4), True)
    assert as_number("7/2") == (Fraction(7, 2), False)
    assert as_number("1/0") is None and as_number("\\sqrt{2}") is None


def test_nesting_depth():
    assert nesting_depth("\\frac{\\sqrt{2}}{(1+x)}") == 2
    assert nesting_depth("(" * 50 + ")" * 50) == 50
