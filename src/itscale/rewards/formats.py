"""How a tag-style process reward model reads a solution (Math-Shepherd / RLHFlow).

The PRM sees the problem as the user turn of its chat template and the solution as
the assistant turn, with a *tag* after every step::

    <chat prompt for the problem>7+5=12§\n12*3=36§\nAnswer: 36§\n

The score of step t is the model's probability of the *good* token at the position
of the t-th tag, normalised over the good and bad tokens:

    s_t = p(good | …step_t tag) / (p(good | …) + p(bad | …)).

Because the model is causal, one forward pass over the tagged text scores every
step; a completions server gives the same numbers through prompt log-probabilities
at the token after each tag (the good/bad tokens are among its top alternatives).
The embedded PRM uses tag ``§``, good ``+``, bad ``-``; Math-Shepherd checkpoints use
tag ``ки`` with the same good/bad tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TagFormat:
    tag: str = "§"
    good: str = "+"
    bad: str = "-"
    separator: str = "\n"

    def render_steps(self, steps: Sequence[str], delimiter: str = "\n") -> str:
        """The assistant text: each step without its delimiter, then tag and separator."""
        return "".join(self.strip(s, delimiter) + self.tag + self.separator for s in steps)

    @staticmethod
    def strip(step: str, delimiter: str) -> str:
        return step[: -len(delimiter)] if delimiter and step.endswith(delimiter) else step.rstrip("\n")


EMBEDDED_TAG_FORMAT = TagFormat()
