"""Find the final answer in a model response.

The AGRO prompt asks the model to end with "The final answer is X"; the reward reads X from the
LAST such marker (a model may restate the phrase mid-solution). Responses that box their answer
instead (``\\boxed{X}`` / ``\\fbox{X}``) are read from the last box. Everything here is plain
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
_TOKEN = re.compile(r"[^\s$]+")
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


def _box_content(text: str, cmd_end: int) -> str | None:
    """Content of a ``\\boxed`` whose command name ends at ``cmd_end``."""
    i = cmd_end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = matching_brace(text, i)
        return None if close < 0 else text[i + 1:close]
    # "\boxed 5": TeX takes a single token; accept a run up to whitespace or a math delimiter.
    m = _TOKEN.match(text, i)
    return m.group(0) if m else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``; None if absent/unclosed."""
    last = None
    for last in _BOX.finditer(text):
        pass
    return None if last is None else _box_content(text, last.end())


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
        return _box_content(s, box.end())
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
        ans = last_boxed(tail)
        ans = _clean(ans) if ans is not None else None
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans
