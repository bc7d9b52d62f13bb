"""Public test utilities: models with exact answers, for testing SMC methods.

- :class:`EnumerableModel` — a small Markov sequence model with exact evidence and
  posterior, for testing the core driver, resamplers and conditional SMC;
- :class:`SimulatedTask` — a tree of reasoning steps with known correctness and
  probabilities, served through the real backend protocols by
  :class:`SimulatedPolicy`, :class:`SimulatedPRM` (controllable noise) and
  :class:`SimulatedVerifier`, for testing strategies end to end without a model.
"""

from .enumerable import EnumerableModel, MarkovAncestorSampling, path_index
from .simulated import SimulatedPolicy, SimulatedPRM, SimulatedTask, SimulatedVerifier, count_tokens

__all__ = [
    "EnumerableModel", "MarkovAncestorSampling", "SimulatedPRM", "SimulatedPolicy", "SimulatedTask",
    "SimulatedVerifier", "count_tokens", "path_index",
]
