"""dvc.yaml's code deps cover every module each stage imports (tools/stage_deps.py), and the
import-closure analysis itself, on a small package written to a temp dir."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from pricefuse.stages import STAGES
from tools import stage_deps
from tools.stage_deps import closure, collapse, discover, missing

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_imports(stage: str, dvc_stages: dict) -> None:
    assert stage in dvc_stages, f"`pricefuse {stage}` has no dvc.yaml stage"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in dvc_stages[stage].get("deps", [])]
    needed = stage_deps.stage_files(stage, REPO)
    assert f"src/pricefuse/stages/{stage}.py" in needed and "src/pricefuse/cli.py" in needed
    absent = missing(needed, deps)
    assert not absent, (
        f"dvc.yaml stage {stage!r} misses {', '.join(absent)}: a change there would not re-run "
        f"it. Run `{stage_deps.WRITE_HINT}`."
    )
    stale = [d for d in deps if d.startswith("src/") and not (REPO / d).exists()]
    assert not stale, f"dvc.yaml stage {stage!r} lists {stale}, which do not exist. Run " + (
        f"`{stage_deps.WRITE_HINT}`."
    )


@pytest.fixture(scope="module")
def closures() -> dict[str, set[str]]:
    return {stage: set(stage_deps.stage_files(stage, REPO)) for stage in STAGES}


@pytest.mark.parametrize("module", stage_deps.module_files(REPO))
def test_an_edit_to_a_module_reruns_exactly_the_stages_that_import_it(
    module: str, dvc_stages: dict, closures: dict[str, set[str]]
) -> None:
    """For every module: the stages DVC would re-run after an edit to it (a code dep covers it)
    are exactly the stages whose import closure holds it."""
    rerun = set()
    for stage in STAGES:
        deps = [d if isinstance(d, str) else next(iter(d)) for d in dvc_stages[stage]["deps"]]
        if any(stage_deps.covers(dep, module) for dep in deps if dep.startswith("src/")):
            rerun.add(stage)
    importing = {stage for stage in STAGES if module in closures[stage]}
    assert rerun == importing, (
        f"an edit to {module} re-runs {sorted(rerun)} but only {sorted(importing)} import it: "
        f"run `{stage_deps.WRITE_HINT}`"
    )


def test_booster_code_is_in_no_stage_upstream_of_the_boosters(
    closures: dict[str, set[str]],
) -> None:
    """The case that mattered: tuning a booster must never re-run the embedding (hours on the
    full data) or the other members' training."""
    boosters = "src/pricefuse/models/gbdt/boosters.py"
    for stage in ("fetch_images", "preprocess", "embed", "neighbours", "train_linear"):
        assert boosters not in closures[stage], stage
    for stage in ("train_fusion", "train_text"):
        assert boosters not in closures[stage], stage
    assert boosters in closures["train_gbdt"] and boosters in closures["ensemble"]


def test_check_names_a_dep_the_stage_never_imports(tmp_path: Path, capsys) -> None:
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text()
    marker = "      - src/pricefuse/stages/embed.py\n"
    assert marker in text
    (tmp_path / "dvc.yaml").write_text(
        text.replace(marker, marker + "      - src/pricefuse/models/gbdt/boosters.py\n", 1)
    )
    assert stage_deps.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "embed: dvc.yaml re-runs it on edits to src/pricefuse/models/gbdt/boosters.py" in out


def test_write_restores_code_deps_and_keeps_everything_else(tmp_path: Path) -> None:
    (tmp_path / "src").symlink_to(REPO / "src", target_is_directory=True)
    original = (REPO / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(original)
    stage_deps.write(tmp_path)
    generated = (tmp_path / "dvc.yaml").read_text()
    # Scramble the code deps: drop some, add one that does not exist, reorder.
    lines = generated.splitlines(keepends=True)
    code = [i for i, line in enumerate(lines) if line.startswith("      - src/")]
    lines[code[0]] = "      - src/pricefuse/gone.py\n"
    del lines[code[1] : code[4]]
    (tmp_path / "dvc.yaml").write_text("".join(lines))
    assert stage_deps.check(tmp_path)
    assert stage_deps.write(tmp_path)
    assert (tmp_path / "dvc.yaml").read_text() == generated
    assert not stage_deps.check(tmp_path)

    def not_code(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("      - src/")]

    assert not_code(generated) == not_code(original)  # comments, data deps, order, layout


# --- the closure, on a package made for it ----------------------------------------------------

FAKE = {
    "__init__.py": "",
    "cli.py": """
        import importlib
        from fake import config

        def _make_stage_command(stage):
            from fake import errors
            return importlib.import_module(f"fake.stages.{stage}")

        def other_command():
            from fake import reports
        """,
    "config.py": "",
    "errors.py": "",
    "reports.py": "",
    "unused.py": "import fake.config",
    "stages/__init__.py": "",
    "stages/one.py": """
        from fake.data import parse
        from fake.util import helper

        def run(params):
            from fake.models import heavy  # lazy
            return heavy

        REGISTRY = {"boost": "fake.models.boost:BoostPredictor", "other": "fake.nope:Nothing"}
        """,
    "stages/two.py": "",
    "data/__init__.py": "",
    "data/parse.py": "from . import units\nfrom .units import UNITS\n",
    "data/units.py": "from ..util import helper\nUNITS = 1\n",
    "util/__init__.py": "",
    "util/helper.py": "",
    "models/__init__.py": "",
    "models/heavy.py": "",
    "models/boost.py": "",
    "models/unrelated.py": "",
    "deep/__init__.py": "",
    "deep/inner/__init__.py": "",
    "deep/inner/leaf.py": "",
}


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, Path]:
    for name, source in FAKE.items():
        path = tmp_path / "src" / "fake" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return discover(tmp_path / "src", "fake")


