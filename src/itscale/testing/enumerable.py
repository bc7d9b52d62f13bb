"""A small enumerable sequence model whose evidence and posterior are exact.

Paths are tuples of tokens 0..K−1 of length at most T; with ``eos`` set, emitting
that token finishes the path early. The model p is a time-inhomogeneous Markov
chain, and the potentials are Markov too:

    p(x)   = p_1(x_1) · Π_{t≥2} P_t(x_t | x_{t−1})
    G_t(x) = G_t(x_{t−1}, x_t) ≥ 0            (x_0 is a start symbol)
    r(x)   > 0                                 (a reward on complete paths)

Two targets can be run and checked exactly:

- the Feynman–Kac target γ(x) = p(x)·Π_t G_t(x), reached by ``EveryStep`` with
  the score s_t = G_t/(1+G_t) under the odds link (increment log G_t);
- the reward-tilted target γ(x) = p(x)·r(x)^β, reached by ``Twisted`` or
  ``Outcome``; :meth:`optimal_twist` gives ψ*_t(x_{1:t}) = E_p[r^β | x_{1:t}] and
  :meth:`propose_optimal` the proposal q ∝ p·ψ*_t, under which every log-weight
  equals log Z exactly (the zero-variance SMC).

States are the path tuples themselves; ``()`` is the initial state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..core.genealogy import Trajectory
from ..core.records import Proposed


@dataclass
class EnumerableModel:
    n_tokens: int
    max_steps: int
    initial: np.ndarray  # (K,)
    transition: np.ndarray  # (T, K, K): transition[t][prev, cur] used for step t+1 ≥ 2
    potential: np.ndarray  # (T, K+1, K): potential[t][prev, cur], prev = K is the start symbol
    eos: int | None = None
    reward_table: dict = field(default_factory=dict)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        n_tokens: int = 3,
        max_steps: int = 3,
        eos: int | None = None,
        zero_potentials: int = 0,
        potential_spread: float = 1.0,
    ) -> "EnumerableModel":
        """A random model; ``zero_potentials`` entries of G are set to 0 (dead particles)."""
        k, t = n_tokens, max_steps
        initial = rng.dirichlet(np.ones(k))
        transition = rng.dirichlet(np.ones(k), size=(t, k))
        potential = np.exp(potential_spread * rng.standard_normal((t, k + 1, k)))
        flat = potential.reshape(-1)
        if zero_potentials:
            flat[rng.choice(flat.size, size=zero_potentials, replace=False)] = 0.0
        model = cls(k, t, initial, transition, potential, eos)
        model.reward_table = {x: float(np.exp(rng.standard_normal())) for x in model.paths()}
        return model

    # -- enumeration ------------------------------------------------------------------
    def is_finished(self, path: tuple) -> bool:
        return len(path) >= self.max_steps or (self.eos is not None and len(path) > 0 and path[-1] == self.eos)

    def paths(self) -> list[tuple]:
        """Every complete path, in a fixed order."""
        out, frontier = [], [()]
        while frontier:
            nxt = []
            for p in frontier:
                for tok in range(self.n_tokens):
                    q = p + (tok,)
                    (out if self.is_finished(q) else nxt).append(q)
            frontier = nxt
        return out

    def step_prob(self, prefix: tuple, token: int) -> float:
        """p(x_t = token | prefix)."""
        if not prefix:
            return float(self.initial[token])
        return float(self.transition[len(prefix)][prefix[-1], token])

    def log_prior(self, path: tuple) -> float:
        return float(sum(math.log(self.step_prob(path[:i], path[i])) for i in range(len(path))))

    def step_potential(self, path: tuple) -> float:
        """G_t(x_{t−1}, x_t) of the last step of a non-empty path."""
        prev = path[-2] if len(path) >= 2 else self.n_tokens
        return float(self.potential[len(path) - 1][prev, path[-1]])

    def fk_weight(self, path: tuple) -> float:
        """γ(x) = p(x)·Π_t G_t(x) for the Feynman–Kac target."""
        g = math.prod(self.step_potential(path[: i + 1]) for i in range(len(path)))
        return math.exp(self.log_prior(path)) * g

    def reward(self, path: tuple) -> float:
        return self.reward_table[path]

    def tilted_weight(self, path: tuple, beta: float = 1.0) -> float:
        """γ(x) = p(x)·r(x)^β for the reward-tilted target."""
        return math.exp(self.log_prior(path)) * self.reward(path) ** beta

    def evidence(self, target: str = "fk", beta: float = 1.0) -> float:
        return sum(self._weight(x, target, beta) for x in self.paths())

    def posterior(self, target: str = "fk", beta: float = 1.0) -> dict[tuple, float]:
        weights = {x: self._weight(x, target, beta) for x in self.paths()}
        z = sum(weights.values())
        return {x: w / z for x, w in weights.items()}

    def _weight(self, path, target, beta):
        if target == "fk":
            return self.fk_weight(path)
        if target == "tilted":
            return self.tilted_weight(path, beta)
        raise ValueError(f"target must be 'fk' or 'tilted', got {target!r}")

    def sample_posterior(self, rng: np.random.Generator, size: int, target: str = "fk", beta: float = 1.0) -> list[tuple]:
        """``size`` exact i.i.d. draws from the posterior."""
        post = self.posterior(target, beta)
        keys = list(post)
        return [keys[i] for i in rng.choice(len(keys), size=size, p=np.array([post[k] for k in keys]))]

    def trajectory(self, path: tuple) -> Trajectory:
        """A path as a reference trajectory for conditional SMC (proposal = model)."""
        states = tuple(path[:i] for i in range(len(path) + 1))
        return Trajectory(states, tuple(self.is_finished(s) if s else False for s in states), np.zeros(len(states)))

    # -- scorers (as itscale observation models expect them) ---------------------------
    def prm_odds(self, states: Sequence[tuple]) -> np.ndarray:
        """s = G/(1+G), so that the odds link gives increment log G."""
        g = np.array([self.step_potential(x) for x in states])
        return g / (1.0 + g)

    def rewards(self, states: Sequence[tuple]) -> np.ndarray:
        return np.array([self.reward(x) for x in states])

    def optimal_twist(self, beta: float = 1.0):
        """ψ*(x_{1:t}) = E_p[r^β | x_{1:t}] as a scorer (exact, by enumeration)."""
        table: dict[tuple, float] = {}
        for x in self.paths():
            px = math.exp(self.log_prior(x))
            rx = self.reward(x) ** beta
            for i in range(len(x) + 1):
                table[x[:i]] = table.get(x[:i], 0.0) + px * rx
        # normalise by p(prefix): E[r^β | prefix] = Σ_{x ⊒ prefix} p(x) r^β / p(prefix)
        twist = {pre: v / math.exp(self.log_prior(pre)) for pre, v in table.items()}
        return lambda states: np.array([twist[x] for x in states])

    # -- proposals --------------------------------------------------------------------
    def _next_probs(self, prefix: tuple) -> np.ndarray:
        return self.initial if not prefix else self.transition[len(prefix)][prefix[-1]]

    def propose(self, states: Sequence[tuple], rng: np.random.Generator) -> Proposed:
        """Sample the next token from the model p itself (log_correction = 0)."""
        u = rng.random(len(states))
        new = []
        for x, ui in zip(states, u):
            cdf = np.cumsum(self._next_probs(x))
            new.append(x + (int(min(np.searchsorted(cdf, ui * cdf[-1], side="right"), self.n_tokens - 1)),))
        return Proposed(new, [self.is_finished(x) for x in new])

    def propose_optimal(self, beta: float = 1.0):
        """The locally optimal proposal q(x_t | x_{<t}) ∝ p(x_t | x_{<t})·ψ*(x_{1:t})."""
        twist = self.optimal_twist(beta)

        def propose(states: Sequence[tuple], rng: np.random.Generator) -> Proposed:
            new, corr = [], []
            for x in states:
                p = self._next_probs(x)
                children = [x + (tok,) for tok in range(self.n_tokens)]
                q = p * twist(children)
                q = q / q.sum()
                tok = int(rng.choice(self.n_tokens, p=q))
                new.append(children[tok])
                corr.append(math.log(p[tok]) - math.log(q[tok]))
            return Proposed(new, [self.is_finished(x) for x in new], np.array(corr))

        return propose

    # -- particle Gibbs with ancestor sampling -----------------------------------------
    def ancestor_sampling(self) -> "MarkovAncestorSampling":
        return MarkovAncestorSampling(self)


@dataclass(frozen=True)
class MarkovAncestorSampling:
    """PGAS hook for the Feynman–Kac target of a Markov :class:`EnumerableModel`.

    Grafting the reference's future x*_{t+1:T} onto prefix x^i_{1:t} changes γ only
    through the first link: log P(x*_{t+1} | x^i_t) + log G_{t+1}(x^i_t, x*_{t+1}).
    """

    model: EnumerableModel

    def log_weights(self, states, reference: Trajectory, step: int) -> np.ndarray:
        nxt = reference.states[step + 1][-1]
        out = np.empty(len(states))
        for i, x in enumerate(states):
            if self.model.is_finished(x):
                out[i] = -np.inf
                continue
            g = self.model.step_potential(x + (nxt,))
            p = self.model.step_prob(x, nxt)
            out[i] = math.log(p) + math.log(g) if p > 0 and g > 0 else -np.inf
        return out

    def splice(self, previous_state, reference: Trajectory, step: int):
        return previous_state + (reference.states[step][-1],)


def path_index(model: EnumerableModel) -> dict[tuple, int]:
    """Position of every complete path in :meth:`EnumerableModel.paths` (for histograms)."""
    return {x: i for i, x in enumerate(model.paths())}


__all__ = ["EnumerableModel", "MarkovAncestorSampling", "path_index"]
