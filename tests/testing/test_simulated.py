"""The simulated task, policy, PRMs and verifier (itscale.testing.simulated)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from itscale.protocols import OutcomeScorer
from itscale.testing.simulated import SimulatedTask, count_tokens
from itscale.types import SamplingParams, ScoreRequest, StepRequest


def run(coro):
    return asyncio.run(coro)


def generate(policy, problem, prefix=(), k=1, temperature=1.0, seed=0, whole=False, top_p=1.0):
    from itscale.types import Step

    steps = tuple(Step(t) for t in prefix)
    stop = () if whole else (policy.task.delimiter,)
    request = StepRequest(problem, steps, k, SamplingParams(temperature=temperature, top_p=top_p, seed=seed), stop)
    (out,) = run(policy.generate_steps([request]))
    return out


def walk(task, problem, prefix=()):
    """Every node of the tree: (step texts so far, children)."""
    kids = task.children(problem, prefix)
    yield prefix, kids
    if "\\boxed{" not in kids[0][0]:
        for text, _, _ in kids:
            yield from walk(task, problem, prefix + (text,))


def solutions(task, problem, prefix=(), prob=1.0):
    """Every complete solution with its probability at temperature 1."""
    for text, p, _ in task.children(problem, prefix):
        if "\\boxed{" in text:
            yield prefix + (text,), prob * p
        else:
            yield from solutions(task, problem, prefix + (text,), prob * p)


@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=20, seed=0)


# -- the trees -------------------------------------------------------------------------
def test_trees_are_deterministic_per_seed():
    a, b, c = SimulatedTask(seed=3), SimulatedTask(seed=3), SimulatedTask(seed=4)
    deep = [t for t, _, _ in a.children(a.problems[5], ())][:1]
    deep += [a.children(a.problems[5], deep)[1][0]]
    # b explores a deep node first: node contents do not depend on exploration order
    assert b.children(b.problems[5], deep) == a.children(a.problems[5], deep)
    for pa, pb in zip(a.problems, b.problems):
        assert pa == pb and pa.meta == pb.meta
        assert list(walk(a, pa)) == list(walk(b, pb))
        assert a.accuracy(pa) == b.accuracy(pb)
    assert [p.answer for p in a.problems] != [p.answer for p in c.problems]


def test_problem_fields(task):
    lo, hi = task.depth
    for i, p in enumerate(task.problems):
        assert p.id == f"sim-{i}" and p.answer.isdigit()
        assert lo <= p.meta["depth"] <= hi
        depths = {len(sol) - 1 for sol, _ in solutions(task, p)}
        assert depths == {p.meta["depth"]}


def test_children_sum_to_one_correct_mass_and_wrong_stays_wrong(task):
    masses = []
    for p in task.problems:
        for prefix, kids in walk(task, p):
            assert math.isclose(sum(pr for _, pr, _ in kids), 1.0, rel_tol=1e-12)
            ok = all(task.step_labels(p, prefix)) if prefix else True
            is_answer = "\\boxed{" in kids[0][0]
            if is_answer:
                assert len(kids) == 1 and kids[0][2] == ok
            elif ok:
                assert len(kids) == task.branching and any(c for _, _, c in kids)
                assert not all(c for _, _, c in kids)
                masses.append(sum(pr for _, pr, c in kids if c))
            else:
                assert not any(c for _, _, c in kids)  # once wrong, all descendants wrong
            assert len({t for t, _, _ in kids}) == len(kids)
    masses = np.array(masses)
    assert abs(masses.mean() - task.p_correct) < 0.03
    assert np.all(np.abs(masses - task.p_correct) < 0.25)


def test_labels_and_final_answers(task):
    for p in task.problems:
        wrong_answers = Counter()
        for sol, prob in solutions(task, p):
            labels = task.step_labels(p, sol)
            assert labels == sorted(labels, reverse=True)  # True…True False…False
            text = "".join(sol)
            assert task.is_correct(p, text) == labels[-1] == all(labels)
            if not labels[-1]:
                wrong_answers[text[text.rindex("{") + 1 : text.rindex("}")]] += prob
        assert 1 <= len(wrong_answers) <= task.n_wrong_answers and p.answer not in wrong_answers
    # majority vote is foolable: on some problems one wrong answer is likelier than the right one
    fooled = 0
    for p in task.problems:
        wrong = Counter()
        for sol, prob in solutions(task, p):
            if not task.is_correct(p, "".join(sol)):
                wrong["".join(sol)[-8:]] += prob
        fooled += max(wrong.values()) > task.accuracy(p)
    assert fooled >= 2


def test_value_is_exact_enumeration(task):
    for p in task.problems[:5]:
        total = sum(prob for sol, prob in solutions(task, p) if task.is_correct(p, "".join(sol)))
        assert math.isclose(task.accuracy(p), total, rel_tol=1e-12)
        # greedy (T=0) follows the most probable child at each node
        prefix = ()
        while True:
            kids = task.children(p, prefix)
            prefix += (max(kids, key=lambda c: c[1])[0],)
            if "\\boxed{" in prefix[-1]:
                break
        assert task.accuracy(p, temperature=0.0) == float(task.is_correct(p, "".join(prefix)))


def test_invalid_task_arguments():
    for kwargs in ({"branching": 1}, {"depth": (3, 2)}, {"p_correct": 1.5}, {"delimiter": " "}, {"n_wrong_answers": 0}):
        with pytest.raises(ValueError):
            SimulatedTask(**kwargs)


# -- the policy ------------------------------------------------------------------------
def test_the_verifier_is_an_outcome_scorer_and_the_policy_declares_what_it_can_do(task):
    # (the policy and PRM contracts: tests/testing/test_contracts.py)
    assert isinstance(task.verifier(), OutcomeScorer)
    assert task.policy().capabilities.logprobs and task.policy().capabilities.n_per_request


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_step_frequencies_match_children(task, temperature, report_statistic):
    p = task.problems[2]
    for prefix in [(), (task.children(p, ())[0][0],)]:
        kids = task.children(p, prefix)
        out = generate(task.policy(), p, prefix, k=6000, temperature=temperature, seed=11)
        counts = Counter(s.text for s in out)
        w = np.array([pr for _, pr, _ in kids]) ** (1 / temperature)
        expected = 6000 * w / w.sum()
        chi = stats.chisquare([counts[t] for t, _, _ in kids], expected)
        report_statistic("correct", "chi2 p-value", chi.pvalue, "pass" if chi.pvalue > 1e-3 else "FAIL")
        assert chi.pvalue > 1e-3
        for s in out[:50]:
            j = [t for t, _, _ in kids].index(s.text)
            assert math.isclose(s.logprob, math.log(w[j] / w.sum()), rel_tol=1e-9)
            assert s.finish_reason == "stop" and s.text.endswith(task.delimiter)


def test_temperature_zero_is_greedy(task):
    for p in task.problems[:5]:
        kids = task.children(p, ())
        best = max(kids, key=lambda c: c[1])[0]
        out = generate(task.policy(), p, k=20, temperature=0.0, seed=5)
        assert {s.text for s in out} == {best} and all(s.logprob == 0.0 for s in out)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_full_solution_accuracy_matches(task, temperature, report_statistic):
    n = 4000
    for p in task.problems[:3]:
        out = generate(task.policy(), p, k=n, temperature=temperature, seed=7, whole=True)
        assert all(s.finish_reason == "eos" and "\\boxed{" in s.text for s in out)
        hits = sum(task.is_correct(p, s.text) for s in out)
        acc = task.accuracy(p, temperature)
        z = (hits / n - acc) / math.sqrt(acc * (1 - acc) / n)
        report_statistic("correct", "z accuracy", z, "pass" if abs(z) < 4 else "FAIL")
        assert abs(z) < 4
        # a whole solution is the concatenation of tree steps: it parses back
        sol = out[0].text
        assert task.step_labels(p, (sol,)) == [task.is_correct(p, sol)]


def test_value_agrees_with_monte_carlo_from_a_prefix(task, report_statistic):
    p = task.problems[4]
    first = [t for t, _, c in task.children(p, ()) if c][0]
    n = 4000
    for prefix in [(first,), (first, task.children(p, (first,))[0][0])]:
        v = task.value(p, prefix)
        out = generate(task.policy(), p, prefix, k=n, seed=3, whole=True)
        hits = sum(task.is_correct(p, "".join(prefix) + s.text) for s in out)
        z = (hits / n - v) / math.sqrt(max(v * (1 - v), 1e-9) / n)
        report_statistic("correct", "z value", z, "pass" if abs(z) < 4 else "FAIL")
        assert abs(z) < 4


def test_seeds_make_outputs_reproducible(task):
    p = task.problems[1]
    a = generate(task.policy(), p, k=10, seed=42, whole=True)
    b = generate(task.policy(), p, k=10, seed=42, whole=True)
    c = generate(task.policy(), p, k=10, seed=43, whole=True)
    assert a == b and a != c
    # seedless requests: deterministic given the call sequence, different from call to call
    runs = []
    for _ in range(2):
        policy = task.policy()
        runs.append([generate(policy, p, k=10, seed=None, whole=True) for _ in range(2)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_distinct_enumerates_every_child(task):
    policy = task.policy(distinct=True)
    b = task.branching
    for p in task.problems[:5]:
        kids = [t for t, _, _ in task.children(p, ())]
        for seed in range(5):
            out = generate(policy, p, k=b, seed=seed)
            assert sorted(s.text for s in out) == sorted(kids)
            twice = Counter(s.text for s in generate(policy, p, k=2 * b, seed=seed))
            assert set(twice.values()) == {2}
        full = generate(policy, p, k=b, seed=1, whole=True)
        assert sorted(s.text.split(task.delimiter)[0] + task.delimiter for s in full) == sorted(kids)


def test_fail_rate(task, report_statistic):
    n, rate = 5000, 0.3
    out = generate(task.policy(fail_rate=rate), task.problems[0], k=n, seed=9)
    failed = [s for s in out if s.failed]
    assert all(s.text == "" and s.error == "simulated failure" for s in failed)
    z = (len(failed) / n - rate) / math.sqrt(rate * (1 - rate) / n)
    report_statistic("correct", "z fail rate", z, "pass" if abs(z) < 4 else "FAIL")
    assert abs(z) < 4
    assert not any(s.failed for s in generate(task.policy(), task.problems[0], k=500, seed=9))


def test_token_counts_and_prompt_tokens_only_on_first(task):
    p = task.problems[3]
    prefix = (task.children(p, ())[1][0],)
    for whole in (False, True):
        out = generate(task.policy(), p, prefix, k=5, seed=2, whole=whole)
        assert out[0].prompt_tokens == count_tokens(p.prompt) + count_tokens(prefix[0]) > 0
        assert all(s.prompt_tokens == 0 for s in out[1:])
        assert all(s.tokens == len(s.text.split()) for s in out)


def test_answer_step_ends_with_eos(task):
    p = task.problems[0]
    prefix = ()
    while True:
        (step,) = generate(task.policy(), p, prefix, k=1, seed=len(prefix))
        prefix += (step.text,)
        if step.finish_reason == "eos":
            break
        assert step.finish_reason == "stop"
    assert "\\boxed{" in prefix[-1] and len(prefix) == p.meta["depth"] + 1


def test_counters(task):
    policy = task.policy()
    requests = [StepRequest(q, (), k, SamplingParams(seed=k), ("\n\n",)) for k, q in enumerate(task.problems[:4], 1)]
    run(policy.generate_steps(requests))
    run(policy.generate_steps(requests[:2]))
    assert policy.calls == 2 and policy.requests_log == [4, 2] and policy.continuations == 10 + 3


def test_request_errors_are_clear(task):
    p = task.problems[0]
    policy = task.policy()
    finished = next(solutions(task, p))[0]
    assert task.children(p, finished) == []
    with pytest.raises(ValueError, match="already a finished solution"):
        generate(policy, p, finished)
    with pytest.raises(ValueError, match="does not parse"):
        generate(policy, p, ("Let me think.\n\n",))
    for extra in (finished[0], task.delimiter + finished[0]):
        with pytest.raises(ValueError, match="continues after the final answer"):
            task.value(p, finished + (extra,))
    with pytest.raises(ValueError, match="not a problem of this SimulatedTask"):
        generate(policy, SimulatedTask(seed=99).problems[0])
    with pytest.raises(ValueError, match="stop"):
        run(policy.generate_steps([StepRequest(p, (), 1, SamplingParams(seed=0), ("</s>",))]))
    with pytest.raises(ValueError, match="does not parse"):
        run(task.prm().score_steps([ScoreRequest(p, ("nonsense\n\n",))]))
    assert policy.calls == 0


# -- PRMs and the verifier --------------------------------------------------------------
def all_prefixes(task, problems):
    out = []
    for p in problems:
        for prefix, kids in walk(task, p):
            for text, _, _ in kids:
                out.append((p, prefix + (text,)))
    return out


def test_perfect_prm(task):
    prm = task.prm()
    items = all_prefixes(task, task.problems[:8])
    results = run(prm.score_steps([ScoreRequest(p, s) for p, s in items]))
    assert prm.calls == 1 and prm.requests_log == [len(items)]
    for (p, steps), res in zip(items, results):
        assert len(res.scores) == len(steps)
        assert res.tokens == count_tokens(p.prompt) + count_tokens("".join(steps))
        for label, score in zip(task.step_labels(p, steps), res.scores):
            assert 0 < score < 1
            assert score > 0.9 if label else score < 0.1


def auroc(scores, labels):
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    u = stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    return u / (labels.sum() * (~labels).sum())


def test_noisy_prm_auroc_decreases_with_noise(task, report_statistic):
    items = all_prefixes(task, task.problems)
    labels = [task.step_labels(p, s)[-1] for p, s in items]
    values = []
    for noise in (0.0, 2.0, 4.0, 8.0):
        prm = task.prm(noise=noise, seed=1)
        scores = [r.scores[-1] for r in run(prm.score_steps([ScoreRequest(p, s) for p, s in items]))]
        values.append(auroc(scores, labels))
        report_statistic("correct", f"AUROC noise={noise}", values[-1], "")
    assert values[0] == 1.0
    assert all(0.5 < v < 1.0 for v in values[1:])
    assert values == sorted(values, reverse=True)


def test_prm_scores_are_deterministic_per_prefix(task):
    prm = task.prm(noise=2.0, seed=5)
    items = all_prefixes(task, task.problems[:3])
    requests = [ScoreRequest(p, s) for p, s in items]
    alone = [run(prm.score_steps([r]))[0].scores for r in requests[:20]]
    batch = run(prm.score_steps(requests[::-1]))[::-1]
    assert [b.scores for b in batch[:20]] == alone
    # a prefix scores the same wherever it appears: inside longer requests, or joined into one step
    by_prefix = {}
    for (p, steps), res in zip(items, batch):
        for n, score in enumerate(res.scores, 1):
            assert by_prefix.setdefault((p.id, steps[:n]), score) == score
        joined = run(prm.score_steps([ScoreRequest(p, ("".join(steps),))]))[0]
        assert joined.scores == (res.scores[-1],)
    assert task.prm(noise=2.0, seed=6).score(*items[5]) != prm.score(*items[5])


def test_value_prm_tracks_the_value(task):
    prm = task.prm(signal="value")
    for p, steps in all_prefixes(task, task.problems[:3]):
        v = min(max(task.value(p, steps), 1e-3), 1 - 1e-3)
        assert math.isclose(prm.score(p, steps), v, rel_tol=1e-9)
    with pytest.raises(ValueError):
        task.prm(signal="oracle")


def test_verifier(task):
    verifier = task.verifier()
    sols = [(p, sol) for p in task.problems[:4] for sol, _ in solutions(task, p)]
    scores = run(verifier.score_final([ScoreRequest(p, s) for p, s in sols]))
    assert scores == [float(all(task.step_labels(p, s))) for p, s in sols]
    assert 0 < sum(scores) < len(scores) and verifier.calls == 1


def test_single_newline_delimiter_round_trips():
    task = SimulatedTask(n_problems=3, seed=2, delimiter="\n")
    for p in task.problems:
        (sol,) = generate(task.policy(), p, k=1, seed=4, whole=True)
        parts = sol.text.split("\n")
        steps = tuple(s + "\n" for s in parts[:-1]) + (parts[-1],)
        assert len(steps) == p.meta["depth"] + 1
        assert task.step_labels(p, steps)[-1] == task.is_correct(p, sol.text)
        assert task.prm().score(p, steps) == task.prm().score(p, (sol.text,))


def test_top_p_keeps_the_nucleus(task):
    p = task.problems[6]
    kids = sorted(task.children(p, ()), key=lambda c: -c[1])
    out = generate(task.policy(), p, k=300, seed=8, top_p=kids[0][1] * 0.99)
    assert {s.text for s in out} == {kids[0][0]} and all(s.logprob == 0.0 for s in out)


# -- confidence: top_logprobs and stop_below ---------------------------------------------------
def _confidence_request(problem, prefix=(), k=4, seed=0, stop=None, whole=False, temperature=1.0, n=1):
    from itscale.types import ConfidenceStop, Step

    params = SamplingParams(temperature=temperature, seed=seed, top_logprobs=k,
                            stop_below=None if stop is None else ConfidenceStop(*stop))
    return StepRequest(problem, tuple(Step(t) for t in prefix), n, params, () if whole else ("\n\n",))


def test_simulated_top_logprobs_follow_the_step_probability(task):
    """Each word of a sampled step gets the top-k of P(j) = r(1-r)^{j-1}, r = clip(p, 0.1, 0.99), p the
    step's raw probability (whatever the temperature); with k = 20 a less probable step has less
    confident words."""
    from itscale.lm.confidence import token_confidence
    from itscale.testing.simulated import simulated_top_logprobs

    policy, problem = task.policy(), task.problems[0]
    children = {text: p for text, p, _ in task.children(problem, ())}
    (steps,) = run(policy.generate_steps([_confidence_request(problem, k=4, n=12, temperature=2.0)]))
    seen = set()
    for step in steps:
        p, words = children[step.text], count_tokens(step.text)
        r = min(max(p, 0.1), 0.99)
        want = tuple(math.log(r) + j * math.log(1 - r) for j in range(4))
        assert step.top_logprobs == (want,) * words and step.tokens == words
        assert want == pytest.approx(simulated_top_logprobs(p, 4))
        assert sum(math.exp(v) for v in want) < 1 and list(want) == sorted(want, reverse=True)
        seen.add(step.text)
    assert len(seen) >= 2
    # k = 20 (DeepConf's): the confidence rises with the step's probability
    by_p = sorted(children.items(), key=lambda kv: kv[1])
    confs = [token_confidence(simulated_top_logprobs(p, 20)) for _, p in by_p]
    assert confs == sorted(confs) and confs[0] < confs[-1]
    # whole solutions: one tuple per word across the steps; no top_logprobs unless asked
    (whole,) = run(policy.generate_steps([_confidence_request(problem, whole=True)]))
    assert len(whole[0].top_logprobs) == whole[0].tokens == count_tokens(whole[0].text)
    assert generate(policy, problem)[0].top_logprobs is None


def test_simulated_stop_below_cuts_at_the_first_word_below(task):
    from itscale.lm.confidence import token_confidences

    policy, problem = task.policy(), task.problems[2]
    window = 3
    (full,) = run(policy.generate_steps([_confidence_request(problem, k=20, n=16, whole=True, seed=5)]))
    lows = [min(sum(c[i - window:i]) / window for i in range(window, len(c) + 1))
            for c in (token_confidences(s.top_logprobs) for s in full)]
    threshold = sorted(lows)[len(lows) // 2] + 1e-9  # about half the samples dip below it
    (cut,) = run(policy.generate_steps([_confidence_request(problem, k=20, n=16, whole=True, seed=5,
                                                            stop=(window, threshold))]))
    stopped = 0
    for f, s in zip(full, cut):
        c = token_confidences(f.top_logprobs)
        n = next((i for i in range(window, len(c) + 1) if sum(c[i - window:i]) / window < threshold), None)
        if n is None or n == len(c):  # never below, or only at the last word (which ends it anyway)
            assert (s.text, s.tokens, s.finish_reason, s.logprob) == (f.text, f.tokens, f.finish_reason, f.logprob)
            continue
        stopped += 1
        assert s.finish_reason == "low_confidence" and s.tokens == n == len(s.top_logprobs)
        assert s.top_logprobs == f.top_logprobs[:n]
        assert f.text.startswith(s.text) and count_tokens(s.text) == n and not s.text[-1].isspace()
        assert s.logprob >= f.logprob  # the kept words' share of the steps' log q (<= 0 each)
    assert 0 < stopped < len(full)
    fmt = __import__("itscale.types", fromlist=["StepFormat"]).StepFormat()
    assert fmt.is_final(next(s for s in cut if s.finish_reason == "low_confidence"), 1)  # the particle is finished


def test_simulated_race_refuses_stop_below_and_keeps_top_logprobs(task):
    policy, problem = task.policy(), task.problems[0]
    with pytest.raises(ValueError, match="stop_below"):
        run(policy.race(_confidence_request(problem, n=3, stop=(2, 1.0))))
    out = run(policy.race(_confidence_request(problem, n=3)))
    assert len(out.winner.top_logprobs) == out.winner.tokens


def test_wrappers_pass_top_logprobs_and_stop_below_through(task):
    """BatchedGenerator, Timed and the server's RequestPolicy give the steps the wrapped policy gives
    (top_logprobs, a low-confidence stop), and a low-confidence step ends the server's solution as cut."""
    from itscale.bench.backends import Timed
    from itscale.serve.engine import Progress, RequestPolicy
    from itscale.strategies.batching import BatchedGenerator, Coalescer

    problem = task.problems[2]
    requests = [_confidence_request(problem, k=20, n=8, whole=True, seed=5, stop=(3, 8.0)),
                _confidence_request(problem, k=2, n=3, seed=1)]
    (direct, steps) = run(task.policy().generate_steps(requests))
    assert any(s.finish_reason == "low_confidence" for s in direct) and steps[0].top_logprobs
    coalescer = Coalescer()

    async def batched():
        async with coalescer.member():
            return await BatchedGenerator(task.policy(), coalescer).generate_steps(requests)

    server = RequestPolicy(task.policy(), max_tokens=10_000, progress=Progress())
    for wrapped in (run(batched()), run(Timed(task.policy()).generate_steps(requests)),
                    run(server.generate_steps(requests))):
        assert wrapped == [direct, steps]
    assert server.cut(next(s for s in direct if s.finish_reason == "low_confidence"))
