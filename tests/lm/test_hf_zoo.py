"""The Hugging Face backends on the embedded model pair, when it is in the package.

Skipped until ``src/itscale/zoo/models/{policy,prm}`` hold trained models.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.lm import HFGenerator  # noqa: E402
from itscale.rewards import HFTagPRM  # noqa: E402
from itscale.tasks.arithmetic import STEP_FORMAT, eval_set  # noqa: E402
from itscale.types import Particle, SamplingParams, ScoreRequest, StepRequest  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ((zoo.policy_path() / "config.json").is_file() and (zoo.prm_path() / "config.json").is_file()),
    reason="the embedded models are not in the package yet",
)


def test_zoo_policy_reuse_equals_recomputation():
    reuse = HFGenerator.from_pretrained(zoo.policy_path(), run_in_thread=False)
    plain = HFGenerator.from_pretrained(zoo.policy_path(), run_in_thread=False, reuse_cache=False)
    particles = [Particle(p) for p in eval_set()[:3] for _ in range(4)]
    worst = 0.0
    for r in range(3):
        reqs = [StepRequest(p.problem, p.steps, 2, SamplingParams(temperature=1.0, max_step_tokens=32, seed=10 * r + i),
                            (STEP_FORMAT.delimiter,)) for i, p in enumerate(particles) if not p.finished]
        if not reqs:
            break
        a, b = reuse.generate_steps_sync(reqs), plain.generate_steps_sync(reqs)
        for xs, ys in zip(a, b):
            assert [x.text for x in xs] == [y.text for y in ys]
            worst = max([worst] + [abs(x.logprob - y.logprob) for x, y in zip(xs, ys)])
        particles = [Particle(q.problem, q.steps + (xs[0],), STEP_FORMAT.is_final(xs[0], len(q.steps) + 1))
                     for q, xs in zip(reqs, a)]
    assert worst < 1e-4
    assert reuse.stats.prefilled_tokens < plain.stats.prefilled_tokens / 2


def test_zoo_prm_matches_a_direct_forward_pass():
    prm = HFTagPRM.from_pretrained(zoo.prm_path(), run_in_thread=False)
    problem = eval_set()[0]
    req = ScoreRequest(problem, ("1+1=2\n", "2*3=6\n"))
    (got,) = prm.score_steps_sync([req])
    ids, tags = prm.input_ids(req)
    with torch.no_grad():
        logits = prm.model(torch.tensor([ids])).logits[0].double()
    want = [torch.softmax(logits[t, [prm.good_id, prm.bad_id]], -1)[0].item() for t in tags]
    assert max(abs(a - b) for a, b in zip(got.scores, want)) < 1e-5
