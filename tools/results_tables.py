"""Render the benchmarks' results (docs/results/*.json) into docs/results.md.

    python tools/results_tables.py            # print what would change (nothing written)
    python tools/results_tables.py --write    # rewrite the generated blocks of docs/results.md
    python tools/results_tables.py --check    # exit 1 when docs/results.md is not in step

Each JSON file is one benchmark run, written by `benchmarks/results.py` (`--results` on a
benchmark): {"benchmark", "command", "commit", "dirty", "date", "machine", "tables": [{"title",
"columns", "rows", "notes", "formats"?}]}. docs/results.md holds, for each file NAME.json, one
block between

    <!-- results:NAME -->
    <!-- /results:NAME -->

which this tool owns: the tables, their notes, and where the figures come from (command, commit,
date, machine). Everything outside the blocks is written by hand. --check fails on a block whose
content differs from its file, a file without a block, a block without a file, and a file that
breaks the format; tests/unit/test_results_tables.py runs it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "docs" / "results.md"
REQUIRED = ("benchmark", "command", "commit", "date", "machine", "tables")
BLOCK = re.compile(
    r"(?P<open><!-- results:(?P<name>[A-Za-z0-9_.-]+) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /results:(?P=name) -->)",
    re.DOTALL,
)


class ResultsError(ValueError):
    """A results file or docs/results.md that does not follow the format."""


def load(path: Path) -> dict[str, Any]:
    """One results file, checked against the format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path.name}: not JSON ({exc})") from None
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ResultsError(f"{path.name}: missing {', '.join(missing)}")
    if not data["tables"]:
        raise ResultsError(f"{path.name}: no tables")
    for t, table in enumerate(data["tables"]):
        for key in ("title", "columns", "rows"):
            if key not in table:
                raise ResultsError(f"{path.name}: table {t} has no {key}")
        width = len(table["columns"])
        for r, row in enumerate(table["rows"]):
            if len(row) != width:
                raise ResultsError(
                    f"{path.name}: table {t} row {r} has {len(row)} cells for {width} columns"
                )
        formats = table.get("formats")
        if formats is not None and len(formats) != width:
            raise ResultsError(f"{path.name}: table {t} has {len(formats)} formats for {width}")
    return data


def cell(value: Any, spec: str | None) -> str:
    """A cell as markdown: None as a dash, numbers by `spec` (default: ints with thousands
    separators, floats with 2 decimals), text as written (pipes escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        if spec:
            return format(value, spec)
        return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: dict[str, Any]) -> list[str]:
    columns = table["columns"]
    formats = table.get("formats") or [None] * len(columns)
    rows = table["rows"]

    def numeric(i: int) -> bool:
        values = [row[i] for row in rows if row[i] is not None]
        return bool(values) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )

    lines = [f"**{table['title']}**", ""]
    lines.append("| " + " | ".join(cell(c, None) for c in columns) + " |")
    lines.append("|" + "|".join("---:" if numeric(i) else "---" for i in range(len(columns))) + "|")
    for row in rows:
        cells = (cell(v, formats[i]) for i, v in enumerate(row))
        lines.append("| " + " | ".join(cells) + " |")
    if table.get("notes"):
        lines += ["", table["notes"].strip()]
    return lines


def render(name: str, data: dict[str, Any]) -> str:
    """The body of block NAME: every table, then where its figures come from."""
    lines: list[str] = []
    for table in data["tables"]:
        lines += [*render_table(table), ""]
    commit = str(data["commit"])[:10]
    if data.get("dirty"):
        commit += " plus uncommitted changes"
    lines.append(
        f"<sub>Generated from `docs/results/{name}.json`: `{data['command']}` at commit "
        f"`{commit}`, {data['date']}; {data['machine']}.</sub>"
    )
    return "\n".join(lines) + "\n"


def update(text: str, results: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """`text` with every block re-rendered from `results` (name -> data); and the problems: a
    block whose file is missing, a file with no block."""
    problems: list[str] = []
    seen: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name in seen:
            problems.append(f"block results:{name} appears twice")
        seen.add(name)
        if name not in results:
            problems.append(f"block results:{name} has no docs/results/{name}.json")
            return match.group(0)
        return match["open"] + render(name, results[name]) + match["close"]

    out = BLOCK.sub(replace, text)
    for name in sorted(set(results) - seen):
        problems.append(
            f"docs/results/{name}.json has no block in docs/results.md: add "
            f"'<!-- results:{name} -->' and '<!-- /results:{name} -->' where it belongs"
        )
    return out, problems


def load_all(directory: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    return {path.stem: load(path) for path in sorted(directory.glob("*.json"))}


def check(doc: Path = RESULTS_MD, directory: Path = RESULTS_DIR) -> list[str]:
    """What is out of step between `doc` and the files in `directory` (empty: in step)."""
    try:
        results = load_all(directory)
    except ResultsError as exc:
        return [str(exc)]
    text = doc.read_text(encoding="utf-8")
    new, problems = update(text, results)
    if new != text:
        stale = [
            m["name"]
            for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new), strict=True)
            if m.group(0) != n.group(0)
        ]
        problems.append(
            f"{doc.name} is stale in block(s) {', '.join(stale)}: run "
            "`python tools/results_tables.py --write`"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite docs/results.md's blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 unless in step")
    parser.add_argument("--doc", type=Path, default=RESULTS_MD)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.doc, args.results_dir)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    try:
        results = load_all(args.results_dir)
    except ResultsError as exc:
        print(exc, file=sys.stderr)
        return 1
    text = args.doc.read_text(encoding="utf-8")
    new, problems = update(text, results)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.write:
        if new != text:
            args.doc.write_text(new, encoding="utf-8")
            print(f"wrote {args.doc}")
    else:
        diff = difflib.unified_diff(
            text.splitlines(keepends=True), new.splitlines(keepends=True), "before", "after"
        )
        sys.stdout.writelines(diff)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
