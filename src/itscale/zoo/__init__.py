"""The embedded model pair: a tiny policy and a tiny process reward model.

Both are Llama-architecture causal LMs over a character-level tokenizer, shipped in
Hugging Face format inside the package, trained on the synthetic arithmetic task
(:mod:`itscale.tasks.arithmetic`). They load with the same code path as any Hub
model::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from itscale import zoo

    tok = AutoTokenizer.from_pretrained(zoo.policy_path())
    policy = AutoModelForCausalLM.from_pretrained(zoo.policy_path())

The PRM reads ``chat prompt + EMBEDDED_TAG_FORMAT.render_steps(steps)`` and scores
step t as p(``+``) / (p(``+``) + p(``-``)) at the t-th ``§`` tag. See MODEL_CARD.md.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..rewards.formats import EMBEDDED_TAG_FORMAT, TagFormat
from ..tasks.arithmetic import ANSWER_PREFIX, DELIMITER, STEP_FORMAT, parse_prompt

#: The PRM's tag format and its three tokens (tag ``§``, good ``+``, bad ``-``).
PRM_TAG_FORMAT: TagFormat = EMBEDDED_TAG_FORMAT
PRM_TAG: str = EMBEDDED_TAG_FORMAT.tag
PRM_GOOD: str = EMBEDDED_TAG_FORMAT.good
PRM_BAD: str = EMBEDDED_TAG_FORMAT.bad

#: Chat special tokens of the shared tokenizer (``EOS_TOKEN`` ends every turn).
EOS_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
PAD_TOKEN = "<|pad|>"

#: The level whose held-out set the model card's headline numbers use.
DEFAULT_LEVEL = "medium"

#: The bench prompt template the pair was trained with: the task's bare prompt, no instructions.
PROMPT_TEMPLATE = "plain"

__all__ = [
    "ANSWER_PREFIX", "ASSISTANT_TOKEN", "DEFAULT_LEVEL", "DELIMITER", "EOS_TOKEN", "PAD_TOKEN", "PRM_BAD",
    "PRM_GOOD", "PRM_TAG", "PRM_TAG_FORMAT", "PROMPT_TEMPLATE", "STEP_FORMAT", "USER_TOKEN", "model_card_path",
    "off_task", "policy_path", "prm_path",
]


def _models() -> Path:
    return Path(str(resources.files(__name__))) / "models"


def policy_path() -> Path:
    """The shipped policy folder (Hugging Face format)."""
    return _models() / "policy"


def prm_path() -> Path:
    """The shipped process reward model folder (Hugging Face format)."""
    return _models() / "prm"


def model_card_path() -> Path:
    return Path(str(resources.files(__name__))) / "MODEL_CARD.md"


def off_task(prompt: str) -> str | None:
    """Why the embedded pair cannot be trusted on ``prompt`` — it is not a prompt of the
    arithmetic task they were trained on (``Start at 7. Apply in order: +5, *3.``) — or
    None when it is. The models answer anything with a confident line of arithmetic."""
    try:
        parse_prompt(prompt)
    except ValueError:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        return (f"the embedded model only knows the arithmetic task ('Start at 7. Apply in order: +5, *3.'); "
                f"{shown!r} is outside it, so its answer means nothing")
    return None
