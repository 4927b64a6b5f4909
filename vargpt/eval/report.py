"""Result files of one evaluation: a JSON document with everything and a Markdown table for people."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Scalar = int | float | str | bool | None


@dataclass
class Report:
    """One benchmark's outcome.

    ``metrics``: the headline numbers (flat, shown in the table); ``settings``: what the numbers depend on (n,
    resolution, thresholds, model folders, protocol deviations); ``details``: everything else (per task, per split).
    """

    benchmark: str
    metrics: dict[str, Scalar]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "metrics": self.metrics,
            "settings": self.settings,
            "details": self.details,
        }


def format_value(value: Any) -> str:
    """A number as a table cell: floats with 4 significant decimals, everything else as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table of ``rows`` restricted to ``columns`` (missing cells are left empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_value(row[column]) if column in row else "" for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: Report) -> str:
    """The Markdown page of a report: the metrics table, then the settings table."""
    metric_rows = [{"metric": name, "value": value} for name, value in report.metrics.items()]
    setting_rows = [
        {"setting": name, "value": value if isinstance(value, Scalar) else json.dumps(value, sort_keys=True)}
        for name, value in report.settings.items()
    ]
    parts = [f"# {report.benchmark}", "", markdown_table(metric_rows, ["metric", "value"])]
    if setting_rows:
        parts += ["", "## Settings", "", markdown_table(setting_rows, ["setting", "value"])]
    return "\n".join(parts) + "\n"


def write_report(report: Report, out_dir: str | os.PathLike, stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (stem defaults to the benchmark name) and return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or report.benchmark
    json_path, markdown_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    markdown_path.write_text(report_markdown(report), encoding="utf-8")
    return json_path, markdown_path
