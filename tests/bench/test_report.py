"""The bench's output layer on synthetic rows: terminal table, PNG plots, HTML report."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from rich.console import Console

from itscale.bench.metrics import MetricRow, frontier, token_cost
from itscale.bench.plots import method_colors, plot_accuracy, plot_all
from itscale.bench.report import cost_totals, environment_info, write_report
from itscale.bench.table import (
    COLUMNS,
    format_accuracy,
    format_flops,
    format_row,
    metrics_table,
    print_table,
    sort_rows,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script>"


def synthetic_rows(methods=("particle_filtering", "best_of_n", "beam_search")) -> list[MetricRow]:
    """Three budgets per method, deliberately out of order, with a missing coverage/FLOPs."""
    rows = []
    for m, method in enumerate(methods):
        for budget in (4, 1, 16):
            accuracy = 0.30 + 0.05 * m + 0.1 * np.log2(budget) / 4
            rows.append(MetricRow(
                method=method, budget=budget, n=200, accuracy=accuracy,
                ci_low=accuracy - 0.05, ci_high=accuracy + 0.05,
                coverage=None if method == "best_of_n" and budget == 1 else min(1.0, accuracy + 0.2),
                generated_tokens=250.0 * budget * (m + 1), prm_tokens=40.0 * budget,
                flops=None if method == "beam_search" else 1.234e9 * budget,
                wall_time=0.75 * budget, errors=1 if budget == 16 else 0))
    return rows


class ReportParser(HTMLParser):
    """Collects what the report tests look at: every element's attributes, the metrics
    table's body rows (attributes and cell texts) and the config's text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.metric_rows: list[tuple[dict, list[str]]] = []
        self.config_text = ""
        self._in_metrics = self._in_tbody = self._in_config = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "table":
            self._in_metrics = attrs.get("id") == "metrics"
        elif tag == "tbody" and self._in_metrics:
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.metric_rows.append((attrs, []))
        elif tag == "td" and self._in_tbody:
            self._in_cell = True
            self.metric_rows[-1][1].append("")
        elif tag == "pre" and attrs.get("id") == "config":
            self._in_config = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_metrics = self._in_tbody = False
        elif tag == "td":
            self._in_cell = False
        elif tag == "pre":
            self._in_config = False

    def handle_data(self, data):
        if self._in_cell:
            self.metric_rows[-1][1][-1] += data
        if self._in_config:
            self.config_text += data

    def element(self, element_id: str) -> tuple[str, dict] | None:
        return next((e for e in self.elements if e[1].get("id") == element_id), None)


