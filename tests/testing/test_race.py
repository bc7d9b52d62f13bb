"""Races (``itscale.protocols.Racer``) without a model: SimulatedPolicy's race semantics, and the
wrappers that pass races on (``BatchedGenerator``, the bench's ``Timed``, the server's
``RequestPolicy``) exactly when what they wrap races."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from itscale.protocols import Generator, Racer
from itscale.strategies.batching import BatchedGenerator, Coalescer
from itscale.testing.simulated import SimulatedTask
from itscale.types import RaceOutcome, SamplingParams, Step, StepRequest

TASK = SimulatedTask(n_problems=6, seed=3, depth=(2, 6))


def request(problem, k, seed, whole=True, steps=()):
    stop = () if whole else (TASK.delimiter,)
    return StepRequest(problem, tuple(Step(t) for t in steps), k, SamplingParams(temperature=1.0, seed=seed), stop)


def draw(policy, req):
    (steps,) = asyncio.run(policy.generate_steps([req]))
    return steps


def test_simulated_race_is_the_lock_step_race_of_the_samples_generate_steps_draws():
    policy = TASK.policy()
    not_first = 0
    for seed in range(12):
        req = request(TASK.problems[seed % 6], 5, seed)
        steps = draw(policy, req)
        lengths = [s.tokens for s in steps]
        out = asyncio.run(policy.race(req))
        shortest = min(lengths)
        assert out.index == lengths.index(shortest)  # fewest tokens, lowest index on ties
        assert dataclasses.replace(out.winner, prompt_tokens=0) == dataclasses.replace(steps[out.index], prompt_tokens=0)
        assert out.winner.prompt_tokens == steps[0].prompt_tokens > 0
        assert out.spent_tokens == 5 * shortest  # every sample generated L_min tokens before the race stopped
        assert out.cancelled == sum(n > shortest for n in lengths)
        not_first += out.index > 0
    assert not_first >= 3  # the winner is not simply sample 0


def test_simulated_race_of_step_requests_and_counters():
    policy = TASK.policy()
    problem = TASK.problems[0]
    first = TASK.children(problem, ())[0][0]
    req = request(problem, 4, 7, whole=False, steps=(first,))
    steps = draw(policy, req)
    calls, continuations = policy.calls, policy.continuations
    out = asyncio.run(policy.race(req))
    assert out.winner.text == steps[out.index].text and out.winner.finish_reason == "stop"
    assert out.spent_tokens == 4 * min(s.tokens for s in steps)
    assert (policy.calls - calls, policy.continuations - continuations) == (1, 4)
    with pytest.raises(ValueError, match="k >= 1"):
        asyncio.run(policy.race(request(problem, 0, 0)))


def test_simulated_race_failed_samples_do_not_win_or_spend():
    policy = TASK.policy(fail_rate=0.4)
    seen_failures = 0
    for seed in range(20):
        req = request(TASK.problems[seed % 6], 4, seed)
        steps = draw(policy, req)
        ok = [j for j, s in enumerate(steps) if not s.failed]
        out = asyncio.run(policy.race(req))
        if not ok:
            assert out.winner.failed and (out.index, out.spent_tokens, out.cancelled) == (0, 0, 0)
            continue
        shortest = min(steps[j].tokens for j in ok)
        assert not out.winner.failed and out.index == min(j for j in ok if steps[j].tokens == shortest)
        assert out.spent_tokens == len(ok) * shortest
        seen_failures += len(ok) < 4
    assert seen_failures >= 5
    dead = asyncio.run(TASK.policy(fail_rate=1.0).race(request(TASK.problems[0], 3, 0)))
    assert dead.winner.failed and dead.winner.error == "simulated failure" and dead.index == 0


# -- wrappers -----------------------------------------------------------------------------------
class NoRace:
    """A generator without the optional capability."""

    capabilities = TASK.policy().capabilities

    async def generate_steps(self, requests):
        return [[Step("x")] * r.k for r in requests]


class Recorder:
    """A racer that records what it was asked and answers a fixed outcome."""

    capabilities = TASK.policy().capabilities

    def __init__(self, outcome: RaceOutcome):
        self.outcome, self.seen = outcome, []

    async def generate_steps(self, requests):
        return [[Step("x", 1)] * r.k for r in requests]

    async def race(self, request):
        self.seen.append(request)
        return self.outcome


def test_batched_generator_and_timed_offer_race_only_when_their_inner_races():
    from itscale.bench.backends import Timed

    policy = TASK.policy()
    req = request(TASK.problems[1], 4, 5)
    for wrap in (lambda inner: BatchedGenerator(inner, Coalescer()), Timed):
        racing, plain = wrap(TASK.policy()), wrap(NoRace())
        assert isinstance(racing, Racer) and isinstance(racing, Generator)
        assert not isinstance(plain, Racer) and not hasattr(plain, "race") and isinstance(plain, Generator)
        assert asyncio.run(racing.race(req)) == asyncio.run(policy.race(req))
    timed = Timed(TASK.policy())
    asyncio.run(timed.race(req))
    assert timed.seconds > 0
    batched = BatchedGenerator(TASK.policy(), Coalescer())
    asyncio.run(batched.race(req))
    assert batched.coalescer.calls == {"policy": 1}  # a call of the local model, as coalesced calls count


def test_request_policy_passes_races_on_under_its_cap_and_charges_every_spent_token():
    from itscale.serve.engine import Progress, RequestPolicy

    charged = []
    winner = Step("Step 1: ...", 7, prompt_tokens=9, prefilled_tokens=3, finish_reason="length")
    inner = Recorder(RaceOutcome(winner, 2, 40, 3))
    view = RequestPolicy(BatchedGenerator(inner, Coalescer()), max_tokens=20, progress=Progress(),
                         on_tokens=charged.append, namespace="key-a", report_prefill=False)
    assert isinstance(view, Racer)
    req = StepRequest(TASK.problems[0], (Step("a b c d e f g h i j k l m\n\n", 13),), 8,
                      SamplingParams(max_step_tokens=64, seed=1), (TASK.delimiter,))
    out = asyncio.run(view.race(req))
    (sent,) = inner.seen
    assert sent.params.max_step_tokens == 20 - 13 and sent.cache_namespace == "key-a" and sent.k == 8
    assert (out.index, out.spent_tokens, out.cancelled) == (2, 40, 3)
    assert out.winner.prefilled_tokens is None  # a shared cache's prefill is not reported
    assert out.winner.finish_reason == "eos" and view.cut(out.winner)  # it reached the cap: the particle ends
    assert charged == [40] and view.progress.generated_tokens == 40 and view.progress.policy_calls == 1
    # a particle already at the cap: an empty final step, no race run
    full = dataclasses.replace(req, steps=(Step("x\n\n", 20),))
    out = asyncio.run(view.race(full))
    assert out.winner.text == "" and view.cut(out.winner) and len(inner.seen) == 1 and out.spent_tokens == 0
    assert not hasattr(RequestPolicy(NoRace(), 20, Progress()), "race")


class ManyRecorder(Recorder):
    """A local racer that can run several races in one call (as ``HFGenerator.race_many``)."""

    def __init__(self, outcome: RaceOutcome):
        super().__init__(outcome)
        self.batches = []

    async def race_many(self, requests):
        self.batches.append(list(requests))
        return [dataclasses.replace(self.outcome, index=r.k) for r in requests]  # each its own outcome


def test_concurrent_races_go_to_a_local_backend_in_one_call_when_it_races_many():
    from itscale.bench.backends import Timed

    winner = Step("x", 3, finish_reason="eos")
    for inner in (ManyRecorder(RaceOutcome(winner, 0, 9, 2)), Timed(ManyRecorder(RaceOutcome(winner, 0, 9, 2)))):
        batched = BatchedGenerator(inner, Coalescer())
        recorder = getattr(inner, "inner", inner)

        async def task(k):
            async with batched.coalescer.member():
                return await batched.race(request(TASK.problems[k % 6], k, k))

        async def all_at_once():
            return await asyncio.gather(*(task(k) for k in (1, 2, 3, 4)))

        outs = asyncio.run(all_at_once())
        assert [o.index for o in outs] == [1, 2, 3, 4]  # each task its own request's outcome
        assert [[r.k for r in b] for b in recorder.batches] == [[1, 2, 3, 4]] and not recorder.seen
        assert batched.coalescer.calls == {"policy": 1}
    # a backend without race_many gets each race as it comes; a wrapper offers race_many only over one that has it
    single = Recorder(RaceOutcome(winner, 0, 9, 2))
    batched = BatchedGenerator(single, Coalescer())

    async def two():
        async def one(k):
            async with batched.coalescer.member():
                return await batched.race(request(TASK.problems[0], k, k))
        return await asyncio.gather(one(1), one(2))

    asyncio.run(two())
    assert len(single.seen) == 2 and batched.coalescer.calls == {"policy": 2}
    assert not hasattr(Timed(single), "race_many") and hasattr(Timed(ManyRecorder(RaceOutcome(winner, 0, 9, 2))),
                                                               "race_many")
