"""The chart's values table, generated from the `# --` comments in values.yaml (one source of truth:
the comment next to the value). `python -m tools.chart_values --write` rewrites the table between the
markers in charts/finetune-operator/README.md; tests/chart checks it is current and complete."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "finetune-operator"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):")


@dataclass(frozen=True)
class Documented:
    path: str  # dotted, e.g. "metrics.serviceMonitor.enabled"
    description: str


def documented_values(text: str) -> list[Documented]:
    """Each key preceded by a `# --` comment (continued by plain `#` lines), in file order."""
    found: list[Documented] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending is not None:
            pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if match is None:
            pending = None if not stripped.startswith("#") else pending
            continue
        indent = len(match["indent"])
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match["key"])]
        if pending is not None:
            found.append(Documented(".".join(k for _, k in stack), " ".join(pending)))
        pending = None
    return found


def leaf_paths(values: Any, prefix: str = "") -> list[str]:
    """Every scalar or empty collection in the values: what a user can set."""
    if isinstance(values, dict) and values:
        return [p for k, v in values.items() for p in leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def lookup(values: Any, path: str) -> Any:
    for part in path.split("."):
        values = values[part]
    return values


def _type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), "object"
    )


def table(chart: Path = CHART) -> str:
    text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for doc in documented_values(text):
        value = lookup(values, doc.path)
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        rows.append(f"| `{doc.path}` | {_type(value)} | `{default}` | {doc.description} |")
    return "\n".join(rows)


def undocumented(chart: Path = CHART) -> list[str]:
    """Values a user can set that no `# --` comment covers (at the value or one of its parents)."""
    text = (chart / "values.yaml").read_text()
    covered = {d.path for d in documented_values(text)}
    return [
        leaf
        for leaf in leaf_paths(yaml.safe_load(text))
        if not any(leaf == c or leaf.startswith(c + ".") for c in covered)
    ]


def readme_with_table(readme: str, rendered: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{rendered}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the table in the chart's README")
    args = parser.parse_args(argv)
    rendered = table()
    if not args.write:
        print(rendered)
        return 0
    readme = CHART / "README.md"
    readme.write_text(readme_with_table(readme.read_text(), rendered))
    missing = undocumented()
    if missing:
        print("values without a `# --` comment: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
