"""A self-contained HTML report of a bench run: one file that opens anywhere, offline.

Everything is inline: CSS in a ``<style>`` element, plots as base64 ``data:`` URIs, no
scripts, fonts or links; a Content-Security-Policy forbids the page to fetch anything else.
Every string that comes from data (method names, config, environment, notes) is escaped
with ``html.escape``. The page's own colors are greys, so a plot's line colors on a
screenshot can only come from the embedded images (tests/bench/test_report_browser.py).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import mimetypes
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path

from itscale.bench.metrics import MetricRow
from itscale.bench.plots import plot_all
from itscale.bench.table import (
    CAPTION,
    COLUMNS,
    format_flops,
    format_row,
    method_order,
    sort_rows,
)

PACKAGES = ("itscale", "numpy", "torch", "transformers", "matplotlib")

PLOT_ALT = {
    "budget": "accuracy versus budget, one line per method, 95% interval shaded",
    "tokens": "accuracy versus generated tokens per problem, one line per method, 95% interval shaded",
    "frontier": "compute-optimal frontier: every method and budget at its token cost, the best accuracy "
                "reachable at each cost as a step line",
}

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# Greys only: keep the page's colors clear of the plots' tab10 palette.
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 2rem auto; max-width: 1300px; padding: 0 1rem; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
.summary { color: #555; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #e4e4e4; vertical-align: bottom; }
th { text-align: left; background: #f3f3f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.first-of-method td { border-top: 2px solid #999; }
td.err { font-weight: bold; }
caption { caption-side: bottom; color: #666; font-size: 0.8rem; padding-top: 0.4rem; text-align: left; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
dl.costs { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.costs dt { color: #555; }
dl.costs dd { margin: 0; font-variant-numeric: tabular-nums; }
"""


def environment_info() -> dict:
    """Where the bench ran: Python, platform, CPU count and the versions of key packages.

    Versions come from package metadata (nothing is imported); packages that are not
    installed are left out.
    """
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }


def cost_totals(rows: Iterable[MetricRow]) -> dict:
    """Totals over every row of per-problem mean × n.

    ``flops`` sums the rows that have an estimate (``None`` when none has);
    ``flops_missing`` counts the rows without one.
    """
    rows = list(rows)
    with_flops = [row for row in rows if row.flops is not None]
    return {
        "generated_tokens": sum(row.generated_tokens * row.n for row in rows),
        "prm_tokens": sum(row.prm_tokens * row.n for row in rows),
        "flops": sum(row.flops * row.n for row in with_flops) if with_flops else None,
        "flops_missing": len(rows) - len(with_flops),
        "wall_time": sum(row.wall_time * row.n for row in rows),
        "errors": sum(row.errors for row in rows),
    }


def write_report(rows: Sequence[MetricRow], path: str | Path, *, config: dict,
                 environment: dict, title: str = "itscale bench report",
                 plots: Mapping[str, Path] | None = None, notes: Sequence[str] = (), allocation=None) -> Path:
    """Write the HTML report to ``path`` and return it as a ``Path``.

    ``allocation`` (an :class:`itscale.allocation.AllocationResult`) adds the section
    "Compute-optimal allocation": one row per cost level, as ``itscale bench`` prints it.

    ``plots`` maps a key to a PNG file, as ``plots.plot_all`` returns: key "budget" becomes
    ``<img id="plot-budget">``, "tokens" ``<img id="plot-tokens">``, "frontier"
    ``<img id="plot-frontier">``. ``None`` draws the plots here (when there are rows); ``{}``
    leaves them out.
    """
    rows = sort_rows(rows)
    if plots is None and rows:
        with tempfile.TemporaryDirectory(prefix="itscale-report-") as folder:
            images = {key: _data_uri(file) for key, file in plot_all(rows, folder).items()}
    else:
        images = {key: _data_uri(file) for key, file in (plots or {}).items()}
    document = render_report(rows, config=config, environment=environment, title=title,
                             images=images, notes=notes, allocation=allocation)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def render_report(rows: Sequence[MetricRow], *, config: dict, environment: dict, title: str,
                  images: Mapping[str, str], notes: Sequence[str] = (), allocation=None) -> str:
    """The report as an HTML string; ``images`` maps a plot key to its ``data:`` URI."""
    config_json = json.dumps(config, indent=2, default=str, ensure_ascii=False)
    sections = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="summary" id="summary">{escape(_summary(rows))}</p>',
        _notes_section(notes),
        "<h2>Metrics</h2>",
        _metrics_table(rows),
        _plots_section(images),
        _allocation_section(allocation),
        "<h2>Cost</h2>",
        _cost_section(rows),
        "<h2>Configuration</h2>",
        f'<pre id="config">{escape(config_json)}</pre>',
        "<h2>Environment</h2>",
        _environment_section(environment),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _summary(rows: Sequence[MetricRow]) -> str:
    if not rows:
        return "No results."
    methods = method_order(rows)
    budgets = sorted({row.budget for row in rows})
    sizes = sorted({row.n for row in rows})
    n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    totals = cost_totals(rows)
    return " · ".join([
        f"{len(methods)} method{'s' if len(methods) != 1 else ''}: {', '.join(methods)}",
        f"budgets {', '.join(map(str, budgets))}",
        f"n = {n} problems × seeds per row",
        f"wall time {_duration(totals['wall_time'])}",
        f"{totals['generated_tokens']:,.0f} generated tokens",
        f"{totals['errors']} errors",
    ])