def parse(document: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(document)
    parser.close()
    return parser


def color_pixel_count(png: Path, color: str, tolerance: float = 0.06) -> int:
    """How many pixels of ``png`` are within ``tolerance`` (per RGB channel, 0..1) of ``color``."""
    image = imread(png)[..., :3]
    return int((np.abs(image - np.array(to_rgb(color))) <= tolerance).all(axis=-1).sum())


def missing_colors(png: Path, colors: dict[str, str], min_pixels: int = 200) -> list[str]:
    """The methods whose line color shows on fewer than ``min_pixels`` pixels of ``png``."""
    return [method for method, color in colors.items() if color_pixel_count(png, color) < min_pixels]


def image_bytes(data_uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix), data_uri[:40]
    return base64.b64decode(data_uri[len(prefix):], validate=True)


@pytest.fixture
def rows() -> list[MetricRow]:
    return synthetic_rows()


# --- table -------------------------------------------------------------------------------


def test_cell_formats():
    row = MetricRow("m", 8, 100, 0.43, 0.381, 0.48, None, 1234.4, 0.0, 1.23e9, 0.0123, 2)
    assert format_accuracy(row) == "43.0% [38.1, 48.0]"
    assert format_flops(1.23e9) == "1.2e9"
    assert format_flops(4.56e12) == "4.6e12"
    assert format_flops(None) == "—"
    assert format_row(row) == {
        "method": "m", "budget": "8", "n": "100", "accuracy": "43.0% [38.1, 48.0]",
        "coverage": "—", "generated_tokens": "1,234", "prm_tokens": "0", "flops": "1.2e9",
        "wall_time": "0.012", "errors": "2",
    }
    assert format_row(MetricRow("m", 1, 1, 1.0, 1.0, 1.0, 0.5, 12.25, 3.0, None, 4.5))["coverage"] == "50.0%"


def test_metrics_table_sorts_by_method_in_first_seen_order_then_budget(rows):
    table = metrics_table(rows, title="bench")
    assert table.title == "bench"
    assert table.row_count == len(rows) == 9
    assert [" ".join(str(c.header).split()) for c in table.columns] == [
        "method", "budget", "n", "accuracy [95% CI]", "coverage pass@budget",
        "generated tokens /problem", "PRM tokens /problem", "FLOPs /problem",
        "wall time s/problem", "errors"]
    cells = {key: list(column.cells) for (key, _, _), column in zip(COLUMNS, table.columns)}
    assert cells["method"] == ["particle_filtering"] * 3 + ["best_of_n"] * 3 + ["beam_search"] * 3
    assert cells["budget"] == ["1", "4", "16"] * 3
    assert cells["accuracy"][0] == format_accuracy(sort_rows(rows)[0])
    assert cells["flops"][-3:] == ["—"] * 3 and cells["flops"][0] == "1.2e9"
    assert cells["coverage"][3] == "—"
    assert cells["errors"][2] == "[red]1[/red]" and cells["errors"][0] == "0"


def test_print_table_shows_every_row_and_method_names_literally(rows):
    rows = rows + [MetricRow("[bold]odd[/bold]", 2, 10, 0.5, 0.2, 0.8, 0.9, 10.0, 0.0, None, 1.0)]
    console = Console(file=io.StringIO(), width=200, record=True)
    print_table(rows, console=console)
    text = console.export_text()
    assert "[bold]odd[/bold]" in text
    assert text.count("particle_filtering") == 3
    assert format_accuracy(rows[0]) in text


# --- plots -------------------------------------------------------------------------------


def test_method_colors_are_distinct_and_in_first_seen_order(rows):
    colors = method_colors(rows)
    assert list(colors) == ["particle_filtering", "best_of_n", "beam_search"]
    assert list(colors.values()) == ["#1f77b4", "#ff7f0e", "#2ca02c"]  # tab10
    many = [MetricRow(f"m{i}", 1, 1, 0.5, 0.4, 0.6, None, 1.0, 0.0, None, 1.0) for i in range(12)]
    assert len(set(method_colors(many).values())) == 12


def test_plot_all_writes_pngs_showing_every_method_color(rows, tmp_path):
    paths = plot_all(rows, tmp_path / "plots")
    assert paths == {"budget": tmp_path / "plots" / "accuracy_vs_budget.png",
                     "tokens": tmp_path / "plots" / "accuracy_vs_tokens.png",
                     "frontier": tmp_path / "plots" / "compute_frontier.png"}
    for key, path in paths.items():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
        assert imread(path).shape[:2] == (480, 800)
        # the frontier plot shows each (method, budget) as one marker, not a line
        assert missing_colors(path, method_colors(rows), 40 if key == "frontier" else 200) == []
        assert color_pixel_count(path, "#d62728") == 0  # a fourth tab10 color, not a method


def test_the_frontier_is_the_best_accuracy_at_each_cost():
    row = lambda m, b, acc, gen, prm: MetricRow(m, b, 100, acc, acc - 0.05, acc + 0.05, None, gen, prm, None, 1.0)  # noqa: E731
    rows = [row("a", 1, 0.40, 50, 0), row("a", 4, 0.60, 200, 0), row("b", 2, 0.55, 60, 40),   # b@2 costs 100
            row("b", 8, 0.58, 300, 100), row("c", 1, 0.40, 40, 0), row("c", 16, 0.80, 900, 100)]
    front = frontier(rows)
    assert [(r.method, r.budget) for r in front] == [("c", 1), ("b", 2), ("a", 4), ("c", 16)]
    # nothing off the frontier beats a frontier row that costs no more
    for r in rows:
        reach = max(f.accuracy for f in front if token_cost(f) <= token_cost(r))
        assert r.accuracy <= reach


def test_plot_accuracy_rejects_bad_input(rows, tmp_path):
    with pytest.raises(ValueError, match="x must be"):
        plot_accuracy(rows, tmp_path / "p.png", x="flops")
    with pytest.raises(ValueError, match="no rows"):
        plot_accuracy([], tmp_path / "p.png")


def test_plots_never_import_pyplot(tmp_path):
    code = ("import sys; from tests_rows import rows; from itscale.bench.plots import plot_all;"
            f"plot_all(rows, {str(tmp_path)!r}); print('matplotlib.pyplot' in sys.modules)")
    (tmp_path / "tests_rows.py").write_text(
        "from itscale.bench.metrics import MetricRow\n"
        "rows = [MetricRow('a', b, 10, 0.5, 0.4, 0.6, 0.7, 100.0 * b, 0.0, None, 1.0) for b in (1, 2)]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- report ------------------------------------------------------------------------------


def write_sample_report(rows, folder: Path, **kwargs) -> tuple[Path, str]:
    kwargs.setdefault("config", {"methods": sorted({r.method for r in rows}), "seeds": [0, 1]})
    kwargs.setdefault("environment", {"python": "3.11", "packages": {"numpy": "2.0"}})
    if "plots" not in kwargs:
        kwargs["plots"] = plot_all(rows, folder / "plots")
    path = write_report(rows, folder / "out" / "report.html", **kwargs)
    return path, path.read_text(encoding="utf-8")


def test_report_is_self_contained_with_decodable_plots(rows, tmp_path):
    path, document = write_sample_report(rows, tmp_path)
    assert path == tmp_path / "out" / "report.html"
    assert "http://" not in document and "https://" not in document
    parsed = parse(document)
    assert not [tag for tag, _ in parsed.elements if tag in ("script", "link", "iframe", "object")]
    for tag, attrs in parsed.elements:
        for name in ("src", "href"):
            assert attrs.get(name) is None or attrs[name].startswith("data:"), (tag, attrs)
    for key in ("budget", "tokens"):
        _, img = parsed.element(f"plot-{key}")
        assert img["alt"]
        assert image_bytes(img["src"]) == (tmp_path / "plots" / f"accuracy_vs_{key}.png").read_bytes()


def test_report_metrics_table_has_one_row_per_metric_row(rows, tmp_path):
    _, document = write_sample_report(rows, tmp_path)
    parsed = parse(document)
    assert parsed.element("metrics")[0] == "table"
    assert [(a["data-method"], a["data-budget"]) for a, _ in parsed.metric_rows] == [
        (r.method, str(r.budget)) for r in sort_rows(rows)]
    assert [cells for _, cells in parsed.metric_rows] == [
        [format_row(r)[key] for key, _, _ in COLUMNS] for r in sort_rows(rows)]
    assert "<thead>" in document


def test_report_summary_costs_config_environment_and_notes(rows, tmp_path):
    config = {"policy": {"model": "tiny"}, "budgets": [1, 4, 16]}
    environment = environment_info()
    _, document = write_sample_report(rows, tmp_path, config=config, environment=environment,
                                      notes=["first note"], title="My bench")
    parsed = parse(document)
    assert json.loads(parsed.config_text) == config
    assert "<title>My bench</title>" in document and "first note" in document
    assert "3 methods: particle_filtering, best_of_n, beam_search" in document
    assert "budgets 1, 4, 16" in document
    assert f"{cost_totals(rows)['generated_tokens']:,.0f}" in document
    assert parsed.element("environment") and environment["platform"] in document
    assert f"packages.numpy</th><td>{environment['packages']['numpy']}" in document


def test_report_escapes_hostile_strings(tmp_path):
    rows = synthetic_rows(methods=(HOSTILE, 'say "hi" & <b>bye</b>'))
    config = {"model": "</pre><script>alert(2)</script>", HOSTILE: [HOSTILE]}
    _, document = write_sample_report(rows, tmp_path, config=config, title=HOSTILE,
                                      environment={HOSTILE: HOSTILE}, notes=[HOSTILE])
    assert "<script" not in document and "<b>bye" not in document
    parsed = parse(document)
    assert not [tag for tag, _ in parsed.elements if tag in ("script", "b")]
    assert {a["data-method"] for a, _ in parsed.metric_rows} == {HOSTILE, 'say "hi" & <b>bye</b>'}
    assert json.loads(parsed.config_text) == config


def test_report_draws_its_own_plots_unless_told_not_to(rows, tmp_path):
    _, document = write_sample_report(rows, tmp_path, plots=None)
    parsed = parse(document)
    for key in ("budget", "tokens"):
        assert image_bytes(parsed.element(f"plot-{key}")[1]["src"]).startswith(PNG_SIGNATURE)
    _, document = write_sample_report(rows, tmp_path, plots={})
    assert "<img" not in document


def test_report_of_no_rows(tmp_path):
    _, document = write_sample_report([], tmp_path, plots=None)
    assert "No results." in document and parse(document).metric_rows == []


def test_cost_totals_and_environment_info(rows):
    totals = cost_totals(rows)
    assert totals["generated_tokens"] == pytest.approx(sum(r.generated_tokens * r.n for r in rows))
    assert totals["flops"] == pytest.approx(sum(r.flops * r.n for r in rows if r.flops is not None))
    assert totals["flops_missing"] == 3 and totals["errors"] == 3
    assert cost_totals([])["flops"] is None
    environment = environment_info()
    assert {"python", "platform", "cpu_count", "packages"} <= set(environment)
    assert {"itscale", "numpy", "matplotlib"} <= set(environment["packages"])
