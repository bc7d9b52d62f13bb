"""PNG plots of the bench's answer: accuracy versus budget and versus generated tokens, and the
compute-optimal frontier (the best accuracy reachable at each token cost, any method).

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas, never through
``pyplot``: nothing is registered globally, no GUI backend is touched, and nothing leaks
between calls. Each method is one line with markers and its 95% interval shaded; a method
keeps the same color in every plot (``method_colors``, tab10 in first-seen order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, NullLocator, PercentFormatter

from itscale.bench.metrics import MetricRow, frontier, token_cost
from itscale.bench.table import method_order

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

# x: (MetricRow field, axis label, log base, default title)
X_AXES: dict[str, tuple[str, str, int, str]] = {
    "budget": ("budget", "budget (log2)", 2, "Accuracy vs budget"),
    "generated_tokens": ("generated_tokens", "generated tokens per problem (log scale)", 10,
                         "Accuracy vs generated tokens"),
}

# plot_all: key → (x, file name); the report shows key "budget" as <img id="plot-budget">.
PLOT_FILES: dict[str, tuple[str, str]] = {
    "budget": ("budget", "accuracy_vs_budget.png"),
    "tokens": ("generated_tokens", "accuracy_vs_tokens.png"),
}


def method_colors(rows: Sequence[MetricRow]) -> dict[str, str]:
    """A hex color per method, in first-seen order: tab10, or tab20 beyond ten methods."""
    methods = method_order(rows)
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    return {method: to_hex(palette[i % len(palette)]) for i, method in enumerate(methods)}


def plot_accuracy(rows: Sequence[MetricRow], path: str | Path, x: str = "budget",
                  title: str | None = None) -> Path:
    """Write a PNG of accuracy (%) against ``x`` ("budget" or "generated_tokens") to ``path``.

    One line per method with markers and its 95% interval shaded; the x axis is log2 with a
    tick at every budget, or log10 for tokens. Points with x ≤ 0 cannot sit on a log axis and
    are left out. Returns ``path`` as a ``Path``.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}, got {x!r}")
    if not rows:
        raise ValueError("no rows to plot")
    field, xlabel, base, default_title = X_AXES[x]
    colors = method_colors(rows)

    figure = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    drawn = 0
    for i, method in enumerate(colors):
        points = sorted((row for row in rows if row.method == method and getattr(row, field) > 0),
                        key=lambda row: getattr(row, field))
        if not points:
            continue
        xs = [getattr(row, field) for row in points]
        axes.fill_between(xs, [100 * row.ci_low for row in points],
                          [100 * row.ci_high for row in points],
                          color=colors[method], alpha=0.15, linewidth=0)
        axes.plot(xs, [100 * row.accuracy for row in points], color=colors[method],
                  marker=MARKERS[i % len(MARKERS)], linewidth=2, markersize=6,
                  label=_plain_label(method))
        drawn += 1

    axes.set_xscale("log", base=base)
    values = sorted({getattr(row, field) for row in rows if getattr(row, field) > 0})
    if x == "budget":
        axes.set_xticks(values, [str(budget) for budget in values])
        axes.xaxis.set_minor_locator(NullLocator())
    elif values:
        _label_log10_axis(axes, values[0], values[-1])
    axes.yaxis.set_major_formatter(PercentFormatter(100))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy (shaded: 95% interval)")
    axes.set_title(title or default_title)
    axes.grid(True, which="major", alpha=0.3)
    if drawn:
        axes.legend(title="method", fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no rows with {field} > 0", transform=axes.transAxes,
                  ha="center", va="center", color="0.4")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


FRONTIER_FILE = "compute_frontier.png"


def plot_frontier(rows: Sequence[MetricRow], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of every (method, budget) as a point at its token cost (generated + PRM
    tokens per problem, log scale) and accuracy, with the compute-optimal frontier drawn
    through the points that beat everything cheaper, each labelled ``method@budget``."""
    if not rows:
        raise ValueError("no rows to plot")
    colors = method_colors(rows)
    figure = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    priced = [row for row in rows if token_cost(row) > 0]
    for i, method in enumerate(colors):
        points = [row for row in priced if row.method == method]
        if points:
            axes.scatter([token_cost(r) for r in points], [100 * r.accuracy for r in points], color=colors[method],
                         marker=MARKERS[i % len(MARKERS)], s=28, label=_plain_label(method))
    best = frontier(priced)
    if best:
        xs = [token_cost(r) for r in best]
        axes.step(xs + [xs[-1] * 1.5], [100 * r.accuracy for r in best] + [100 * best[-1].accuracy], where="post",
                  color="black", linewidth=1.5, label="frontier")
        for r in best:
            axes.annotate(_plain_label(f"{r.method}@{r.budget}"), (token_cost(r), 100 * r.accuracy), fontsize=7,
                          xytext=(3, 4), textcoords="offset points")
        axes.set_xscale("log")
        _label_log10_axis(axes, min(token_cost(r) for r in priced), max(token_cost(r) for r in priced))
    axes.yaxis.set_major_formatter(PercentFormatter(100))
    axes.set_xlabel("tokens per problem: generated + read by the PRM (log scale)")
    axes.set_ylabel("accuracy")
    axes.set_title(title or "Compute-optimal frontier: best accuracy at each token cost")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="x-small", ncols=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_all(rows: Sequence[MetricRow], folder: str | Path) -> dict[str, Path]:
    """Write ``accuracy_vs_budget.png``, ``accuracy_vs_tokens.png`` and ``compute_frontier.png``
    into ``folder``.

    Returns ``{"budget": path, "tokens": path, "frontier": path}``, the form
    ``report.write_report`` takes.
    """
    folder = Path(folder)
    out = {key: plot_accuracy(rows, folder / name, x=x) for key, (x, name) in PLOT_FILES.items()}
    out["frontier"] = plot_frontier(rows, folder / FRONTIER_FILE)
    return out


def _label_log10_axis(axes, low: float, high: float) -> None:
    """Plain labelled ticks (1-2-5 steps, or decades over a wide range) that bracket the data,
    so that a range inside one decade still gets at least two labels."""
    subs = (1, 2, 5) if high / low <= 1e3 else (1,)
    candidates = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1,
                                               math.ceil(math.log10(high)) + 2) for m in subs]
    first = max(t for t in candidates if t <= low)
    last = min(t for t in candidates if t >= high)
    ticks = [t for t in candidates if first <= t <= last]
    axes.set_xlim(first / 1.15, last * 1.15)
    axes.set_xticks(ticks, [_compact_number(t) for t in ticks])
    axes.xaxis.set_minor_formatter(NullFormatter())


def _compact_number(value: float) -> str:
    """``500`` → ``"500"``, ``2000`` → ``"2k"``, ``5e6`` → ``"5M"``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _plain_label(method: str) -> str:
    """A legend label shown as typed: ``$`` would start mathtext; a leading ``_`` hides it."""
    label = method.replace("$", r"\$")
    return f" {label}" if label.startswith("_") else label
