"""Fixtures for the generator tests: the tiny models of ``tests/conftest_models.py``.

Without the ``hf`` extra (torch, transformers) there are no fixtures and every test
module here skips itself.
"""

from importlib.util import find_spec

if find_spec("torch") is not None and find_spec("transformers") is not None:
    from conftest_models import char_tokenizer, tiny_lm, tiny_lm_dir  # noqa: F401
