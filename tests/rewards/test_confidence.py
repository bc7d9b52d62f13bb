"""The policy's own confidence as a PRM: mean log-probability equals what the generator reported
while sampling, self-certainty equals its definition, prefixes are cached, and particle filtering
runs on it with no reward model."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, save_model, tiny_causal_lm  # noqa: E402

import itscale  # noqa: E402
from itscale.lm import HFGenerator  # noqa: E402
from itscale.rewards import HFConfidencePRM  # noqa: E402
from itscale.rewards.confidence import prefix_means, token_confidence  # noqa: E402
from itscale.testing.contracts import PRMContract  # noqa: E402
from itscale.types import Problem, SamplingParams, ScoreRequest, StepRequest  # noqa: E402

from .bench_cli import bench_metrics  # noqa: E402

P1 = Problem("p1", "3+4*2=")
STEPS = ("4*2=8\n", "3+8=11\n", "Answer: 11")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_causal_lm(tok, seed=3, biases={"\n": 2.0, "<|end|>": -3.0})


def test_mean_logprob_is_the_mean_of_the_log_probabilities_the_generator_reported(tok, lm):
    """The generator sums log p of each token it samples (raw distribution); the PRM re-reads
    the same text and must find the same numbers: s_t = σ(Σ logprob / Σ tokens) over steps 1..t."""
    gen = HFGenerator(lm, tok, run_in_thread=False)
    prm = HFConfidencePRM(lm, tok, measure="mean-logprob", run_in_thread=False)
    steps = ()
    for i in range(3):
        params = SamplingParams(0.9, seed=10 + i, max_step_tokens=12)
        (out,) = gen.generate_steps_sync([StepRequest(P1, steps, 1, params, ("\n",))])
        if out[0].finish_reason == "eos":
            break
        steps += (out[0],)
    assert len(steps) >= 2
    scores = prm.score_steps_sync([ScoreRequest(P1, tuple(s.text for s in steps))])[0].scores
    logprob = tokens = 0.0
    for step, score in zip(steps, scores):
        logprob, tokens = logprob + step.logprob, tokens + step.tokens
        assert score == pytest.approx(1 / (1 + math.exp(-logprob / tokens)), rel=1e-5)


def test_self_certainty_is_the_mean_kl_from_uniform_of_each_next_token_distribution(tok, lm):
    prm = HFConfidencePRM(lm, tok, run_in_thread=False)
    scores = prm.score_steps_sync([ScoreRequest(P1, STEPS)])[0].scores
    prompt = tok.apply_chat_template([{"role": "user", "content": P1.prompt}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok.encode(prompt + "".join(STEPS), add_special_tokens=False)
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].double(), -1)
    V = logp.shape[-1]
    kl = [float(-math.log(V) - logp[i - 1].mean()) for i in range(n_prompt, len(ids))]  # KL(U || p) per token
    assert min(kl) > 0
    end = 0
    for step, score in zip(STEPS, scores):
        end += len(step)  # one character, one token
        assert score == pytest.approx(1 / (1 + math.exp(math.log(V) - sum(kl[:end]) / end)), rel=1e-6)


def test_the_measures_order_a_confident_distribution_above_a_flat_one():
    flat, peaked = torch.zeros(1, 10), torch.tensor([[9.0] + [0.0] * 9])
    target = torch.tensor([0])
    assert token_confidence(flat, target, "self-certainty").item() == pytest.approx(0.0, abs=1e-12)
    assert token_confidence(peaked, target, "self-certainty").item() > 1.0
    logprob = lambda logits: token_confidence(logits, target, "mean-logprob").item()  # noqa: E731
    assert logprob(peaked) > logprob(flat)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert prefix_means([-1.0, -3.0], [1, 2], 0.0) == pytest.approx([sigmoid(-1), sigmoid(-2)])
    assert prefix_means([1.0, 3.0], [0, 2], 5.0) == pytest.approx([0.5, sigmoid(2 - 5)])


def test_scored_prefixes_are_not_read_again(tok, lm):
    prm = HFConfidencePRM(lm, tok, run_in_thread=False)
    first = prm.score_steps_sync([ScoreRequest(P1, STEPS[:2]), ScoreRequest(P1, STEPS[:2])])
    assert first[0].tokens > 0 and first[1].tokens == 0 and prm.stats.sequences == 1
    again = prm.score_steps_sync([ScoreRequest(P1, STEPS[:2])])[0]
    assert again.tokens == 0 and again.scores == first[0].scores
    longer = prm.score_steps_sync([ScoreRequest(P1, STEPS)])[0]
    assert longer.scores[:2] == pytest.approx(first[0].scores, rel=1e-9)  # step t depends on steps 1..t only


def test_a_long_batch_is_split_so_its_logits_fit_and_scores_do_not_change(tok, lm, monkeypatch):
    import itscale.rewards.confidence as confidence

    reqs = [ScoreRequest(P1, STEPS[: 1 + i % 3] + ("7" * i + "\n",)) for i in range(6)]
    whole = HFConfidencePRM(lm, tok, run_in_thread=False).score_steps_sync(reqs)
    monkeypatch.setattr(confidence, "_LOGITS_BUDGET", 1)
    split = HFConfidencePRM(lm, tok, run_in_thread=False)
    parts = split.score_steps_sync(reqs)
    assert split.stats.forward_passes == 6
    for a, b in zip(whole, parts):
        assert a.scores == pytest.approx(b.scores, rel=1e-5)


def test_a_spec_of_kind_confidence_loads_the_policy_and_refuses_what_it_cannot_do(tmp_path, tok, lm):
    folder = save_model(lm, tok, tmp_path / "policy")
    prm = itscale.load_prm(str(folder), kind="confidence", measure="mean-logprob", device="cpu")
    assert isinstance(prm, HFConfidencePRM) and prm.measure == "mean-logprob"
    embedded = itscale.load_prm("embedded", kind="confidence")
    assert embedded.model.config.vocab_size == itscale.load_policy().model.config.vocab_size
    with pytest.raises(ValueError, match="measure: only kind: confidence"):
        itscale.load_prm(str(folder), kind="tag", measure="mean-logprob")
    with pytest.raises(ValueError, match="kind: confidence reads the model's logits"):
        itscale.load_prm("http://127.0.0.1:9/v1", kind="confidence")
    with pytest.raises(ValueError, match="measure"):
        itscale.load_prm(str(folder), kind="confidence", measure="entropy")


def test_the_bench_runs_particle_filtering_on_the_policys_confidence_alone(tmp_path):
    """The embedded policy and no trained PRM: particle filtering and best-of-N weighted by the
    policy's own self-certainty, through itscale bench."""
    rows = bench_metrics(tmp_path, "problems: {source: 'arithmetic:medium', limit: 12}\nprm: {kind: confidence}\n"
                                   "methods: [{name: greedy}, {name: best_of_n}, {name: particle_filtering}]\n"
                                   "budgets: [4]\n")
    assert set(rows) == {"greedy", "best_of_n", "particle_filtering"}
    assert all(r["errors"] == "0" and r["n"] == "12" for r in rows.values()), rows
    assert float(rows["greedy"]["prm_tokens"]) == 0  # greedy reads no scores; the others read the policy's
    assert float(rows["best_of_n"]["prm_tokens"]) > 0 and float(rows["particle_filtering"]["prm_tokens"]) > 0


class TestConfidenceContract(PRMContract):
    @pytest.fixture
    def prm(self, tok, lm):
        return HFConfidencePRM(lm, tok)
