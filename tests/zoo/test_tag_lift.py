"""zoo.tag_lift: the good and bad tokens end on top after every tag, and no score moves."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.tasks import arithmetic as A  # noqa: E402
from itscale.zoo.sampling import prm_encode, prm_scores, tag_ids  # noqa: E402
from itscale.zoo.slips import slipped_solution  # noqa: E402
from itscale.zoo.tag_lift import lift_tag_tokens  # noqa: E402


def _items(problems):
    import numpy as np

    rng = np.random.default_rng(0)
    refs = [(p, A.reference_steps(*A.parse_prompt(p.prompt))) for p in problems]
    slipped = [slipped_solution(p, "off_by_1", rng) for p in problems]
    return refs + [(p, s[0]) for p, s in zip(problems, slipped) if s is not None]


def _gaps(model, tok, items):
    """Per tag: the weaker of good/bad minus the best other token's logit."""
    _, good, bad = tag_ids(tok)
    out = []
    with torch.no_grad():
        for p, steps in items:
            ids, tags = prm_encode(tok, p, steps)
            logits = model(input_ids=torch.tensor([ids])).logits[0, tags]
            others = logits.clone()
            others[:, [good, bad]] = -torch.inf
            out += (torch.minimum(logits[:, good], logits[:, bad]) - others.max(dim=1).values).tolist()
    return out


def test_lifting_puts_both_tokens_on_top_and_moves_no_score():
    tok = transformers.AutoTokenizer.from_pretrained(zoo.policy_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.policy_path()).eval()  # untrained tags: not on top
    fit, held_out = A.eval_set("easy")[:200], A.eval_set("easy")[200:240]
    assert min(_gaps(model, tok, _items(held_out))) < 0
    before = prm_scores(model, tok, _items(held_out))
    info = lift_tag_tokens(model, tok, _items(fit), margin=8.0)
    assert info["min_gap_before"] < 0 and info["min_gap_after"] >= 7.0
    assert min(_gaps(model, tok, _items(held_out))) > 0  # on solutions it was not fitted on too
    after = prm_scores(model, tok, _items(held_out))
    assert max(abs(a - b) for ra, rb in zip(before, after) for a, b in zip(ra, rb)) < 1e-4


def test_the_shipped_prm_has_both_tokens_on_top_after_every_tag():
    """What a server's top-k log-probabilities need (RemoteTagPRM); the policy read as a PRM fails it."""
    problems = A.eval_set("medium")[:60]
    for folder, on_top in ((zoo.prm_path(), True), (zoo.policy_path(), False)):
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (min(_gaps(model, tok, _items(problems))) > 0) is on_top, folder
