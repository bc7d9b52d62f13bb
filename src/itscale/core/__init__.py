"""The numeric core: log-weights, resamplers, schedules, genealogy and the SMC driver.

numpy only; every random choice takes an explicit ``numpy.random.Generator``.
"""

from .genealogy import Genealogy, Trajectory
from .observation import EveryStep, ObservationModel, Outcome, Twisted, Unweighted
from .resampling import (
    RESAMPLERS,
    SELECTORS,
    Resampler,
    conditional_ancestors,
    get_resampler,
    offspring_counts,
)
from .schedules import Always, ESSBelow, EveryK, Never, Schedule, get_schedule
from .kernel import SMC, Retired, SMCState, best_first
from .records import STATUS_ALL_DEAD, STATUS_OK, AncestorSampling, Proposed, SMCResult, StepTrace
from .smc import drive, run_smc
from .sync import resolve, run_sync
from .tempering import EntropicAnnealing
from .weights import NEG_INF, ess, ess_fraction, log_normalize, logsumexp, normalize

__all__ = [
    "Always", "AncestorSampling", "ESSBelow", "EntropicAnnealing", "EveryK", "EveryStep", "Genealogy", "NEG_INF", "Never",
    "ObservationModel", "Outcome", "Proposed", "RESAMPLERS", "Resampler", "Retired", "SELECTORS", "SMC",
    "SMCResult", "SMCState",
    "STATUS_ALL_DEAD", "STATUS_OK", "Schedule", "StepTrace", "Trajectory", "Twisted", "Unweighted",
    "best_first", "conditional_ancestors", "drive", "ess", "ess_fraction", "get_resampler", "get_schedule", "log_normalize",
    "logsumexp", "normalize", "offspring_counts", "resolve", "run_smc", "run_sync",
]
