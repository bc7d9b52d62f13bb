r"""What a process reward model reads: one encoder for every PRM and for training.

A PRM reads the problem as the user turn of its chat template and the solution as
the assistant turn, each step followed by a *mark* token (and optionally more text)::

    text = chat_prompt(problem) + Σ_t (strip(s_t) + mark + after)

- a tag-style PRM (Math-Shepherd, RLHFlow, the embedded PRM): ``mark`` is the tag
  (``§``, ``ки``) and ``after`` the separator (``\n``); the score of step t is read from
  the next-token logits at the t-th mark;
- a token-classification PRM (Qwen2.5-Math-PRM): ``mark`` is the separator token
  (``<extra_0>``), ``after`` is empty; the score is the classifier's row at the mark.

``strip(s)`` removes the step delimiter that ends a step (:meth:`TagFormat.strip`).

The token ids are built *piece by piece*: the prompt's ids (with the tokenizer's special
tokens only when there is no chat template, see :func:`~itscale.lm.loading.chat_prompt`),
then for each step the ids of its stripped text, the mark's single id, and the ids of
``after``. So a mark is exactly one token wherever it falls, and a mark character a
policy happens to write inside a step is never read as a step boundary. For a
character-level tokenizer (the embedded models) these ids equal those of tokenizing
``text`` in one go; for a BPE tokenizer a token may differ at a step boundary (a
server that tokenizes ``text`` whole reads those).

:class:`PRMEncoder` is used by :class:`~itscale.rewards.hf.HFTagPRM`,
:class:`~itscale.rewards.hf.HFClassifierPRM`, :class:`~itscale.rewards.remote.RemoteTagPRM`,
:class:`~itscale.rewards.remote.RemoteRewardPRM` and the zoo's PRM training
(:func:`itscale.zoo.sampling.prm_encode`), so training and scoring read the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..lm.loading import ChatPrompts, encode, single_token_id
from .formats import TagFormat

__all__ = ["EncodedSteps", "PRMEncoder"]


@dataclass(frozen=True)
class EncodedSteps:
    """One request as the PRM reads it.

    ``text``: the whole input text; ``ids``: its token ids (built piece by piece);
    ``marks``: the index in ``ids`` of each step's mark; ``mark_ends``: the character
    offset in ``text`` just after each step's mark (a completions server scoring step t
    reads ``text[:mark_ends[t]]``)."""

    text: str
    ids: list[int]
    marks: list[int]
    mark_ends: list[int]


class PRMEncoder:
    """``chat_prompt(problem) + Σ_t (strip(s_t) + mark + after)`` as text and ids (module docstring).

    ``mark`` must be one token of ``tokenizer``; ``delimiter`` is the policy's step
    delimiter (removed from the end of each step); ``system_prompt`` is passed to the
    chat template."""

    def __init__(self, tokenizer: Any, mark: str, after: str = "", *, delimiter: str = "\n",
                 system_prompt: str | None = None, what: str = "the PRM tag"):
        self.tokenizer, self.mark, self.after, self.delimiter = tokenizer, mark, after, delimiter
        self.mark_id = single_token_id(tokenizer, mark, what)
        self.after_ids = encode(tokenizer, after)
        self._chat = ChatPrompts(tokenizer, system_prompt)
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt(self, problem_prompt: str) -> tuple[str, list[int]]:
        """The chat prompt's text and ids (memoised per problem prompt)."""
        text, special = self._chat(problem_prompt)
        ids = self._prompt_ids.get(problem_prompt)
        if ids is None:
            if len(self._prompt_ids) >= 4096:
                self._prompt_ids.clear()
            ids = self._prompt_ids[problem_prompt] = encode(self.tokenizer, text, add_special_tokens=special)
        return text, ids

    def adds_special_tokens(self) -> bool:
        """Whether the prompt is tokenized with the tokenizer's special tokens (no chat template)."""
        return self._chat("")[1]

    def step_text(self, step: str) -> str:
        """One step as the PRM reads it: ``strip(step) + mark + after``."""
        return TagFormat.strip(step, self.delimiter) + self.mark + self.after

    def step(self, step: str) -> tuple[list[int], int]:
        """One step's ids (``strip(step)``, the mark, ``after``) and the index of its mark in them."""
        body = encode(self.tokenizer, TagFormat.strip(step, self.delimiter))
        return body + [self.mark_id] + self.after_ids, len(body)

    def text(self, problem_prompt: str, steps: Sequence[str]) -> tuple[str, list[int]]:
        """The input text alone (nothing tokenized) and the offset just after each mark."""
        text, ends = self._chat(problem_prompt)[0], []
        for s in steps:
            text += TagFormat.strip(s, self.delimiter) + self.mark
            ends.append(len(text))
            text += self.after
        return text, ends

    def encode(self, problem_prompt: str, steps: Sequence[str]) -> EncodedSteps:
        """The whole input of a request (see :class:`EncodedSteps`)."""
        _, prompt_ids = self.prompt(problem_prompt)
        ids, marks = list(prompt_ids), []
        for s in steps:
            seg, at = self.step(s)
            marks.append(len(ids) + at)
            ids += seg
        text, ends = self.text(problem_prompt, steps)
        return EncodedSteps(text, ids, marks, ends)