def test_discover_names_modules_and_packages(fake: dict[str, Path]) -> None:
    assert fake["fake.data"].name == "__init__.py"
    assert fake["fake.data.parse"].name == "parse.py"
    assert "fake.deep.inner.leaf" in fake


def test_lazy_relative_submodule_and_string_imports_are_followed(fake: dict[str, Path]) -> None:
    got = closure(["fake.stages.one"], fake)
    assert "fake.models.heavy" in got  # imported inside a function
    assert "fake.data.parse" in got and "fake.util.helper" in got  # `from pkg import module`
    assert "fake.data.units" in got  # `from . import units`, relative
    assert {"fake.util", "fake.util.helper"} <= got  # `from ..util import helper` in data/units
    assert "fake.models.boost" in got  # "fake.models.boost:BoostPredictor"
    assert {"fake", "fake.stages", "fake.data", "fake.models"} <= got  # package __init__ files
    assert "fake.models.unrelated" not in got and "fake.unused" not in got
    assert "fake.stages.two" not in got
    assert not any(name.startswith("fake.nope") for name in got)


def test_package_inits_of_a_deep_import_are_included(fake: dict[str, Path]) -> None:
    fake["fake.reports"].write_text("import fake.deep.inner.leaf\n")
    got = closure(["fake.reports"], fake)
    assert {"fake", "fake.deep", "fake.deep.inner", "fake.deep.inner.leaf"} <= got


def test_entry_module_follows_only_import_time_code_and_the_named_functions(
    fake: dict[str, Path],
) -> None:
    everything = closure(["fake.cli"], fake)
    assert {"fake.config", "fake.errors", "fake.reports"} <= everything
    entry = closure(["fake.cli"], fake, {"fake.cli": ("_make_stage_command",)})
    assert {"fake.config", "fake.errors"} <= entry
    assert "fake.reports" not in entry  # another command's lazy import
    assert not any(name.startswith("fake.stages.") for name in entry)  # the f-string
    with pytest.raises(ValueError, match="no function renamed"):
        closure(["fake.cli"], fake, {"fake.cli": ("renamed",)})


def test_collapse_takes_a_directory_only_when_all_of_it_is_needed(fake: dict[str, Path]) -> None:
    every = list(fake.values())
    models = [fake[n] for n in ("fake.models", "fake.models.heavy", "fake.models.boost")]
    got = collapse([*models, fake["fake.config"]], every)
    assert got == sorted([fake["fake.config"], *models])  # models/unrelated.py is not needed
    deep = [fake[n] for n in fake if n.startswith("fake.deep")]
    got = collapse([*models, fake["fake.models.unrelated"], *deep], every)
    assert got == sorted([fake["fake.models"].parent, fake["fake.deep"].parent])


def test_a_dep_directory_covers_the_modules_below_it() -> None:
    needed = ["src/p/a.py", "src/p/sub/b.py", "src/p/subway.py"]
    assert missing(needed, ["src/p/sub", "src/p/a.py"]) == ["src/p/subway.py"]
    assert missing(needed, ["src/p"]) == []


def test_check_exits_nonzero_and_names_the_stage(tmp_path: Path, capsys) -> None:
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/pricefuse/core/layout.py\n", ""))
    assert stage_deps.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "submit: dvc.yaml misses src/pricefuse/core/layout.py" in out.out
    assert stage_deps.WRITE_HINT in out.err
