"""Cache namespaces on a real vLLM server: a namespaced request carries ``cache_salt``, vLLM
accepts it, and its prefix cache then serves a namespace only what that namespace's own
requests left there (read from ``usage.prompt_tokens_details.cached_tokens``, which vLLM
reports with ``--enable-prompt-tokens-details``).

One vLLM server for the embedded policy, started for this module. Needs ``.venv-vllm``
(``make test`` creates it); ``ITSCALE_SKIP_VLLM=1`` skips."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httpx")
pytest.importorskip("transformers")

from servers import BLOCK_SIZE, VLLMServer, require_vllm  # noqa: E402

from itscale import zoo  # noqa: E402
from itscale.lm import EndpointPool, OpenAIGenerator  # noqa: E402
from itscale.types import Problem, SamplingParams, StepRequest  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("vllm")]

POLICY = zoo.policy_path()
PROBLEM = Problem("p", "Start at 12. Apply in order: +7, *3, -5, +11, *2, -9, +4, *3, -6, +8, *2.")  # > 2 KV blocks


@pytest.fixture(scope="module")
def url():
    require_vllm()
    with VLLMServer(POLICY, extra_args=["--enable-prompt-tokens-details"]) as base:
        yield base


def ask(gen: OpenAIGenerator, namespace: str | None):
    request = StepRequest(PROBLEM, (), 1, SamplingParams(temperature=0.0, max_step_tokens=4, seed=0), ("\n",),
                          cache_namespace=namespace)

    async def go():
        return (await gen.generate_steps([request]))[0][0]

    return asyncio.run(go())


def test_a_namespace_reads_only_its_own_prefix_cache(url):
    gen = OpenAIGenerator(EndpointPool(url, backoff_base=0.01), str(POLICY), merge_prompts=1)
    assert gen.context_tokens(PROBLEM.prompt) > 2 * BLOCK_SIZE
    a1 = ask(gen, "tenant-a")
    assert not a1.failed and gen.extensions is True  # vLLM took the cache_salt field
    assert a1.prefilled_tokens == a1.prompt_tokens  # a cold cache
    a2 = ask(gen, "tenant-a")
    assert a2.prefilled_tokens <= a2.prompt_tokens - 2 * BLOCK_SIZE  # its own blocks are reused
    b1 = ask(gen, "tenant-b")
    assert b1.prefilled_tokens == b1.prompt_tokens  # tenant-a's blocks are not
    shared = ask(gen, None)  # no salt: the shared cache, which holds none of them either
    assert shared.prefilled_tokens == shared.prompt_tokens
    assert ask(gen, None).prefilled_tokens < shared.prompt_tokens
    assert a1.text == a2.text == b1.text == shared.text
