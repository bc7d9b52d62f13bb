r"""A simulated reasoning task: an enumerable policy, PRMs and a verifier with known truth.

Nothing here runs a model. Each problem is a small tree of steps whose probabilities
and correctness are known exactly, so a strategy can be tested against exact answers
(``value``, ``accuracy``) with the real backend protocols (``Generator``,
``ProcessRewardModel``, ``OutcomeScorer``), thousands of calls per second.

The tree of problem i
---------------------
Problem i has D_i reasoning steps (D_i uniform on ``depth``, inclusive) followed by
one answer step. A node is the path of child indices taken so far; every node at
depth d < D has ``branching`` children, the node at depth D has one child, the
answer step ``"The answer is \boxed{a}."`` (no trailing delimiter; the policy ends
it with ``finish_reason="eos"``). Step texts look like
``"Step 2: option 3, factor the sum\n\n"``: the words are random filler that says
nothing about correctness, and the text identifies the child exactly, so texts sent
back by a strategy are parsed back into the path (any text that is not a path of the
tree is a ``ValueError``).

Correctness. A node is *ok* when every step on its path is correct. At an ok node a
random subset C of m ∈ {1, …, b−1} children is correct and carries mass q,

    q = σ(logit(p_correct) + 0.25·ξ),  ξ ~ N(0, 1) per node       (q = p_correct if it is 0 or 1)
    (p_j)_{j∈C} = q·Dirichlet(2),   (p_j)_{j∉C} = (1 − q)·Dirichlet(2);

at a node that is not ok all children are wrong, p = Dirichlet(2). The final answer is
the reference answer iff all D steps are correct; otherwise it is one of
``n_wrong_answers`` wrong answers, picked from the path's hash with per-problem
weights w ~ Dirichlet(0.5): one wrong answer often dominates, so majority voting can
be fooled while a good PRM is not.

Sampling at temperature T and nucleus top_p:

    q_T(j) ∝ p_j^{1/T}   (T > 0);     q_0 = one-hot at argmax_j p_j (ties → lowest j);
    top_p < 1 keeps the most probable children until their q_T-mass reaches top_p.

The exact probability of a correct final answer when continuing from node x by
sampling at temperature T (top_p = 1) is, by enumerating the tree,

    V_T(x) = 1[x ok]                         at depth D,
    V_T(x) = Σ_j q_T(j | x) · V_T(x j)       at depth < D   (= 0 when x is not ok).

Tokens are whitespace-separated words: ``Step.tokens`` counts the generated text,
``prompt_tokens`` the prompt plus the prefix, ``StepScores.tokens`` the prompt plus
every step scored.

Confidence (``params.top_logprobs = k > 0``). Every word of a sampled step with raw
probability p (temperature 1: ``node.probs[j]``, whatever the sampling settings) gets, as its
top-k log-probabilities, those of the geometric distribution P(j) = r·(1 − r)^{j−1},
j = 1, 2, … (descending, summing to 1) with r = clip(p, 0.1, 0.99):

    top_logprobs = (log r + (j − 1)·log(1 − r))_{j=1..k},
    C = −(1/k) Σ_j = −log r − ((k − 1)/2)·log(1 − r).

C grows with r wherever r > 2/(k + 1): over the whole clipped range for k ≥ 19 (DeepConf's
k is 20: C runs from 3.3 at p ≤ 0.1 to 43.7 at p ≥ 0.99), so a low-probability step has
low-confidence words (with small k, C is the top word's surprisal and the order turns
around below r = 2/(k + 1)). ``params.stop_below`` applies
DeepConf's rule to these C word by word over the request's words
(:class:`itscale.lm.confidence.WindowCheck`): where it fires, the continuation ends after that
word (``finish_reason="low_confidence"``; the text cut after the word, the whitespace after
it dropped; ``logprob`` the kept words' share, log q / L per word of a step of L words),
unless that word ended the continuation anyway (its last word: the step's stop string, or the
answer's end).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist
from typing import Sequence

import numpy as np

from ..lm.confidence import WindowCheck, token_confidence
from ..protocols import check_raceable
from ..tasks.answers import answer_key, extract_answer
from ..types import (
    Capabilities,
    Problem,
    RaceOutcome,
    ScoreRequest,
    Step,
    StepRequest,
    StepScores,
)

__all__ = ["SimulatedTask", "SimulatedPolicy", "SimulatedPRM", "SimulatedVerifier", "count_tokens",
           "simulated_top_logprobs"]

_WORDS = (
    "so", "we", "now", "use", "the", "sum", "of", "both", "terms", "then", "check", "cases",
    "apply", "rule", "simplify", "this", "expand", "factor", "compare", "each", "side", "next",
    "note", "that", "substitute", "value", "again", "bound", "product", "divide",
)  # fmt: skip
_DEFAULT_SEED = 0x5EED  # seed of requests with params.seed None, with a per-policy counter
_STD_NORMAL = NormalDist()
_R_RANGE = (0.1, 0.99)  # the clip of a simulated token's top probability r (see "Confidence")
_WORD = re.compile(r"\S+")


def simulated_top_logprobs(p: float, k: int) -> tuple[float, ...]:
    """The top-k log-probabilities of each word of a step with raw probability ``p`` (see
    "Confidence" in the module docstring)."""
    r = min(max(p, _R_RANGE[0]), _R_RANGE[1])
    return tuple(math.log(r) + j * math.log(1.0 - r) for j in range(k))


def count_tokens(text: str) -> int:
    """The simulated token count: the number of whitespace-separated words."""
    return len(text.split())


def _digest(*parts: object) -> int:
    """A 64-bit integer hash of ``parts`` (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@lru_cache(maxsize=1 << 16)
def _sampling_probs(probs: tuple[float, ...], temperature: float, top_p: float = 1.0) -> tuple[float, ...]:
    """q_T, restricted to the top_p nucleus and renormalised (see the module docstring)."""
    if temperature == 0:
        best = max(range(len(probs)), key=lambda j: (probs[j], -j))
        return tuple(float(j == best) for j in range(len(probs)))
    logs = [math.log(p) / temperature if p > 0 else -math.inf for p in probs]
    top = max(logs)
    w = [math.exp(x - top) for x in logs]
    total = sum(w)
    q = [x / total for x in w]
    if top_p < 1.0:
        keep, mass = set(), 0.0
        for j in sorted(range(len(q)), key=lambda j: (-q[j], j)):
            keep.add(j)
            mass += q[j]
            if mass >= top_p:
                break
        total = sum(q[j] for j in keep)
        q = [q[j] / total if j in keep else 0.0 for j in range(len(q))]
    return tuple(q)


def _draw(q: Sequence[float], rng: np.random.Generator) -> int:
    u, cum = rng.random(), 0.0
    for j, x in enumerate(q):
        cum += x
        if u < cum:
            return j
    return max(j for j, x in enumerate(q) if x > 0)  # u within rounding of 1


@dataclass(frozen=True)
class _Node:
    ok: bool  # every step on the path to this node is correct
    final: bool  # the only child is the answer step
    texts: tuple[str, ...]  # the children's step texts
    probs: tuple[float, ...]  # their probabilities at temperature 1
    correct: tuple[bool, ...]  # whether each child step is correct
    lookup: dict  # child text without its trailing delimiter -> child index


@dataclass(frozen=True)
class _Spec:
    depth: int
    answer: int
    wrong_answers: tuple[int, ...]
    wrong_weights: tuple[float, ...]


class SimulatedTask:
    """``n_problems`` problems, each an enumerable tree of steps (see the module docstring).

    Trees are built lazily and cached; node x of problem i depends only on
    (seed, i, x), so they do not depend on the order in which they are explored.
    """

    def __init__(
        self,
        n_problems: int = 20,
        seed: int = 0,
        depth: tuple[int, int] = (2, 4),
        branching: int = 3,
        p_correct: float = 0.7,
        n_wrong_answers: int = 3,
        delimiter: str = "\n\n",
    ) -> None:
        lo, hi = depth
        if n_problems < 1:
            raise ValueError(f"n_problems must be >= 1, got {n_problems!r}")
        if not 1 <= lo <= hi:
            raise ValueError(f"depth must be a range (lo, hi) with 1 <= lo <= hi, got {depth!r}")
        if branching < 2:
            raise ValueError(f"branching must be >= 2 (a correct and a wrong child), got {branching!r}")
        if not 0.0 <= p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {p_correct!r}")
        if n_wrong_answers < 1:
            raise ValueError(f"n_wrong_answers must be >= 1, got {n_wrong_answers!r}")
        if not delimiter or any(c.isalnum() or c in " ,.:{}\\" for c in delimiter):
            raise ValueError(f"delimiter must be non-empty and never occur inside a step (e.g. '\\n\\n'), got {delimiter!r}")
        self.seed, self.depth, self.branching = seed, (lo, hi), branching
        self.p_correct, self.n_wrong_answers, self.delimiter = p_correct, n_wrong_answers, delimiter
        self._specs: list[_Spec] = []
        self.problems: list[Problem] = []
        for i in range(n_problems):
            rng = np.random.default_rng(_digest("problem", seed, i))
            d = int(rng.integers(lo, hi + 1))
            answer = int(rng.integers(10, 1000))
            pool = [int(a) for a in rng.choice(np.arange(10, 1000), n_wrong_answers + 1, replace=False) if a != answer]
            weights = rng.dirichlet(np.full(n_wrong_answers, 0.5))
            self._specs.append(_Spec(d, answer, tuple(pool[:n_wrong_answers]), tuple(float(w) for w in weights)))
            prompt = f"Simulated problem {i} (task seed {seed}): find the hidden integer, one step at a time."
            meta = {"depth": d, "branching": branching, "index": i, "task_seed": seed}
            self.problems.append(Problem(id=f"sim-{i}", prompt=prompt, answer=str(answer), meta=meta))
        self._by_id = {p.id: i for i, p in enumerate(self.problems)}
        self._nodes: dict[tuple[int, tuple[int, ...]], _Node] = {}
        self._values: dict[tuple[int, tuple[int, ...], float], float] = {}

    # -- backends -------------------------------------------------------------------
    def policy(self, fail_rate: float = 0.0, distinct: bool = False) -> "SimulatedPolicy":
        return SimulatedPolicy(self, fail_rate=fail_rate, distinct=distinct)

    def prm(self, noise: float = 0.0, signal: str = "label", seed: int = 0, sharpness: float = 4.0) -> "SimulatedPRM":
        return SimulatedPRM(self, noise=noise, signal=signal, seed=seed, sharpness=sharpness)

    def verifier(self) -> "SimulatedVerifier":
        return SimulatedVerifier(self)

    # -- exact quantities -----------------------------------------------------------
    def children(self, problem: Problem, step_texts: Sequence[str]) -> list[tuple[str, float, bool]]:
        """(text, probability at temperature 1, step is correct) for each child of the node reached;
        ``[]`` once the solution is finished (so a recursion over children enumerates the tree)."""
        i = self._index(problem)
        path, finished = self._walk(i, "".join(step_texts))
        if finished:
            return []
        node = self._node(i, path)
        return list(zip(node.texts, node.probs, node.correct))

    def step_labels(self, problem: Problem, step_texts: Sequence[str]) -> list[bool]:
        """For each prefix step_texts[:n], n = 1..len: True iff every step so far is correct."""
        i = self._index(problem)
        return [self._node(i, path).ok for path, _ in self._prefixes(i, step_texts)]

    def is_correct(self, problem: Problem, text: str) -> bool:
        """Whether the solution text's final answer equals ``problem.answer``."""
        answer = extract_answer(text)
        return answer is not None and answer_key(answer) == answer_key(problem.answer)

    def value(self, problem: Problem, step_texts: Sequence[str] = (), temperature: float = 1.0) -> float:
        """V_T(prefix): the exact probability that sampling on at ``temperature`` ends correct."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        i = self._index(problem)
        path, _ = self._walk(i, "".join(step_texts))
        return self._value(i, path, float(temperature))

    def accuracy(self, problem: Problem, temperature: float = 1.0) -> float:
        """The probability that one full sample at ``temperature`` is correct: V_T(())."""
        return self.value(problem, (), temperature)

    # -- internals ------------------------------------------------------------------
    def _index(self, problem: Problem) -> int:
        i = self._by_id.get(problem.id)
        if i is None or self.problems[i].prompt != problem.prompt:
            raise ValueError(f"problem {problem.id!r} is not a problem of this SimulatedTask (seed {self.seed})")
        return i

    def _node(self, i: int, path: tuple[int, ...]) -> _Node:
        node = self._nodes.get((i, path))
        if node is None:
            node = self._nodes[(i, path)] = self._build(i, path)
        return node

    def _build(self, i: int, path: tuple[int, ...]) -> _Node:
        spec, d = self._specs[i], len(path)
        parent = self._node(i, path[:-1]) if d else None
        ok = parent is None or (parent.ok and parent.correct[path[-1]])
        rng = np.random.default_rng(_digest("node", self.seed, i, path))
        if d == spec.depth:
            wrong = spec.wrong_answers[_draw(spec.wrong_weights, rng)]  # from the path's hash
            answer = spec.answer if ok else wrong
            text = f"The answer is \\boxed{{{answer}}}."
            return _Node(ok, True, (text,), (1.0,), (ok,), {text: 0})
        b = self.branching
        if ok:
            m = int(rng.integers(1, b))
            good = set(int(j) for j in rng.choice(b, m, replace=False))
            p = self.p_correct
            q = p if p in (0.0, 1.0) else _sigmoid(math.log(p / (1 - p)) + 0.25 * rng.standard_normal())
            split_good, split_bad = rng.dirichlet(np.full(m, 2.0)), rng.dirichlet(np.full(b - m, 2.0))
            goods, bads = iter(q * split_good), iter((1 - q) * split_bad)
            probs = [float(next(goods)) if j in good else float(next(bads)) for j in range(b)]
        else:
            good = set()
            probs = [float(x) for x in rng.dirichlet(np.full(b, 2.0))]
        texts = []
        for j in range(b):
            words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 7))))
            texts.append(f"Step {d + 1}: option {j + 1}, {words}{self.delimiter}")
        lookup = {t[: -len(self.delimiter)]: j for j, t in enumerate(texts)}
        return _Node(ok, False, tuple(texts), tuple(probs), tuple(j in good for j in range(b)), lookup)

    def _walk(self, i: int, text: str) -> tuple[tuple[int, ...], bool]:
        """Parse a solution prefix into (path, finished); ValueError if it is not in the tree."""
        delim = self.delimiter
        parts = text.split(delim)
        pieces = [p for p in parts[:-1] if p.strip()] + ([parts[-1]] if parts[-1].strip() else [])
        path: list[int] = []
        finished = False
        for n, piece in enumerate(pieces):
            if finished:
                raise ValueError(f"problem sim-{i}: text continues after the final answer: {piece!r}")
            node = self._node(i, tuple(path))
            j = node.lookup.get(piece)
            if j is None and node.final and piece.startswith(node.texts[0]):
                raise ValueError(f"problem sim-{i}: text continues after the final answer: {piece!r}")
            if j is None:
                raise ValueError(
                    f"problem sim-{i}: step {n + 1} {piece!r} does not parse as a step of the simulated tree "
                    f"(expected one of {[t.rstrip(delim) for t in node.texts]})"
                )
            if node.final:
                finished = True
            else:
                path.append(j)
        return tuple(path), finished

    def _prefixes(self, i: int, step_texts: Sequence[str]) -> list[tuple[tuple[int, ...], bool]]:
        """(path, finished) of every prefix "".join(step_texts[:n]), n = 1..len(step_texts)."""
        return [self._walk(i, "".join(step_texts[:n])) for n in range(1, len(step_texts) + 1)]

    def _value(self, i: int, path: tuple[int, ...], temperature: float) -> float:
        key = (i, path, temperature)
        if key not in self._values:
            node = self._node(i, path)
            if not node.ok or node.final:
                v = float(node.ok)
            else:
                q = _sampling_probs(node.probs, temperature)
                v = sum(q[j] * self._value(i, path + (j,), temperature) for j in range(len(q)) if node.correct[j] and q[j] > 0)
            self._values[key] = v
        return self._values[key]


class SimulatedPolicy:
    """A ``Generator`` that samples the task's trees.

    Each request gets its own ``np.random.default_rng(params.seed)``; a request with
    ``seed=None`` uses ``default_rng([0x5EED, c])`` where c counts this policy's
    seedless requests, so it is deterministic given the sequence of calls.

    ``stop`` containing the task delimiter asks for one step; ``stop=()`` for the whole
    rest of the solution as one Step. ``logprob`` is log q of the sampled text under the
    sampling distribution (temperature, top_p); ``max_step_tokens`` is ignored (steps
    are short). With ``distinct=True`` the first step of the k continuations of a
    request runs through the children in random order, without replacement within
    each cycle of ``branching``, so k == branching enumerates every child once (its
    logprob is still log q_T, −inf for a child outside the sampling support). With
    ``fail_rate`` each continuation independently fails (``finish_reason="error"``).
    ``top_logprobs`` and ``stop_below``: "Confidence" in the module docstring.
    """

    capabilities = Capabilities(logprobs=True, top_logprobs=True, n_per_request=True, prefix_cache=False,
                                n_parameters=1_000_000)

    def __init__(self, task: SimulatedTask, fail_rate: float = 0.0, distinct: bool = False) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {fail_rate!r}")
        self.task, self.fail_rate, self.distinct = task, fail_rate, distinct
        self.calls = 0
        self.requests_log: list[int] = []
        self.continuations = 0
        self._unseeded = 0

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        out = [self._serve(r) for r in requests]
        self.calls += 1
        self.requests_log.append(len(requests))
        self.continuations += sum(len(o) for o in out)
        return out

    async def race(self, request: StepRequest) -> RaceOutcome:
        """The first of ``request.k`` samples to finish (:class:`itscale.protocols.Racer`), as a
        local model decoding the samples in lock-step would report it.

        The ``k`` samples are drawn exactly as :meth:`generate_steps` draws them (same seed,
        same steps, failures included), with ``L_j`` their token counts. The winner is the
        sample that did not fail with the fewest tokens (lowest index on ties), carrying the
        request's ``prompt_tokens``; ``spent_tokens = n_ok · L_min`` where ``n_ok`` counts the
        samples that did not fail (each generated ``L_min`` tokens before the race stopped;
        a failed sample generated nothing), so ``k · L_min`` without failures; ``cancelled``
        counts the samples with ``L_j > L_min``. If all ``k`` fail, the winner is the first
        failed step (index 0, nothing spent). Counted as one call of ``k`` continuations.
        """
        if request.k < 1:
            raise ValueError(f"race needs k >= 1 samples to race, got k={request.k}")
        check_raceable(request)
        (steps,) = await self.generate_steps([request])
        ok = [j for j, step in enumerate(steps) if not step.failed]
        if not ok:
            return RaceOutcome(steps[0], 0, 0, 0)
        index = min(ok, key=lambda j: (steps[j].tokens, j))
        shortest = steps[index].tokens
        winner = replace(steps[index], prompt_tokens=steps[0].prompt_tokens)
        return RaceOutcome(winner, index, len(ok) * shortest, sum(steps[j].tokens > shortest for j in ok))

    def _serve(self, request: StepRequest) -> list[Step]:
        task = self.task
        i = task._index(request.problem)
        if request.k < 0:
            raise ValueError(f"StepRequest.k must be >= 0, got {request.k!r}")
        whole = not request.stop
        if not whole and task.delimiter not in request.stop:
            raise ValueError(
                f"SimulatedPolicy serves stop=() (whole solution) or stop containing the task delimiter "
                f"{task.delimiter!r}; got stop={request.stop!r}"
            )
        path, finished = task._walk(i, request.prefix)
        if finished:
            raise ValueError(f"problem {request.problem.id!r}: the prefix is already a finished solution; nothing to generate")
        seed = request.params.seed
        if seed is None:
            seed, self._unseeded = [_DEFAULT_SEED, self._unseeded], self._unseeded + 1
        rng = np.random.default_rng(seed)
        temperature, top_p = request.params.temperature, request.params.top_p
        order: list[int] = []
        if self.distinct:
            n_children = len(task._node(i, path).texts)
            while len(order) < request.k:
                order.extend(int(j) for j in rng.permutation(n_children))
        prompt_tokens = count_tokens(request.problem.prompt) + count_tokens(request.prefix)
        steps = []
        for c in range(request.k):
            first_pt = prompt_tokens if c == 0 else 0
            if rng.random() < self.fail_rate:
                steps.append(Step("", 0, first_pt, finish_reason="error", error="simulated failure"))
                continue
            pieces, eos = self._continue(i, path, rng, temperature, top_p, whole, order[c] if order else None)
            steps.append(replace(self._step(pieces, eos, request.params), prompt_tokens=first_pt))
        return steps

    def _continue(self, i, path, rng, temperature, top_p, whole, first) -> tuple[list[tuple[str, float, float]],
                                                                                 bool]:
        """Sample one step (or every step to the end): ([(text, raw p, log q)] per step, reached the answer)."""
        pieces, path = [], list(path)
        while True:
            node = self.task._node(i, tuple(path))
            q = _sampling_probs(node.probs, temperature, top_p)
            j = _draw(q, rng) if first is None else first
            first = None
            pieces.append((node.texts[j], node.probs[j], math.log(q[j]) if q[j] > 0 else -math.inf))
            if node.final:
                return pieces, True
            path.append(j)
            if not whole:
                return pieces, False

    @staticmethod
    def _step(pieces: list[tuple[str, float, float]], eos: bool, params) -> Step:
        """The continuation's step: its words' top-k log-probabilities, cut where ``stop_below``
        fires (see "Confidence" in the module docstring)."""
        text = "".join(t for t, _, _ in pieces)
        logprob = sum(lq for _, _, lq in pieces)
        k = params.top_logprobs
        if k == 0:
            return Step(text, count_tokens(text), logprob=logprob, finish_reason="eos" if eos else "stop")
        words = [(simulated_top_logprobs(p, k), lq / count_tokens(t))
                 for t, p, lq in pieces for _ in range(count_tokens(t))]
        tops = tuple(top for top, _ in words)
        rule = params.stop_below
        check = None if rule is None else WindowCheck(rule.window, rule.threshold)
        for n in range(1, len(words) + 1):
            if check is not None and check.push(token_confidence(tops[n - 1])) and n < len(words):
                end = [m.end() for m in _WORD.finditer(text)][n - 1]
                return Step(text[:end], n, logprob=sum(lw for _, lw in words[:n]), finish_reason="low_confidence",
                            top_logprobs=tops[:n])
        return Step(text, len(words), logprob=logprob, finish_reason="eos" if eos else "stop", top_logprobs=tops)


class SimulatedPRM:
    """A ``ProcessRewardModel`` with a known signal and controllable noise.

    For each prefix x of a request's steps (a step text holding several steps, as the
    ``model`` aggregation sends, is split on the delimiter):

        ℓ(x) = sharpness·(2·label(x) − 1)              signal="label"
        ℓ(x) = logit(clip(V_1(x), 1e-3, 1 − 1e-3))      signal="value"
        score(x) = clip(σ(ℓ(x) + noise·ε(x)), 1e-6, 1 − 1e-6)

    where ε(x) = Φ⁻¹(u), u a blake2b hash of (prm seed, task seed, problem id, x):
    standard normal over prefixes, yet the same prefix always gets the same score,
    whatever the call or batch. ``noise=0, signal="label"`` is the perfect PRM.
    """

    capabilities = Capabilities(n_parameters=1_000_000)

    def __init__(self, task: SimulatedTask, noise: float = 0.0, signal: str = "label", seed: int = 0, sharpness: float = 4.0) -> None:
        if signal not in ("label", "value"):
            raise ValueError(f"signal must be 'label' or 'value', got {signal!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.task, self.noise, self.signal, self.seed, self.sharpness = task, noise, signal, seed, sharpness
        self.calls = 0
        self.requests_log: list[int] = []

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        out = [self._score_request(r) for r in requests]
        self.calls += 1
        self.requests_log.append(len(requests))
        return out

    def score(self, problem: Problem, step_texts: Sequence[str]) -> float:
        """The score of the whole prefix (no counters touched)."""
        i = self.task._index(problem)
        return self._score_state(i, *self.task._walk(i, "".join(step_texts)))

    def _score_request(self, request: ScoreRequest) -> StepScores:
        i = self.task._index(request.problem)
        scores = tuple(self._score_state(i, path, done) for path, done in self.task._prefixes(i, request.steps))
        tokens = count_tokens(request.problem.prompt) + count_tokens("".join(request.steps))
        return StepScores(scores, tokens)

    def _score_state(self, i: int, path: tuple[int, ...], finished: bool) -> float:
        if self.signal == "label":
            logit = self.sharpness * (2.0 * self.task._node(i, path).ok - 1.0)
        else:
            v = min(max(self.task._value(i, path, 1.0), 1e-3), 1 - 1e-3)
            logit = math.log(v / (1 - v))
        if self.noise > 0:
            u = (_digest("prm", self.seed, self.task.seed, self.task.problems[i].id, path, finished) + 0.5) / 2.0**64
            logit += self.noise * _STD_NORMAL.inv_cdf(u)
        return min(max(_sigmoid(logit), 1e-6), 1 - 1e-6)


class SimulatedVerifier:
    """An ``OutcomeScorer`` that is exactly right: 1.0 for a correct final answer, else 0.0."""

    capabilities = Capabilities()

    def __init__(self, task: SimulatedTask) -> None:
        self.task = task
        self.calls = 0
        self.requests_log: list[int] = []

    async def score_final(self, requests: Sequence[ScoreRequest]) -> list[float]:
        out = [float(self.task.is_correct(r.problem, "".join(r.steps))) for r in requests]
        self.calls += 1
        self.requests_log.append(len(requests))
        return out
