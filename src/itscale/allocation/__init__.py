"""Compute-optimal allocation: spend a problem's budget where it buys the most accuracy.

After Snell et al. (2024), "Scaling LLM test-time compute optimally can be more effective than
scaling model parameters", and Liu et al. (2025), "Can 1B LLM surpass 405B LLM? Rethinking
compute-optimal test-time scaling": a cheap probe estimates each problem's difficulty; the
method and budget per difficulty bin are chosen to maximise accuracy under a total budget.

Modules, one job each (pure Python and numpy, no backend imports):

- :mod:`.difficulty`: the difficulty scores (``agreement``, ``prm``) and the probe's own vote;
- :mod:`.probe`: the probe, k whole samples through a strategy's ``RunContext``;
- :mod:`.bins`: quantile bin edges and the bin of a score;
- :mod:`.split`: the train/test split by a hash of the problem id;
- :mod:`.knapsack`: the multiple-choice knapsack, exact, for every capacity at once;
- :mod:`.learning`: per-bin statistics, the choice per cost level, the evaluation on the test split;
- :mod:`.policy`: the learnt policy, ``allocation.json``.

``itscale bench`` learns it (a config's ``allocation:`` section); the ``compute_optimal``
method (:mod:`itscale.strategies.compute_optimal`) applies it, in Python, the bench and
``itscale serve --allocation FILE``.
"""

from .bins import bin_of, quantile_edges
from .difficulty import SCORES, agreement_difficulty, prm_difficulty, vote
from .knapsack import Point, frontier, pareto, solve
from .learning import (
    PROBE_OPTION,
    AllocationResult,
    LevelResult,
    Observations,
    Option,
    Outcome,
    learn,
)
from .policy import (
    PROBE_METHOD,
    AllocationError,
    AllocationPolicy,
    Choice,
    Level,
    ProbeSettings,
    load_allocation,
    parse_allocation,
    save_allocation,
)
from .probe import ProbeOutcome, run_probe
from .split import in_train

__all__ = [
    "PROBE_METHOD", "PROBE_OPTION", "SCORES", "AllocationError", "AllocationPolicy", "AllocationResult", "Choice",
    "Level", "LevelResult", "Observations", "Option", "Outcome", "Point", "ProbeOutcome", "ProbeSettings",
    "agreement_difficulty", "bin_of", "frontier", "in_train", "learn", "load_allocation", "pareto",
    "parse_allocation", "prm_difficulty", "quantile_edges", "run_probe", "save_allocation", "solve", "vote",
]
