"""Fixtures for the generator tests: the tiny models of ``tests/conftest_models.py``, the
embedded policy's tokenizer, and the server-sent-event encoding of mocked streamed replies.

Without the ``hf`` extra (torch, transformers) there are no model fixtures and every test
module here that needs one skips itself.
"""

import json
from importlib.util import find_spec

import pytest

if find_spec("torch") is not None and find_spec("transformers") is not None:
    from conftest_models import char_tokenizer, tiny_lm, tiny_lm_dir  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded policy's tokenizer (needs transformers: asked for only by modules that skip without it)."""
    from itscale import zoo
    from itscale.lm.loading import load_tokenizer

    return load_tokenizer(zoo.policy_path())


def sse(event: dict) -> bytes:
    """One server-sent event carrying ``event`` as JSON, as an OpenAI-compatible stream sends it."""
    return f"data: {json.dumps(event)}\n\n".encode()
