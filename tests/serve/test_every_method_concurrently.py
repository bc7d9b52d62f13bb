"""Every method the server runs on its embedded pair, all at once through the real server.

A hostile mix: every registered method (those the server's tag PRM serves) asked on the
session's main server at the same time, each twice with different seeds, 2 × methods requests
in flight on one process whose backend calls are shared across requests. Each answer must be
the answer the same request gets alone (an answer depends on its request and seed, not on the
traffic it shared backend calls with), every request must succeed, and each must report the
method and budget it asked for.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from itscale.strategies import STRATEGIES, make_strategy

from .conftest import ALICE

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]

PROMPTS = ["Start at 7. Apply in order: +5, *3, -9.", "Start at 12. Apply in order: -4, *6, +11."]
SEEDS = [31, 47]
#: Methods the main server cannot run as it is started: compute_optimal needs --allocation, and
#: self_certainty reads the policy's confidence (--prm-kind confidence), not a tag PRM.
NOT_HERE = {"compute_optimal", "self_certainty"}


def methods() -> list[tuple[str, int]]:
    """Each method with a small budget it takes (its shape: beam width, chains × rounds, …)."""
    out = []
    for name in sorted(set(STRATEGIES) - NOT_HERE):
        strategy = make_strategy(name, object(), object())  # (backends unused: only the budget shape)
        out.append((name, max(b for b in strategy.budgets_up_to(8) if b <= 8)))
    return out


def answer(body) -> tuple:
    block = body.model_extra["itscale"]
    return (block["method"], block["budget"], body.choices[0].message.content, block["answer"],
            # weights to 6 places: log-probabilities and PRM scores differ in their last bits between batch
            # shapes (RPC's summed path probabilities moved by 1e-8 when sharing calls)
            json.dumps([(c["answer"], round(c["weight"], 6)) for c in block["candidates"]]),
            body.usage.completion_tokens)


async def ask_all(url: str, asks: list[tuple[str, int, str, int]]) -> list:
    async with openai.AsyncOpenAI(base_url=url, api_key=ALICE, max_retries=0, timeout=300) as client:
        async def one(name, budget, prompt, seed):
            return await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], seed=seed, temperature=1.0,
                max_tokens=96, extra_body={"itscale": {"method": name, "budget": budget}})

        return await asyncio.gather(*(one(*a) for a in asks), return_exceptions=True)


def test_every_method_at_once_answers_as_it_does_alone(server):
    asks = [(name, budget, prompt, seed) for name, budget in methods() for prompt, seed in zip(PROMPTS, SEEDS)]
    assert len(asks) >= 2 * 20  # every method of issues 18 and 19 is in the mix
    together = asyncio.run(ask_all(server.url, asks))
    failed = [(a, r) for a, r in zip(asks, together) if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    for a, r in zip(asks, together):
        assert answer(r)[:2] == (a[0], a[1]), a  # the method and budget asked for
    alone = [asyncio.run(ask_all(server.url, [a]))[0] for a in asks]
    differ = [(a[0], answer(t), answer(s)) for a, t, s in zip(asks, together, alone) if answer(t) != answer(s)]
    assert not differ, differ[:3]
