"""Fixtures for the generator tests: the tiny models of ``tests/conftest_models.py``, the
embedded policy (``hf``, with ``needs_zoo`` for the tests that use it) and its tokenizer, and
the server-sent-event encoding of mocked streamed replies.

Without the ``hf`` extra (torch, transformers) there are no model fixtures and every test
module here that needs one skips itself.
"""

import json
from importlib.util import find_spec

import pytest

from itscale import zoo

needs_zoo = pytest.mark.skipif(not (zoo.policy_path() / "config.json").is_file(),
                               reason="the embedded policy is not in the package")

if find_spec("torch") is not None and find_spec("transformers") is not None:
    from conftest_models import char_tokenizer, tiny_lm, tiny_lm_dir  # noqa: F401


@pytest.fixture(scope="module")
def hf():
    """The embedded policy on one torch thread, called in the caller's thread."""
    import torch

    from itscale.lm import HFGenerator

    torch.set_num_threads(1)
    return HFGenerator.from_pretrained(zoo.policy_path(), run_in_thread=False)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded policy's tokenizer (needs transformers: asked for only by modules that skip without it)."""
    from itscale.lm.loading import load_tokenizer

    return load_tokenizer(zoo.policy_path())


def sse(event: dict) -> bytes:
    """One server-sent event carrying ``event`` as JSON, as an OpenAI-compatible stream sends it."""
    return f"data: {json.dumps(event)}\n\n".encode()
