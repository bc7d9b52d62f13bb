"""Particle filtering on the embedded models with and without KV-cache reuse.

    python benchmarks/hf_backend.py [--problems 50] [--particles 16] [--level medium] [--threads 2]

Runs particle filtering (16 particles, ``EveryStep`` odds weights, systematic
resampling every step) on held-out arithmetic problems, all problems concurrently
through ``run_many`` (one policy call and one PRM call per round), twice on the
same seeds: once with the generator's KV-cache reuse and once without. It prints
tokens prefilled, wall time (total and inside the policy), accuracy, and

    ideal = Σ_problems (prompt tokens + Σ_final particles generated tokens)

the tokens a perfect cache would have to read: each prompt once and every token
of the final trajectories. Target: prefilled(reuse) ≤ 1.2 × ideal, and reuse at
least 1.5× faster than no reuse. Then generation throughput (tokens/s) for whole
solutions at batch 1 and batch 64.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from itscale import zoo
from itscale.bench.backends import Timed
from itscale.lm import HFGenerator
from itscale.rewards import HFTagPRM
from itscale.strategies import make_strategy, run_many
from itscale.tasks import arithmetic
from itscale.types import SamplingParams, StepRequest


def particle_filtering(problems, particles, reuse, prm, seed=0):
    policy = Timed(HFGenerator.from_pretrained(zoo.policy_path(), reuse_cache=reuse))
    pf = make_strategy("particle_filtering", policy, prm, format=arithmetic.STEP_FORMAT,
                       sampling=SamplingParams(temperature=0.8, max_step_tokens=24))
    t = time.perf_counter()
    results = asyncio.run(run_many(pf, problems, particles, seed=seed))
    wall = time.perf_counter() - t
    stats = policy.inner.stats
    ideal = 0
    for r in results:
        prompt = len(policy.inner.tokenizer(policy.inner.context_text(r.problem.prompt))["input_ids"])
        ideal += prompt + sum(c.particle.generated_tokens for c in r.candidates)
    accuracy = sum(bool(r.solution) and arithmetic.is_correct(r.problem, r.solution) for r in results) / len(results)
    return dict(wall=wall, policy_s=policy.seconds, prefilled=stats.prefilled_tokens, prompt=stats.prompt_tokens,
                generated=stats.generated_tokens, ideal=ideal, accuracy=accuracy)


def throughput(batch: int, problem) -> float:
    gen = HFGenerator.from_pretrained(zoo.policy_path(), reuse_cache=False)
    request = StepRequest(problem, (), batch, SamplingParams(temperature=0.8, max_step_tokens=96, seed=0), ())
    gen.generate_steps_sync([request])  # warm-up
    t = time.perf_counter()
    out = gen.generate_steps_sync([request])
    return sum(s.tokens for s in out[0]) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--level", default=zoo.DEFAULT_LEVEL)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = arithmetic.eval_set(args.level)[: args.problems]
    prm = HFTagPRM(str(zoo.prm_path()))
    print(f"particle filtering, {args.particles} particles, {len(problems)} '{args.level}' problems concurrently, "
          f"{args.threads} torch threads")
    rows = {}
    for reuse in (True, False):
        rows[reuse] = particle_filtering(problems, args.particles, reuse, prm)
    print(f"\n{'':<14}{'prefilled':>11}{'prompt sent':>13}{'generated':>11}{'ideal':>9}{'pref/ideal':>12}"
          f"{'policy s':>10}{'wall s':>9}{'accuracy':>10}")
    for reuse in (True, False):
        r = rows[reuse]
        print(f"{'reuse' if reuse else 'no reuse':<14}{r['prefilled']:>11,}{r['prompt']:>13,}{r['generated']:>11,}"
              f"{r['ideal']:>9,}{r['prefilled'] / r['ideal']:>12.2f}{r['policy_s']:>10.1f}{r['wall']:>9.1f}"
              f"{100 * r['accuracy']:>9.1f}%")
    a, b = rows[True], rows[False]
    print(f"\nprefilled with reuse / ideal = {a['prefilled'] / a['ideal']:.2f} (target ≤ 1.2)")
    print(f"speed-up from reuse: policy {b['policy_s'] / a['policy_s']:.2f}x, wall {b['wall'] / a['wall']:.2f}x "
          f"(target ≥ 1.5x)")
    for batch in (1, 64):
        print(f"throughput, whole solutions at batch {batch:>2}: {throughput(batch, problems[0]):,.0f} tokens/s")


if __name__ == "__main__":
    main()
