"""First-finish search on the embedded policy: races coalesced across problems, or one at a time.

    .venv/bin/python benchmarks/race_batching.py [--problems 100] [--budgets 4 16] [--threads 2]

``first_finish`` races N whole solutions per problem. With every problem of a bench phase in
flight at once (``run_many``), the shared ``BatchedGenerator`` sends the waiting races to
``HFGenerator.race_many`` in one lock-step batch (each race ends at its own first finish);
without ``race_many`` (the wrapper below hides it, as before it existed) each race is one call
of the model. Both runs use the same seeds: the answers must be equal, and the table prints
wall time, model calls and tokens spent side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from itscale import zoo
from itscale.lm import HFGenerator
from itscale.strategies import make_strategy, run_many
from itscale.tasks import arithmetic
from itscale.types import SamplingParams


class OneRaceAtATime:
    """The generator without ``race_many``: each race is its own call of the model."""

    def __init__(self, inner: HFGenerator):
        self.inner = inner
        self.capabilities = inner.capabilities

    async def generate_steps(self, requests):
        return await self.inner.generate_steps(requests)

    async def race(self, request):
        return await self.inner.race(request)


def run(policy, problems, budget: int) -> tuple[float, list[str], int, int]:
    strategy = make_strategy("first_finish", policy, None, format=arithmetic.STEP_FORMAT,
                             sampling=SamplingParams(temperature=0.8, max_step_tokens=48))
    results = []
    model = policy if isinstance(policy, HFGenerator) else policy.inner
    passes = model.stats.forward_passes
    t0 = time.perf_counter()
    asyncio.run(run_many(strategy, problems, budget, 0, len(problems), results.append))
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: r.problem.id)
    tokens = sum(r.cost.generated_tokens for r in results)
    return seconds, [r.answer for r in results], model.stats.forward_passes - passes, int(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    problems = arithmetic.eval_set(zoo.DEFAULT_LEVEL)[:ns.problems]
    hf = HFGenerator.from_pretrained(zoo.policy_path())
    run(hf, problems[:4], 2)  # warm-up
    print(f"first_finish on {len(problems)} held-out problems, all in flight ({ns.threads} threads)\n")
    print(f"{'budget':>6}  {'races':<18}{'wall s':>8}{'forward passes':>16}{'tokens':>9}  {'speed-up':>8}  answers")
    for budget in ns.budgets:
        alone = run(OneRaceAtATime(hf), problems, budget)
        together = run(hf, problems, budget)
        same = sum(a == b for a, b in zip(alone[1], together[1]))
        for label, (seconds, _, passes, tokens) in (("one at a time", alone), ("coalesced", together)):
            speed = f"{alone[0] / seconds:.1f}x" if label == "coalesced" else ""
            print(f"{budget:>6}  {label:<18}{seconds:>8.2f}{passes:>16,}{tokens:>9,}  {speed:>8}  "
                  f"{same}/{len(problems)} equal" if label == "coalesced" else
                  f"{budget:>6}  {label:<18}{seconds:>8.2f}{passes:>16,}{tokens:>9,}")


if __name__ == "__main__":
    main()
