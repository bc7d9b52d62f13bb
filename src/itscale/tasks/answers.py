r"""Final-answer extraction and the key used to group equivalent answers.

Extraction, in order of preference: the last ``\boxed{…}`` (balanced braces), the
last ``#### N`` (GSM8K's marker), the last line that starts with
``Answer:``/``A:``/``The answer is``, the last "the answer is N" inside a line, the last number.
``answer_key`` normalises an answer for voting: whitespace, ``$``, a trailing
period and thousands separators are dropped and numbers are put in canonical form
(``3.0`` → ``3``, ``1/2`` stays a string). Bench grading uses math-verify on top.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"^\s*(?:final answer|answer|a|the answer is)\s*[:=]?\s*(.+?)\s*$", re.I | re.M)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]+?)\s*$", re.M)
_ANSWER_IS = re.compile(r"\bthe (?:final )?answer is[:\s]*(\S+)", re.I)


def last_boxed(text: str) -> str | None:
    r"""Contents of the last ``\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a solution's text, or None when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    inline = _ANSWER_IS.findall(text)
    if inline:
        return inline[-1].strip("$").rstrip(".,;:!$")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answer_key(answer: str | None) -> str | None:
    """A canonical string for grouping equivalent answers (None stays None)."""
    if answer is None:
        return None
    a = answer.strip().strip("$").strip().rstrip(".").replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    try:
        value = float(a)
    except ValueError:
        return a
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
