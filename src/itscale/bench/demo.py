"""The embedded demo (``itscale demo``, ``make demo``): the standard comparison on a laptop.

Greedy decoding, majority vote, best-of-N, weighted best-of-N, beam search, DVTS and
particle filtering, then the search methods of issue 18 that a PRM guides (entropic particle
filtering, early rejection, A*-decoding, MCTS with progressive widening), on held-out medium
arithmetic problems at budgets 1-16, with the policy and PRM shipped in :mod:`itscale.zoo`.
Beam search and DVTS need the budget to be a multiple of the beam width, so they use width 2
and start at budget 2. (First-finish search, RPC and the confidence methods are in the scaling
study: on this policy they trail the vote, README "Scaling study".)

Every PRM-guided method reads a solution's score as its lowest step score
(``aggregation: min``): the embedded PRM catches a slipped line where it happens but its
last tag partly forgets a ±10 slip made earlier (MODEL_CARD.md). The choice was made on
100 fresh problems that are not in the demo's set, where ``min`` was as good as or better
than ``last`` for every method (particle filtering at 16: 87% both). Sampling temperature
0.8 for every method, the temperature at which the model card measures the pair.
"""

from __future__ import annotations

from .. import zoo
from .config import BenchConfig, validate_config

BUDGETS = [1, 2, 4, 8, 16]
SCORE = {"aggregation": "min"}  # how every PRM-guided method reads a solution's step scores


def demo_config(output: str = "itscale-demo", problems: int = 100, policy: str = "embedded",
                prm: str = "embedded") -> BenchConfig:
    """The demo's configuration; ``policy``/``prm`` may name folders or OpenAI-compatible URLs
    serving the embedded models (e.g. vLLM)."""
    return validate_config({
        "problems": {"source": f"arithmetic:{zoo.DEFAULT_LEVEL}", "limit": problems},
        "policy": {"model": policy, "temperature": 0.8},
        "prm": {"model": prm},
        "format": "arithmetic",
        "methods": [
            {"name": "greedy"},
            {"name": "self_consistency", "label": "majority_vote"},
            {"name": "best_of_n", "params": SCORE},
            {"name": "weighted_best_of_n", "params": SCORE},
            {"name": "beam_search", "params": {"beam_width": 2, **SCORE}, "budgets": [b for b in BUDGETS if b >= 2]},
            {"name": "dvts", "params": {"beam_width": 2, **SCORE}, "budgets": [b for b in BUDGETS if b >= 2]},
            {"name": "particle_filtering", "params": SCORE},
            {"name": "entropic_particle_filtering", "params": SCORE},
            {"name": "early_rejection", "params": SCORE},
            {"name": "a_star", "params": SCORE},
            {"name": "mcts", "params": SCORE},
        ],
        "budgets": BUDGETS,
        "seeds": [0],
        "output": output,
    }, "demo")
