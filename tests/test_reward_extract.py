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


# --- one box parser for ground truth and reward --------------------------------------------------
# The data loaders read a MATH row's ground truth from its solution's last box with the reward's
# own parser (rewards/extract.py), so a reference solution and a response that box the same thing
# yield the same answer. LaTeX's meaning decides the tricky forms: `\boxed5` boxes the single
# token `5` (`\boxed 12` boxes only `1`), and an unclosed box has no answer (an earlier complete
# box then counts). None: no ground truth (the loader refuses the row) and no answer (reward 0).
BOX_AGREEMENT = [
    ("so $\\boxed{5}$.", "5"),
    ("$\\boxed5$", "5"),                                   # no braces: one token
    ("\\boxed5", "5"),
    ("MATH's bare form $\\boxed 5$.", "5"),
    ("\\boxed 12", "1"),                                   # one token, as TeX typesets it
    ("\\boxed\\pi", "\\pi"),                               # a control word is one token
    ("\\boxed\n{7}", "7"),                                 # TeX skips one line end after \boxed
    ("\\boxed\n\n7", None),                                # ...but a blank line is a paragraph
    ("unclosed \\boxed{1 + ", None),                       # an unclosed box has no answer
    ("unbalanced \\boxed{\\frac{1}{2}", None),
    ("last one unclosed falls back \\boxed{9} \\boxed{1", "9"),
    ("\\boxed{9}, then a bare \\boxed", "9"),              # a box without an argument is none
    ("\\boxed{9}, then \\boxed at", "a"),                  # ...but `\\boxed at` boxes the token `a`
    ("\\boxed}", None),
    ("\\boxed$5$", None),
    ("\\boxedx{3}", None),                                 # another command
    ("\\boxed{}", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                 # escaped braces do not close the box
    ("\\boxed{a\\}", None),
    ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
    ("first \\boxed{1} then \\fbox{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ (1, 2) }", "(1, 2)"),
    ("\\boxed{$5$.}", "5"),                                # cleaned alike on both sides
    ("\\boxed{**4**}", "4"),
    ("\\boxed {3}", "3"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("no box at all", None),
]


def _ground_truth(solution: str) -> str | None:
    from agro_megatron.data.problem import problem_from_row

    try:
        return problem_from_row({"problem": "p", "solution": solution}, default_id="x").answer
    except ValueError as err:
        assert "no ground truth" in str(err)
        return None


@pytest.mark.parametrize("text,expected", BOX_AGREEMENT)
def test_ground_truth_and_reward_parse_boxes_alike(text, expected):
    assert _ground_truth(text) == expected
    assert extract_answer(text) == expected


def test_ground_truth_and_reward_agree_through_the_loader(tmp_path):
    """The same cases through load_problems (rows without a box are skipped as malformed)."""
    import json
    import warnings

    from agro_megatron.data import load_problems

    path = tmp_path / "boxes.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "problem": "p", "solution": text}) + "\n"
                            for i, (text, _) in enumerate(BOX_AGREEMENT)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = {p.id: p.answer for p in load_problems(path, skip_malformed=True)}
    for i, (text, _) in enumerate(BOX_AGREEMENT):
        assert loaded.get(str(i)) == extract_answer(text), text


def test_the_data_side_has_no_box_parser_of_its_own():
    from agro_megatron import data
    from agro_megatron.data import problem
    from agro_megatron.rewards import extract

    assert data.last_boxed is extract.last_boxed and problem.boxed_answer is extract.boxed_answer


def test_box_parsing_is_linear_on_hostile_text():
    hostile = ["\\boxed{" * 60_000, "{" * 400_000 + "\\boxed{", "\\boxed " * 60_000,
               "\\boxed{" + "\\{" * 200_000]
    for text in hostile:
        t = time.perf_counter()
        last_boxed(text)
        extract_answer(text)
        assert time.perf_counter() - t < 2.0, text[:20]
