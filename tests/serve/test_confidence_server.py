"""itscale serve weighting particles by the policy's own confidence (--prm-kind confidence): no reward model."""

from __future__ import annotations

import openai
import pytest

from .conftest import PROBLEM, ServeProcess

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]


@pytest.fixture(scope="module")
def confidence_server():
    with ServeProcess("confidence", ["--prm-kind", "confidence", "--prm-measure", "mean-logprob",
                                      "--request-timeout", "120"]).running() as server:
        yield server


def test_particle_filtering_runs_on_the_policys_own_confidence(confidence_server):
    client = openai.OpenAI(base_url=confidence_server.url, api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny:bon-4", messages=[{"role": "user", "content": PROBLEM}], seed=3)
    block = r.model_extra["itscale"]
    assert block["method"] == "best_of_n" and block["status"] == "ok", block
    scores = [c["score"] for c in block["candidates"]]
    assert len(scores) == 4 and all(0 < s < 0.5 for s in scores)  # σ(mean log p) with log p < 0
    best = max(block["candidates"], key=lambda c: c["score"])
    assert block["answer"] == best["answer"]  # best-of-N picks the most confident sample
    assert r.usage.model_extra.get("prm_tokens", 0) > 0
    pf = client.chat.completions.create(model="tiny:pf-4", messages=[{"role": "user", "content": PROBLEM}], seed=3)
    assert pf.model_extra["itscale"]["status"] == "ok" and pf.model_extra["itscale"]["answer"]
    assert "PRM 'embedded' (confidence)" in confidence_server.log_text()
