"""docs/results.md's generated tables: rendered from docs/results/*.json, and in step with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.results import table, write_results

from tools import results_tables
from tools.results_tables import RESULTS_DIR, RESULTS_MD, ResultsError, check, load, main, update


def _results(directory: Path, name: str = "bench", rows=None) -> Path:
    rows = [["a", 1.234, 1500], ["b", None, 7]] if rows is None else rows
    tables = [table("Speed", ["case", "seconds", "rows"], rows, notes="Lower is better.")]
    return write_results(
        name, tables, argv=["benchmarks/bench.py", "--results"], directory=directory
    )


def _doc(directory: Path, names: tuple[str, ...] = ("bench",)) -> Path:
    blocks = "\n".join(f"<!-- results:{n} -->\n<!-- /results:{n} -->\n" for n in names)
    doc = directory / "results.md"
    doc.write_text(f"# Results\n\nBy hand.\n\n{blocks}\nAlso by hand.\n", encoding="utf-8")
    return doc


def test_the_docs_are_in_step_with_the_results_files() -> None:
    problems = check(RESULTS_MD, RESULTS_DIR)
    assert not problems, "\n".join(problems)


def test_every_results_file_holds_only_aggregates() -> None:
    """Labels and figures only: a long string cell would be a row or text of the data."""
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = load(path)
        for t in data["tables"]:
            for row in t["rows"]:
                for value in row:
                    assert not isinstance(value, str) or len(value) <= 80, (path.name, value)


def test_write_results_records_where_the_figures_come_from(tmp_path: Path) -> None:
    path = _results(tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench"
    assert data["command"] == "python benchmarks/bench.py --results"
    assert len(data["commit"]) == 40 or data["commit"] == "unknown"
    assert isinstance(data["dirty"], bool)
    assert data["date"][:2] == "20" and "CPU cores" in data["machine"]
    assert data["tables"][0]["rows"] == [["a", 1.234, 1500], ["b", None, 7]]


def test_render_a_block_between_its_markers_and_leave_the_rest(tmp_path: Path) -> None:
    _results(tmp_path)
    doc = _doc(tmp_path)
    assert main(["--write", "--doc", str(doc), "--results-dir", str(tmp_path)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nBy hand.\n\n<!-- results:bench -->\n**Speed**")
    assert text.endswith("<!-- /results:bench -->\n\nAlso by hand.\n")
    assert "| case | seconds | rows |\n|---|---:|---:|\n| a | 1.23 | 1,500 |\n| b | – | 7 |" in text
    assert "Lower is better." in text
    assert "`python benchmarks/bench.py --results` at commit" in text
    assert check(doc, tmp_path) == []
    # Writing again changes nothing.
    assert main(["--write", "--doc", str(doc), "--results-dir", str(tmp_path)]) == 0
    assert doc.read_text() == text


def test_check_fails_when_a_figure_changed(tmp_path: Path) -> None:
    _results(tmp_path)
    doc = _doc(tmp_path)
    main(["--write", "--doc", str(doc), "--results-dir", str(tmp_path)])
    _results(tmp_path, rows=[["a", 9.0, 1500], ["b", None, 7]])
    problems = check(doc, tmp_path)
    assert problems and "stale in block(s) bench" in problems[0]
    assert main(["--check", "--doc", str(doc), "--results-dir", str(tmp_path)]) == 1


def test_check_fails_on_a_file_without_a_block_and_a_block_without_a_file(tmp_path: Path) -> None:
    _results(tmp_path, name="orphan")
    doc = _doc(tmp_path, names=("missing",))
    problems = check(doc, tmp_path)
    assert any("results:missing has no docs/results/missing.json" in p for p in problems)
    assert any("orphan.json has no block" in p for p in problems)


def test_formats_and_malformed_files(tmp_path: Path) -> None:
    t = table("T", ["x", "y"], [[0.5, 1234.4]], formats=[".0%", ",.0f"])
    lines = results_tables.render_table(t)
    assert "| 50% | 1,234 |" in lines
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        table("T", ["x", "y"], [[1]])
    with pytest.raises(ValueError, match="over 80 characters"):
        table("T", ["x"], [["word " * 20]])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "b", "tables": []}))
    with pytest.raises(ResultsError, match="missing command, commit, date, machine"):
        load(bad)


def test_update_keeps_text_outside_blocks(tmp_path: Path) -> None:
    _results(tmp_path)
    results = results_tables.load_all(tmp_path)
    text = "intro\n<!-- results:bench -->\nold\n<!-- /results:bench -->\noutro\n"
    new, problems = update(text, results)
    assert problems == []
    assert new.startswith("intro\n<!-- results:bench -->\n**Speed**") and new.endswith("outro\n")
    assert "old" not in new
