"""Scorers: process reward models, outcome verifiers, and score aggregation."""

from .aggregate import AGGREGATIONS, aggregate, aggregate_prefixes

__all__ = ["AGGREGATIONS", "aggregate", "aggregate_prefixes"]
