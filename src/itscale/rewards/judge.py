r"""An LLM judge as a process reward model: any chat model asked whether the latest step is correct.

For a problem x and steps s_1..s_t the judge reads one chat turn per step t,

    c_t = chat_template([system?, user: template(question=x, previous_steps=s_1..s_{t−1}, step=s_t)],
                        add_generation_prompt=True)

and the score of step t is the judge's probability of answering *yes* rather than *no* as
the first token of its reply:

    s_t = p(yes | c_t) / (p(yes | c_t) + p(no | c_t))

where p(yes) sums the probabilities of every single-token spelling of the yes word
(``Yes``, ``␣Yes``, ``yes``, ``␣yes``) and likewise for no. Renormalising over the two
answers removes the mass the judge puts on anything else ("The", "I"), so s_t is the
judge's verdict, not its fluency. Step t's score depends only on (x, s_1..s_t), so scores
are cached by step prefix (:class:`~itscale.rewards.prefix_cache.PrefixScores`): a
particle filter asks about each new step once.

The template is a ``str.format`` string with the fields ``{question}``, ``{previous_steps}``
(the earlier steps, each stripped of the step delimiter, one per line; ``(none)`` before
the first) and ``{step}`` (required). :data:`DEFAULT_TEMPLATE` asks for Yes or No; a
template asking for other words must say so, and ``yes`` / ``no`` name them.

:class:`~itscale.rewards.hf.HFJudgePRM` runs a local Hugging Face model (a folder or a ``.gguf`` file): one
left-padded forward pass per batch of questions, reading only the last position's
logits. :class:`~itscale.rewards.remote.RemoteJudgePRM` asks an OpenAI-compatible completions server for one
token after ``c_t`` with its top log-probabilities (the chat template is applied here,
with the judge's tokenizer, so both read the same text); a yes or no spelling missing
from the top-k is bounded as in :func:`~itscale.rewards.remote.tag_score`. The judge's
own sampling settings play no part: only its next-token distribution is read.

Scores are clipped to [1e-12, 1 − 1e-12]. This module holds what both judges share (the
template, the question, the answer tokens) and imports neither torch nor httpx.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Sequence

from ..lm.loading import chat_prompt, encode
from ..types import ScoreRequest
from .formats import TagFormat

__all__ = ["DEFAULT_TEMPLATE", "JudgePrompt", "answer_ids", "answer_token_ids", "load_template"]

DEFAULT_TEMPLATE = """You are checking a solution to a math problem one step at a time.

Problem: {question}

Earlier steps:
{previous_steps}

Latest step:
{step}

Is the latest step correct? Answer Yes or No."""

_FIELDS = ("question", "previous_steps", "step")


def load_template(value: str | None) -> str:
    """A judge template: ``None`` → :data:`DEFAULT_TEMPLATE`; text containing ``{step}`` is the
    template itself; anything else names a text file holding it. ValueError names what is wrong."""
    if value is None:
        return DEFAULT_TEMPLATE
    if "{step}" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"template: {value!r} is neither a template (it has no {{step}} field) nor a file")
        value = path.read_text(encoding="utf-8")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as err:
        raise ValueError(f"template: not a format string ({err}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(fields - set(_FIELDS))
    if unknown:
        raise ValueError(f"template: unknown field(s) {unknown}; the fields are {{question}}, {{previous_steps}}, "
                         "{step}")
    if "step" not in fields:
        raise ValueError("template: it must contain {step}, the step being judged")
    return value


def answer_token_ids(tokenizer: Any, word: str, what: str) -> list[int]:
    """The ids of every single-token spelling of ``word`` (as written, capitalised, lower case,
    each with and without a leading space); ValueError when it has none."""
    spellings = dict.fromkeys(w for base in (word, word.capitalize(), word.lower()) for w in (base, " " + base))
    ids = [encode(tokenizer, s) for s in spellings]
    found = sorted({i[0] for i in ids if len(i) == 1})
    if not found:
        raise ValueError(f"{what} {word!r} is not a single token of the judge's tokenizer in any spelling "
                         f"({', '.join(map(repr, spellings))}); choose a word that is")
    return found


class JudgePrompt:
    """The judge's question about step t (module docstring), as text; ``system_prompt`` goes to the
    chat template (a tokenizer without one reads the question raw, with its special tokens)."""

    def __init__(self, tokenizer: Any, template: str | None = None, *, delimiter: str = "\n\n",
                 system_prompt: str | None = None):
        self.tokenizer, self.template, self.delimiter = tokenizer, load_template(template), delimiter
        self.system_prompt = system_prompt

    def question(self, problem_prompt: str, steps: Sequence[str], t: int) -> str:
        """The user turn about step ``t`` (0-based) of ``steps``."""
        body = [TagFormat.strip(s, self.delimiter).strip() for s in steps[: t + 1]]
        return self.template.format(question=problem_prompt.strip(), previous_steps="\n".join(body[:-1]) or "(none)",
                                    step=body[-1])

    def text(self, request: ScoreRequest, t: int) -> tuple[str, bool]:
        """The judge's whole input for step ``t`` and whether tokenizing it adds special tokens."""
        return chat_prompt(self.tokenizer, self.question(request.problem.prompt, request.steps, t), self.system_prompt)

    def ids(self, request: ScoreRequest, t: int) -> tuple[int, ...]:
        text, special = self.text(request, t)
        return tuple(encode(self.tokenizer, text, add_special_tokens=special))

    def adds_special_tokens(self) -> bool:
        """Whether a question is tokenized with the tokenizer's special tokens (no chat template)."""
        return chat_prompt(self.tokenizer, "", self.system_prompt)[1]


def answer_ids(tokenizer: Any, yes: str, no: str) -> tuple[list[int], list[int]]:
    """The yes and no token ids (:func:`answer_token_ids`); ValueError if the two words share a token."""
    yes_ids, no_ids = answer_token_ids(tokenizer, yes, "yes"), answer_token_ids(tokenizer, no, "no")
    if set(yes_ids) & set(no_ids):
        raise ValueError(f"yes {yes!r} and no {no!r} share a token; choose two different words")
    return yes_ids, no_ids
