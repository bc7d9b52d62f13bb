"""The bench: which method, at which budget, buys how much accuracy for how much compute.

``itscale bench CONFIG`` (see :mod:`itscale.bench.config`) sweeps methods × budgets × seeds
over a problem set, stores every graded result in SQLite so a killed run resumes, and
writes metrics with intervals, exports, plots and a self-contained HTML report.
"""

from .config import BenchConfig, ConfigError, load_config, validate_config
from .metrics import MetricRow, summarize

__all__ = ["BenchConfig", "ConfigError", "MetricRow", "load_config", "summarize", "validate_config"]
