"""Every inference-time scaling method as a configuration of the SMC core.

Select a method by name with validated parameters::

    from itscale.strategies import make_strategy
    pf = make_strategy("particle_filtering", policy, prm, temperature=0.5)
    result = pf.solve(problem, budget=16, seed=0)
"""

from . import (
    a_star,
    beam_search,
    best_of_n,
    compute_optimal,
    deepconf,
    early_rejection,
    first_finish,
    greedy,
    mcts,
    parallel_tempering,
    particle_filtering,
    particle_gibbs,
    rpc,
    self_certainty,
    self_consistency,
)
from .base import STRATEGIES, PooledStrategy, Strategy, make_strategy
from .context import RunContext, StepFormat
from .runner import map_batched, problem_seed, run_many

__all__ = ["STRATEGIES", "PooledStrategy", "RunContext", "StepFormat", "Strategy", "make_strategy", "map_batched",
           "problem_seed", "run_many"]

del (a_star, beam_search, best_of_n, compute_optimal, deepconf, early_rejection, first_finish, greedy,
     mcts, parallel_tempering, particle_filtering, particle_gibbs, rpc, self_certainty, self_consistency)
