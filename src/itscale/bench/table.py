"""The bench's answer as a table: cell formatting shared by the terminal and the HTML report.

``COLUMNS`` and ``format_row`` are the single source of the headers and cell text, so the
terminal table (``metrics_table``/``print_table``) and the HTML report show the same numbers.
Rows are shown grouped by method (in first-seen order), budgets ascending (``sort_rows``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from itscale.bench.metrics import MetricRow

MISSING = "—"
CAPTION = "means per problem; accuracy with its 95% Wilson interval; errors count as wrong"

# (key, header, numeric?): numeric columns are right-aligned; "\n" breaks a long header.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("method", "method", False),
    ("budget", "budget", True),
    ("n", "n", True),
    ("accuracy", "accuracy\n[95% CI]", True),
    ("coverage", "coverage\npass@budget", True),
    ("generated_tokens", "generated\ntokens\n/problem", True),
    ("prm_tokens", "PRM\ntokens\n/problem", True),
    ("flops", "FLOPs\n/problem", True),
    ("wall_time", "wall time\ns/problem", True),
    ("errors", "errors", True),
)


def method_order(rows: Iterable[MetricRow]) -> list[str]:
    """The distinct method names, in the order they first appear."""
    return list(dict.fromkeys(row.method for row in rows))


def sort_rows(rows: Iterable[MetricRow]) -> list[MetricRow]:
    """Rows grouped by method (first-seen order), budgets ascending within a method."""
    rows = list(rows)
    rank = {method: i for i, method in enumerate(method_order(rows))}
    return sorted(rows, key=lambda row: (rank[row.method], row.budget))


def format_percent(value: float | None) -> str:
    """``0.43`` → ``"43.0%"``; ``None`` → ``"—"``."""
    return MISSING if value is None else f"{100 * value:.1f}%"


def format_accuracy(row: MetricRow) -> str:
    """Accuracy with its 95% interval, e.g. ``"43.0% [38.1, 48.0]"``."""
    return f"{100 * row.accuracy:.1f}% [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]"


def format_count(value: float) -> str:
    """A per-problem mean count: ``1234.4`` → ``"1,234"``, ``12.25`` → ``"12.2"``, ``0.0`` → ``"0"``."""
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.1f}"


def format_flops(value: float | None) -> str:
    """Compact scientific notation: ``1.23e9`` → ``"1.2e9"``; ``None`` → ``"—"``."""
    if value is None:
        return MISSING
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_seconds(value: float) -> str:
    """Seconds with a precision that suits their size: ``"123"``, ``"4.56"``, ``"0.012"``."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_row(row: MetricRow) -> dict[str, str]:
    """The cell text of every column in ``COLUMNS``, keyed by column key."""
    return {
        "method": row.method,
        "budget": str(row.budget),
        "n": str(row.n),
        "accuracy": format_accuracy(row),
        "coverage": format_percent(row.coverage),
        "generated_tokens": format_count(row.generated_tokens),
        "prm_tokens": format_count(row.prm_tokens),
        "flops": format_flops(row.flops),
        "wall_time": format_seconds(row.wall_time),
        "errors": str(row.errors),
    }


def metrics_table(rows: Sequence[MetricRow], title: str | None = None) -> Table:
    """A rich ``Table`` with one line per row, in ``sort_rows`` order; failed runs in red."""
    rows = sort_rows(rows)
    cells = [format_row(row) for row in rows]
    table = Table(title=title, caption=CAPTION, header_style="bold", box=box.SIMPLE_HEAD,
                  collapse_padding=True)
    for key, header, numeric in COLUMNS:
        # On a narrow terminal long method names fold; numbers and header words are never cut.
        widest = max((len(line[key]) for line in cells), default=1)
        longest_word = max(len(word) for word in header.split())
        table.add_column(header, justify="right" if numeric else "left", overflow="fold",
                         min_width=max(longest_word, widest if numeric else min(widest, 12)))
    previous_method = None
    for row, line in zip(rows, cells):
        if previous_method is not None and row.method != previous_method:
            table.add_section()
        previous_method = row.method
        # Cells are data, not rich markup: a method named "[bold]x" must print as typed.
        line = {key: escape(text) for key, text in line.items()}
        if row.errors:
            line["errors"] = f"[red]{line['errors']}[/red]"
        table.add_row(*(line[key] for key, _, _ in COLUMNS))
    return table


def print_table(rows: Sequence[MetricRow], console: Console | None = None,
                title: str | None = None) -> None:
    """Print ``metrics_table(rows, title)`` to ``console`` (a fresh stdout console by default)."""
    (console or Console()).print(metrics_table(rows, title=title))

