"""``run_smc``: the driver that runs one core configuration to the end.

The step itself lives in :mod:`itscale.core.kernel` (``SMC.init`` / ``step`` /
``finish``; its docstring has the algorithm). This function is the whole driver::

    state = kernel.init(initial)
    while not state.done:
        state = await kernel.step(state, rng)
    return kernel.finish(state)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .genealogy import Trajectory
from .kernel import SMC
from .observation import ObservationModel
from .records import STATUS_ALL_DEAD, STATUS_OK, AncestorSampling, Propose, Proposed, SMCResult, StepTrace
from .resampling import Resampler
from .schedules import Schedule

__all__ = ["STATUS_ALL_DEAD", "STATUS_OK", "AncestorSampling", "Proposed", "SMCResult", "StepTrace", "run_smc",
           "drive"]


async def drive(kernel: SMC, initial: Sequence[Any], rng: np.random.Generator) -> SMCResult:
    """Run ``kernel`` from ``initial`` until nothing can move."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (no global random state)")
    state = kernel.init(initial)
    while not state.done:
        state = await kernel.step(state, rng)
    return kernel.finish(state)


async def run_smc(
    initial: Sequence[Any],
    propose: Propose,
    observe: ObservationModel,
    *,
    rng: np.random.Generator,
    max_steps: int,
    resampler: "str | Resampler" = "systematic",
    schedule: "str | Schedule" = "always",
    expansion: int = 1,
    reference: Trajectory | None = None,
    ref_slot: int = 0,
    ancestor_sampling: AncestorSampling | None = None,
    **options: Any,
) -> SMCResult:
    """Run sequential Monte Carlo from ``initial`` (N states) for at most ``max_steps`` steps.

    ``propose(states, rng)`` moves each given state one step and returns
    :class:`Proposed`; ``observe`` is an observation model (``EveryStep``,
    ``Twisted``, ``Outcome`` or your own). ``resampler`` is a name or a
    :class:`Resampler` (unbiased scheme or biased selector); ``schedule`` a name such
    as ``"ess:0.5"`` or a schedule object. ``expansion=k`` proposes k children per
    particle and selects N of the N·k children at every step (beam-search style).
    Further ``options`` are :class:`~itscale.core.kernel.SMC` fields (``groups``,
    ``movers``, ``retire_finished``, ``keep_weights``, ``frontier``, ``tempering``).
    """
    kernel = SMC(propose, observe, max_steps, resampler=resampler, schedule=schedule, expansion=expansion,
                 reference=reference, ref_slot=ref_slot, ancestor_sampling=ancestor_sampling, **options)
    return await drive(kernel, initial, rng)