def _metrics_table(rows: Sequence[MetricRow]) -> str:
    header = "".join(_header_cell(label, numeric) for _, label, numeric in COLUMNS)
    lines = []
    previous_method = None
    for row in rows:
        cells = format_row(row)
        tds = "".join(_metrics_cell(key, cells[key], numeric, row) for key, _, numeric in COLUMNS)
        first = ' class="first-of-method"' if previous_method not in (None, row.method) else ""
        previous_method = row.method
        lines.append(f'<tr data-method="{escape(row.method)}" data-budget="{row.budget}"{first}>{tds}</tr>')
    body = "\n".join(lines)
    return (f'<table id="metrics">\n<caption>{escape(CAPTION)}</caption>\n'
            f"<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>")


def _header_cell(label: str, numeric: bool) -> str:
    attribute = ' class="num"' if numeric else ""
    return f'<th scope="col"{attribute}>{"<br>".join(escape(line) for line in label.splitlines())}</th>'


def _metrics_cell(key: str, text: str, numeric: bool, row: MetricRow) -> str:
    classes = (["num"] if numeric else []) + (["err"] if key == "errors" and row.errors else [])
    attribute = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attribute}>{escape(text)}</td>"


def _plots_section(images: Mapping[str, str]) -> str:
    if not images:
        return ""
    figures = "\n".join(
        f'<figure><img id="plot-{escape(str(key))}" src="{escape(uri)}" '
        f'alt="{escape(PLOT_ALT.get(key, f"plot: {key}"))}"></figure>'
        for key, uri in images.items())
    return f"<h2>Plots</h2>\n{figures}"


def _allocation_section(allocation) -> str:
    """The learnt allocation per cost level (:mod:`itscale.bench.allocation`), or nothing."""
    if allocation is None:
        return ""
    from itscale.bench.allocation import CAPTION as ALLOCATION_CAPTION
    from itscale.bench.allocation import COLUMNS as ALLOCATION_COLUMNS
    from itscale.bench.allocation import allocation_rows, summary

    header = "".join(_header_cell(label, numeric) for _, label, numeric in ALLOCATION_COLUMNS)
    NUM = ' class="num"'
    lines = []
    for level, cells in zip(allocation.levels, allocation_rows(allocation)):
        tds = "".join(f"<td{NUM if numeric else ''}>{escape(cells[key])}</td>"
                      for key, _, numeric in ALLOCATION_COLUMNS)
        lines.append(f'<tr data-budget="{level.budget}" data-feasible="{str(level.feasible).lower()}">{tds}</tr>')
    notes = "".join(f"<li>{escape(note)}</li>" for note in allocation.notes)
    return ("<h2>Compute-optimal allocation</h2>\n"
            f'<p class="summary" id="allocation-summary">{escape(summary(allocation))}</p>\n'
            f'<table id="allocation">\n<caption>{escape(ALLOCATION_CAPTION)}</caption>\n'
            f"<thead><tr>{header}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody>\n</table>"
            + (f'\n<ul id="allocation-notes">{notes}</ul>' if notes else ""))


def _cost_section(rows: Sequence[MetricRow]) -> str:
    totals = cost_totals(rows)
    flops = format_flops(totals["flops"])
    if totals["flops_missing"] and totals["flops"] is not None:
        flops += f" ({totals['flops_missing']} rows without an estimate)"
    items = [
        ("generated tokens", f"{totals['generated_tokens']:,.0f}"),
        ("PRM tokens", f"{totals['prm_tokens']:,.0f}"),
        ("FLOPs", flops),
        ("wall time", _duration(totals["wall_time"])),
    ]
    entries = "\n".join(f"<dt>{escape(name)}</dt><dd>{escape(value)}</dd>" for name, value in items)
    return (f'<dl class="costs" id="costs">\n{entries}\n</dl>\n'
            '<p class="summary">Totals over all rows of the per-problem mean × n. Best-of-N '
            "budgets are subsamples of one run, so these are nominal costs, not time spent.</p>")


def _environment_section(environment: Mapping) -> str:
    rows = "\n".join(f"<tr><th scope=\"row\">{escape(key)}</th><td>{escape(value)}</td></tr>"
                     for key, value in _flatten(environment))
    return f'<table id="environment">\n<tbody>\n{rows}\n</tbody>\n</table>'


def _notes_section(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "\n".join(f"<li>{escape(str(note))}</li>" for note in notes)
    return f'<ul id="notes">\n{items}\n</ul>'


def _flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """Nested mappings as ("outer.inner", "value") pairs, in order."""
    pairs = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            pairs.extend(_flatten(value, prefix=f"{name}."))
        else:
            pairs.append((name, str(value)))
    return pairs


def _data_uri(file: str | Path) -> str:
    """The file's bytes as a base64 ``data:`` URI (PNG unless its suffix says otherwise)."""
    mime = mimetypes.guess_type(str(file))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(file).read_bytes()).decode('ascii')}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
