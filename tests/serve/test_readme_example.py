"""The README's ``itscale serve`` example prints exactly the output the README shows, and
answers its problems correctly (a real server with the embedded models, the ``openai`` client)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from itscale.tasks import arithmetic

from .conftest import ALICE

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://127.0.0.1:8000/v1"


def example() -> tuple[str, str]:
    """The serve example (the ``py`` block that builds the client) and the ``text`` block after it."""
    text = README.read_text()
    match = re.search(r"```py\n(from openai import OpenAI\n.*?)```\s*\n(?:[^`]*?\n)?```text\n(.*?)```", text, re.S)
    assert match, "README: the serve example must be a py block followed by a text block with its output"
    return match.group(1), match.group(2)


def test_the_readme_serve_example_prints_what_the_readme_shows(server):
    code, shown = example()
    assert f'base_url="{README_URL}", api_key="none"' in code
    code = code.replace(f'base_url="{README_URL}", api_key="none"', f'base_url="{server.url}", api_key="{ALICE}"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md[serve example]", "exec"), {})
    assert out.getvalue() == shown
    # and the solutions it shows are right
    problems = re.findall(r'"content": "(Start at [^"]+)"', code)
    answers = re.findall(r"^Answer: (-?\d+)$", shown, re.M)
    assert len(problems) == len(answers) == 2
    for prompt, answer in zip(problems, answers):
        start, ops = arithmetic.parse_prompt(prompt)
        assert arithmetic.reference_steps(start, ops)[-1] == f"Answer: {answer}"
