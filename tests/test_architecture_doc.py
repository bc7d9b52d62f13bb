"""docs/architecture.md's "A new method" example is real code: it registers, runs on the
simulated task, and does what it says (keeps the best of its sampled steps)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from itscale.strategies import STRATEGIES, make_strategy
from itscale.testing import SimulatedTask
from itscale.types import SamplingParams, StepFormat

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def example_code() -> str:
    text = DOC.read_text()
    section = text[text.index("**A new method.**"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_new_method_example_registers_and_climbs():
    namespace: dict = {}
    exec(compile(example_code(), str(DOC), "exec"), namespace)
    try:
        task = SimulatedTask(n_problems=12, seed=3, depth=(2, 4), branching=3, p_correct=0.6)
        fmt, sampling = StepFormat(delimiter="\n\n", max_steps=12), SamplingParams(temperature=1.0)
        climb = make_strategy("hill_climb", task.policy(), task.prm(noise=0.0), format=fmt, sampling=sampling, width=3)
        results = [climb.solve(p, 2, i) for i, p in enumerate(task.problems)]
        accuracy = np.mean([task.is_correct(r.problem, r.solution) for r in results])
        policy = np.mean([task.accuracy(p) for p in task.problems])
        assert accuracy > policy + 0.2, (accuracy, policy)  # a perfect PRM's best-of-3 per step
        assert all(r.cost.policy_calls == max(c.particle.n_steps for c in r.candidates) for r in results)
    finally:
        STRATEGIES.pop("hill_climb", None)
