r"""DeepConf's confidence measures over a trace's top-k log-probabilities (pure Python).

From Fu, Wang, Tian and Zhao, *Deep Think with Confidence* (2025, arXiv:2508.15260), §3
(the measures) and §4 (online early stopping); the window edge cases and the bottom-10%
count follow the authors' code (``facebookresearch/deepconf``: ``compute_least_grouped``,
``calculate_bottom_window_confidence``, ``calculate_tail_confidence``).

A backend returns, per generated token ``i``, the ``k`` largest log-probabilities of the
model's next-token distribution ``P_i`` at temperature 1, descending
(:attr:`itscale.types.Step.top_logprobs`, asked with :attr:`SamplingParams.top_logprobs
<itscale.types.SamplingParams.top_logprobs>`). The measures:

- **Token confidence** (:func:`token_confidence`)

      C_i = −(1/k) Σ_{j=1..k} log P_i(j),

  ``P_i(j)`` the j-th largest probability at token ``i``. Larger is more confident: a peaked
  ``P_i`` has a top-1 near 0 and the other top-k far below (the paper's k is vLLM's
  ``logprobs=20``; with ``k = 1`` the measure is the top token's surprisal, which *falls* as
  the model grows surer).
- **Average trace confidence** (:func:`average_confidence`): ``C_avg = (1/N) Σ_{i=1..N} C_i``.
- **Group confidence** (:func:`group_confidences`): over sliding windows ``G_i`` of ``n``
  consecutive tokens (adjacent windows overlap in ``n − 1`` tokens),

      C_{G_i} = (1/|G_i|) Σ_{t ∈ G_i} C_t,

  the ``N − n + 1`` windows of a trace of ``N ≥ n`` tokens; a trace shorter than the window
  has one group, the mean over what exists (as the authors' code; an empty trace has none).
- **Lowest group confidence** (:func:`lowest_group_confidence`): ``min_i C_{G_i}``.
- **Bottom-10% group confidence** (:func:`bottom_group_confidence`): the mean of the lowest
  ``max(1, ⌊0.1 · #groups⌋)`` group confidences (``fraction`` = 0.1).
- **Tail confidence** (:func:`tail_confidence`): the mean of ``C_t`` over the last ``n``
  tokens (the paper's 2048; all of them when the trace is shorter).

**Online** (DeepConf-low / -high, §4): a warm-up of ``N_init`` traces sets the threshold

      s = Percentile_{100−η}({C_least(t) : t ∈ warm-up}),

``C_least`` the lowest group confidence of a warm-up trace, η = 10 (DeepConf-low, keep the
top 10 %) or 90 (DeepConf-high) (:func:`online_threshold`; numpy's linear-interpolation
percentile, as the authors' code). Every later trace stops as soon as the group confidence of
its last ``n`` tokens falls below ``s`` (:class:`WindowCheck`; the backends do this while
generating, :class:`itscale.types.ConfidenceStop`). As in the authors' vLLM logits processor
the check starts once ``n`` tokens exist (a window is full) and is strict (``< s``).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

__all__ = [
    "WindowCheck", "average_confidence", "bottom_group_confidence", "group_confidences", "lowest_group_confidence",
    "online_threshold", "tail_confidence", "token_confidence", "token_confidences",
]


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """``C_i = −(1/k) Σ_j log P_i(j)`` for one token's top-k log-probabilities (k = their number)."""
    if not top_logprobs:
        raise ValueError("token confidence needs at least one log-probability")
    return -math.fsum(top_logprobs) / len(top_logprobs)


def token_confidences(top_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """``C_i`` for every token of a trace (``Step.top_logprobs``, or several steps' concatenated)."""
    return [token_confidence(top) for top in top_logprobs]


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")


def group_confidences(confidences: Sequence[float], window: int) -> list[float]:
    """``C_{G_i}`` of every sliding window of ``window`` tokens (one mean over all tokens when the
    trace is shorter; ``[]`` for an empty trace)."""
    _check_window(window)
    c = list(confidences)
    if len(c) < window:
        return [math.fsum(c) / len(c)] if c else []
    return [math.fsum(c[i:i + window]) / window for i in range(len(c) - window + 1)]


def _groups(confidences: Sequence[float], window: int) -> list[float]:
    groups = group_confidences(confidences, window)
    if not groups:
        raise ValueError("an empty trace has no group confidence")
    return groups


def lowest_group_confidence(confidences: Sequence[float], window: int) -> float:
    """``C_least = min_i C_{G_i}``."""
    return min(_groups(confidences, window))


def bottom_group_confidence(confidences: Sequence[float], window: int, fraction: float = 0.1) -> float:
    """The mean of the lowest ``max(1, ⌊fraction · #groups⌋)`` group confidences (bottom-10 %)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    groups = sorted(_groups(confidences, window))
    n = max(1, int(len(groups) * fraction))
    return math.fsum(groups[:n]) / n


def tail_confidence(confidences: Sequence[float], tokens: int) -> float:
    """The mean ``C_t`` over the last ``tokens`` tokens (all of them in a shorter trace)."""
    _check_window(tokens)
    tail = list(confidences)[-tokens:]
    if not tail:
        raise ValueError("an empty trace has no tail confidence")
    return math.fsum(tail) / len(tail)


def average_confidence(confidences: Sequence[float]) -> float:
    """``C_avg = (1/N) Σ_i C_i``."""
    if not confidences:
        raise ValueError("an empty trace has no average confidence")
    return math.fsum(confidences) / len(confidences)


def online_threshold(lowest: Sequence[float], eta: float) -> float:
    """DeepConf-online's stopping threshold ``s = Percentile_{100−η}`` of the warm-up traces'
    lowest group confidences (``eta`` = 10: DeepConf-low; 90: DeepConf-high); linear
    interpolation between order statistics, as ``numpy.percentile``."""
    if not 0 <= eta <= 100:
        raise ValueError(f"eta must be in [0, 100], got {eta!r}")
    values = sorted(float(x) for x in lowest)
    if not values:
        raise ValueError("the online threshold needs at least one warm-up trace")
    at = (100.0 - eta) / 100.0 * (len(values) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (at - lo) * (values[hi] - values[lo])


class WindowCheck:
    """The online stopping rule of one trace, token by token: :meth:`push` takes ``C_i`` and says
    whether the group confidence of the last ``window`` tokens (once that many exist) is below
    ``threshold``. A running float64 sum (added and subtracted per token)."""

    __slots__ = ("window", "threshold", "_last", "_sum")

    def __init__(self, window: int, threshold: float):
        _check_window(window)
        self.window, self.threshold = window, float(threshold)
        self._last: deque[float] = deque()
        self._sum = 0.0

    def push(self, confidence: float) -> bool:
        """Add the next token's ``C_i``; True when the rule fires at this token."""
        self._last.append(confidence)
        self._sum += confidence
        if len(self._last) > self.window:
            self._sum -= self._last.popleft()
        return len(self._last) == self.window and self._sum / self.window < self.threshold
