"""itscale serve with a Python function as its reward model (--prm module:function --prm-kind verifier)."""

from __future__ import annotations

import openai
import pytest

from .conftest import PROBLEM, ServeProcess

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]


@pytest.fixture(scope="module")
def verifier_server():
    with ServeProcess("verifier", ["--prm", "itscale.tasks.arithmetic:calculator_check", "--prm-kind", "verifier",
                                    "--request-timeout", "120"]).running() as server:
        yield server


def test_particle_filtering_is_guided_by_the_calculator_check(verifier_server):
    client = openai.OpenAI(base_url=verifier_server.url, api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny:pf-8", messages=[{"role": "user", "content": PROBLEM}], seed=1)
    block = r.model_extra["itscale"]
    assert block["method"] == "particle_filtering" and block["status"] == "ok"
    assert block["answer"] == "13" and r.choices[0].message.content.endswith("Answer: 13")  # 3+4=7, 7*2=14, 14-1=13
    # every surviving candidate passed the check at every step: its scores are ~1, and the PRM read no tokens
    assert all(c["score"] is None or c["score"] > 0.99 for c in block["candidates"]), block["candidates"]
    assert r.usage.model_extra.get("prm_tokens") == 0
    assert "PRM 'itscale.tasks.arithmetic:calculator_check'" in verifier_server.log_text()
