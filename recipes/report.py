"""Recipe reports: a JSON-serialisable dict with a ``rows`` table, written as report.json + report.md.

A report looks like ``{"recipe": "mnist", "columns": [...], "rows": [{...}, ...], "config": {...},
"notes": [...]}``, optionally with ``"labels": {column: header}`` for the table's headers; every
row holds measured values only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from surgery.checkpoint import atomic_write


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(columns: list[str], rows: list[dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``; ``labels`` renames headers.

    Example:
        >>> print(markdown_table(["a", "b"], [{"a": 1, "b": 0.5}], labels={"b": "B %"}))
        | a | B % |
        |---|---|
        | 1 | 0.5 |
    """
    labels = labels or {}
    lines = ["| " + " | ".join(labels.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """The report as markdown: a title, the rows table and the notes.

    Example:
        >>> print(markdown_report({"recipe": "x", "columns": ["a"], "rows": [{"a": 2}]}))
        ## recipe x
        <BLANKLINE>
        | a |
        |---|
        | 2 |
    """
    columns = report.get("columns") or sorted({k for row in report.get("rows", []) for k in row})
    parts = [f"## recipe {report.get('recipe', '?')}", "",
             markdown_table(columns, report.get("rows", []), report.get("labels"))]
    for note in report.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (atomically); return the JSON path.

    Example:
        >>> import tempfile
        >>> write_report(tempfile.mkdtemp(), {"recipe": "x", "rows": []}).name
        'report.json'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2, default=str).encode()))
    atomic_write(out / "report.md", lambda f: f.write((markdown_report(report) + "\n").encode()))
    return out / "report.json"
