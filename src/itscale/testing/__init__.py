"""Public test utilities: models with exact answers, for testing SMC methods."""

from .enumerable import EnumerableModel, MarkovAncestorSampling, path_index

__all__ = ["EnumerableModel", "MarkovAncestorSampling", "path_index"]
