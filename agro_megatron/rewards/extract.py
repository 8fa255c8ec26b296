"""Find the final answer in a model response.

The AGRO prompt asks the model to end with "The final answer is X"; the reward reads X from the
LAST such marker (a model may restate the phrase mid-solution). Responses that box their answer
instead (``\\boxed{X}`` / ``\\fbox{X}``) are read from the last box (:func:`last_boxed`, which the
data loaders use for MATH ground truth too). Everything here is plain
string scanning in linear time on bounded input: it runs in the trainer process, outside the
sandbox, so it must never be slow or raise on hostile text.
"""
from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 65_536
"""Only this many trailing characters of a response are searched (the answer is at the end)."""

MAX_ANSWER_CHARS = 1_000
"""An extracted answer longer than this is no answer (MATH answers are a few dozen characters)."""

_MARKER = re.compile(r"the\s+final\s+answer\s+is\b", re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Paired math delimiters an answer may be wrapped in, longest opener first.
_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Sentence-ending period: a period followed by whitespace (a decimal point never is).
_SENTENCE_END = re.compile(r"\.\s")
_TRAILER = re.compile(r"\s*(?:I\s+hope\s+it\s+is\s+correct|Hope\s+(?:this|that)\s+helps).*$",
                      re.IGNORECASE | re.DOTALL)


def matching_brace(text: str, open_pos: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{ \\}`` skipped), or -1."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


# After a control word TeX skips spaces and one line end; a blank line would be a paragraph.
_SKIP = re.compile(r"[ \t]*(?:\r?\n[ \t]*)?")
_CONTROL_SEQUENCE = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)
# Characters that cannot be a box's one-token argument (TeX: closing brace, math shift, comment,
# alignment, parameter, sub/superscript, active tie; whitespace ends the line or paragraph).
_NOT_AN_ARGUMENT = frozenset("}$%&#^_~")
# Escapes (a backslash and the character after it) and braces, for matching every brace in one pass.
_BRACE_TOKEN = re.compile(r"\\.?|[{}]", re.DOTALL)


def _argument(text: str, cmd_end: int, closes: dict[int, int] | None = None) -> str | None:
    """The argument of a box command whose name ends at ``cmd_end``, or None when it has none.

    LaTeX's meaning: ``\\boxed{...}`` boxes the balanced group, ``\\boxed5`` / ``\\boxed 5``
    the single token ``5`` (``\\boxed 12`` boxes only ``1``; ``\\boxed\\pi`` boxes ``\\pi``). An
    unclosed ``{`` or a missing argument is no box. ``closes`` (from :func:`_brace_partners`)
    saves the scan for the closing brace.
    """
    i = _SKIP.match(text, cmd_end).end()
    if i >= len(text):
        return None
    c = text[i]
    if c == "{":
        close = matching_brace(text, i) if closes is None else closes.get(i, -1)
        return None if close < 0 else text[i + 1:close]
    if c == "\\":
        m = _CONTROL_SEQUENCE.match(text, i)
        return None if m is None or _BOX.fullmatch(m.group(0)) else m.group(0)  # a box is no token
    if c.isspace() or c in _NOT_AN_ARGUMENT:
        return None
    return c


def _brace_partners(text: str) -> dict[int, int]:
    """``{open index: close index}`` for every balanced ``{`` of ``text``, escapes skipped (one pass)."""
    closes: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            closes[stack.pop()] = m.start()
    return closes


def last_boxed(text: str) -> str | None:
    """Content (stripped) of the last ``\\boxed`` / ``\\fbox`` that has an argument; None if none.

    The one box parser: the reward reads model responses with it and the data loaders read MATH
    ground truth with it, so both sides see the same answer. Semantics (LaTeX's): a box takes a
    balanced ``{...}`` group or a single token (``\\boxed5`` is ``5``, see :func:`_argument`); an
    unclosed box has no answer, so the last box that does have one counts
    (``\\boxed{9} \\boxed{1`` -> ``9``). ``\\boxedx`` is another command. Linear time in
    ``len(text)`` whatever the text holds.
    """
    ends = [m.end() for m in _BOX.finditer(text)]
    if not ends:
        return None
    closes = _brace_partners(text)
    for end in reversed(ends):
        content = _argument(text, end, closes)
        if content is not None:
            return content.strip()
    return None


def boxed_answer(text: str) -> str | None:
    """The final answer a text states in its last box, cleaned as :func:`extract_answer` cleans
    it (surrounding ``$``, markdown bold, a trailing period); None when there is none.

    MATH ground truth (``data/problem.py``) is read with this, so a reference solution and a
    response boxing the same thing yield the same string.
    """
    box = last_boxed(text)
    if box is None:
        return None
    return _clean(box) or None


def _after_marker(tail: str) -> str | None:
    """The answer text that follows a "The final answer is" marker."""
    s = tail.lstrip(" \t")
    if s.startswith(":"):
        s = s[1:]
    s = s.lstrip()
    s = s.removeprefix("**").lstrip()  # markdown bold around the answer
    for opener, closer in _DELIMS:
        if s.startswith(opener):
            end = s.find(closer, len(opener))
            while opener == "$" and end > 0 and s[end - 1] == "\\":  # "\$" is a literal dollar
                end = s.find(closer, end + 1)
            if end >= 0:
                return s[len(opener):end]
            break
    box = _BOX.match(s)
    if box:
        return _argument(s, box.end())
    line = s.split("\n", 1)[0]
    boxed = last_boxed(line)  # "The final answer is:\n\nso \boxed{11}"
    if boxed is not None:
        return boxed
    line = _TRAILER.sub("", line)
    m = _SENTENCE_END.search(line)
    if m:
        line = line[:m.start()]
    return line


def _clean(ans: str) -> str:
    ans = ans.strip()
    for _ in range(3):  # peel trailing punctuation / markup in any order: "$5$.", "**5**."
        before = ans
        ans = ans.rstrip(" .").removesuffix("**").rstrip()
        if ans.endswith("$") and not ans.endswith("\\$"):
            ans = ans[:-1]
        ans = ans.removeprefix("**").lstrip()
        if ans.startswith("$"):
            ans = ans[1:]
        if ans == before:
            break
    return ans.strip()


def extract_answer(response: str) -> str | None:
    """The final answer of ``response`` as a string, or None when there is none.

    Text after the last "The final answer is" (case-insensitive) up to the end of that line or
    sentence, with surrounding ``$``, markdown bold and a trailing period removed; otherwise the
    last ``\\boxed{}``/``\\fbox{}`` with balanced braces. Answers longer than MAX_ANSWER_CHARS
    are rejected (None): no MATH answer is that long, and the checker's cost grows with length.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    tail = response[-MAX_RESPONSE_CHARS:]
    last = None
    for last in _MARKER.finditer(tail):
        pass
    ans = None
    if last is not None:
        ans = _after_marker(tail[last.end():])
        if ans is not None:
            ans = _clean(ans)
    if not ans:
        ans = boxed_answer(tail)
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans
