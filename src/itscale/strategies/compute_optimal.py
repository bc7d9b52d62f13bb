"""compute_optimal: probe the problem's difficulty, then run the method and budget a learnt
allocation chose for its difficulty bin (Snell et al. 2024; Liu et al. 2025).

One run at budget B:

1. the level: ``params.level`` when set, else the policy's level with the largest budget ≤ B
   (:meth:`~itscale.allocation.AllocationPolicy.level_for`: the most accurate allocation learnt
   for a mean cost per problem of at most B whole samples); a budget below every level is refused;
2. the probe (:func:`itscale.allocation.run_probe`): k whole samples from this run's random
   stream, and their difficulty score (``agreement`` or ``prm``, with the probe's aggregation);
3. the bin of that score (the policy's edges) and the level's choice for it: a registered method
   at its budget, run on the same problem with this run's random stream and backends — or
   ``probe``: the probe's own vote is the answer and nothing more is spent.

The result is the chosen method's (its candidates, answer, status), with ``method =
"compute_optimal"``, the run's budget, and a cost that adds the probe's tokens to the method's.
``extras``: ``difficulty``, ``bin`` (0 = easiest), ``bins``, ``level`` (its budget), ``cap``,
``choice`` (``method``, ``label``, ``params``, ``budget``), ``probe`` (``score``, ``samples``,
``answers``, ``generated_tokens``, ``prm_tokens``) and ``method_extras`` (the chosen method's own).

Whether it needs a reward model depends on the policy (a ``prm`` probe, or a bin that runs a
PRM-guided method): the class says no (``needs_prm``), an instance says :attr:`uses_prm`, and
building one without a PRM for a policy that needs it is an error naming the method that needs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from ..allocation import AllocationPolicy, load_allocation, run_probe
from ..allocation.probe import ProbeOutcome
from ..types import Result
from .base import STRATEGIES, Params, Strategy, candidates, make_strategy, register
from .context import RunContext


class ComputeOptimalParams(Params):
    allocation: AllocationPolicy = Field(description="the learnt policy: the allocation.json an `itscale bench` run "
                                                     "with an `allocation:` section wrote, or the loaded policy")
    level: int | None = Field(None, ge=1, description="the cost level, by its budget (default: the largest level "
                                                      "budget ≤ the run's budget)")

    @field_validator("allocation", mode="before")
    @classmethod
    def _read_the_file(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            return load_allocation(value)
        return value

    @field_validator("level")
    @classmethod
    def _a_learnt_level(cls, level: int | None, info: ValidationInfo) -> int | None:
        policy = info.data.get("allocation")
        if level is not None and policy is not None and level not in policy.budgets:
            raise ValueError(f"no cost level at budget {level}; the policy's levels are at budgets "
                             f"{', '.join(map(str, policy.budgets))}")
        return level


class _Unbound:
    """Stands in for the backends while a policy's choices are validated."""

    capabilities = None


def policy_needs_prm(policy: AllocationPolicy) -> str | None:
    """Why ``policy`` needs a reward model (the probe's score, or a method it runs), or None."""
    if policy.probe.score == "prm":
        return "its probe scores difficulty with the PRM (probe.score 'prm')"
    for name in sorted(policy.methods()):
        if name in STRATEGIES and STRATEGIES[name].needs_prm:
            return f"it runs {name}, which needs one"
    return None


def check_allocation(policy: AllocationPolicy, has_prm: bool) -> None:
    """Every choice of ``policy`` is a runnable method at a budget it takes (and a PRM is there
    when the policy needs one); a ``ValueError`` naming the level and bin otherwise."""
    for i, level in enumerate(policy.levels):
        for b, choice in enumerate(level.choices):
            if choice.is_probe:
                continue
            where = f"levels[{i}].choices[{b}] (budget {level.budget}, bin {b})"
            if choice.method == ComputeOptimal.name or choice.method not in STRATEGIES:
                known = ", ".join(sorted(n for n in STRATEGIES if n != ComputeOptimal.name))
                raise ValueError(f"{where}: {choice.method!r} is not a method a bin can run; choose one of: {known}")
            try:
                make_strategy(choice.method, _Unbound(), _Unbound(), **choice.params).check_budget(choice.budget)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    why = policy_needs_prm(policy)
    if why is not None and not has_prm:
        raise ValueError(f"the allocation policy needs a reward model ({why}) and there is none; give it one, or "
                         "learn a policy with probe: agreement and no PRM-guided method")


@register
class ComputeOptimal(Strategy):
    name = "compute_optimal"
    Params = ComputeOptimalParams
    needs_prm = False  # the policy decides: see uses_prm

    def __init__(self, policy, prm=None, outcome=None, **kwargs: Any):
        super().__init__(policy, prm, outcome, **kwargs)
        try:
            check_allocation(self.params.allocation, prm is not None or outcome is not None)
        except ValueError as err:
            raise ValueError(f"{self.name}.allocation: {err}") from None

    @property
    def uses_prm(self) -> bool:
        """Whether this instance's policy needs a reward model."""
        return policy_needs_prm(self.params.allocation) is not None

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        policy = self.params.allocation
        if self.params.level is None and policy.level_for(int(budget)) is None:
            raise ValueError(f"{self.name}: budget {budget} is below the smallest learnt cost level (budget "
                             f"{policy.budgets[0]}: {policy.budgets[0]} whole samples' worth of tokens per problem, "
                             "the probe included); the levels are at budgets "
                             f"{', '.join(map(str, policy.budgets))}")

    def level_for(self, budget: int):
        """The level a run at ``budget`` uses (``params.level`` when set)."""
        policy = self.params.allocation
        return policy.level(self.params.level) if self.params.level is not None else policy.level_for(budget)

    def context(self, problem, rng) -> RunContext:
        return RunContext(problem, self.policy, self.prm, self.outcome, self.format, self.sampling, rng,
                          self.params.allocation.probe.aggregation)

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        policy = self.params.allocation
        level = self.level_for(budget)
        probe = await run_probe(ctx, policy.probe.samples, policy.probe.score, self.answer_key)
        b = policy.bin_of(probe.difficulty)
        choice = level.choices[b]
        extras: dict[str, Any] = {
            "difficulty": probe.difficulty, "bin": b, "bins": policy.bins, "level": level.budget, "cap": level.cap,
            "choice": {"method": choice.method, "label": choice.label, "params": dict(choice.params),
                       "budget": choice.budget},
            "probe": {"score": policy.probe.score, "samples": policy.probe.samples, "answers": list(probe.answers),
                      "generated_tokens": probe.generated_tokens, "prm_tokens": probe.prm_tokens}}
        if choice.is_probe:
            return self._probe_result(ctx, budget, probe, extras)
        method = make_strategy(choice.method, self.policy, self.prm, outcome=self.outcome, format=self.format,
                               sampling=self.sampling, answer_key=self.answer_key, **choice.params)
        result = await method.run(ctx.problem, choice.budget, ctx.rng)
        ctx.cost = ctx.cost.add(result.cost)  # the probe's tokens plus the method's (run() recomputes FLOPs, time)
        extras["method_extras"] = dict(result.extras)
        return dataclasses.replace(result, method=self.name, budget=budget, extras=extras)

    def _probe_result(self, ctx: RunContext, budget: int, probe: ProbeOutcome, extras: dict) -> Result:
        """The probe's own vote as the answer (:func:`itscale.allocation.vote`); its samples are the candidates."""
        weights = [1.0] * len(probe.particles)
        if probe.chosen is None:  # no sample has an answer: the usual rules say what comes back
            return self.result(ctx, budget, probe.particles, weights, scores=probe.scores, extras=extras)
        cands = candidates(probe.particles, weights, probe.scores)
        chosen = probe.particles[probe.chosen]
        return Result(ctx.problem, self.name, budget, probe.answer, chosen.text, tuple(cands), ctx.cost,
                      extras=extras)
