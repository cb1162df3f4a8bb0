"""The code each DVC stage runs, from its imports, and dvc.yaml's code deps kept equal to it.

    python tools/stage_deps.py            # print each stage's code deps
    python tools/stage_deps.py --check    # exit 1 listing, per stage, modules dvc.yaml misses
                                          # or lists without the stage importing them
    python tools/stage_deps.py --write    # rewrite the code deps (under src/) in dvc.yaml

A stage runs `pricefuse <stage>`: `pricefuse.cli` plus `pricefuse.stages.<stage>`, and everything
inside `src/pricefuse` those import. The closure is found statically (AST, nothing is imported):
module-level and function-level imports, `from pkg import submodule`, relative imports, the
`__init__` of every package on the way, and string constants naming a module
(`"pricefuse.models.gbdt:GbdtPredictor"`, which the member registry loads with importlib).
f-strings are not followed: cli's `f"pricefuse.stages.{stage}"` would make every stage depend on
every other one; the stage module is a root instead.

A package directory whose modules are all in a closure becomes one dep
(`src/pricefuse/data/images`). `--write` replaces only the deps under `src/`; the data deps
(`${...}`), their comments and everything else in dvc.yaml stay as they are.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
SRC = "src"
PACKAGE = "pricefuse"
ENTRY = "pricefuse.cli"
# A stage runs cli's import-time code and the command `_make_stage_command` builds, not the other
# subcommands' lazy imports (demo data, reports, ...): those would make every stage depend on them.
ENTRY_FUNCTIONS = {ENTRY: ("_make_stage_command",)}
STAGES_PACKAGE = "pricefuse.stages"
CODE_PREFIX = f"{SRC}/"
WRITE_HINT = "python tools/stage_deps.py --write"


def discover(src: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `src`: dotted name -> file (a package -> its __init__)."""
    modules: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _parents(name: str) -> list[str]:
    """The packages Python imports before the module `name`: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _relative_base(module: str, is_package: bool, level: int, target: str | None) -> str | None:
    """The absolute name `from <level dots><target> import ...` refers to inside `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        if level - 1 > len(package):
            return None  # beyond the top-level package: Python raises, nothing to follow
        package = package[: len(package) - (level - 1)]
    return ".".join([*package, target] if target else package) or None


def _executed_nodes(tree: ast.Module, functions: Collection[str] | None) -> Iterator[ast.AST]:
    """Every node of `tree`; with `functions` given, only what runs when the module is imported
    (function bodies skipped, their decorators and defaults kept) plus the bodies of the named
    functions, wherever they are defined."""
    stack: list[tuple[ast.AST, bool]] = [(tree, functions is None)]
    while stack:
        node, everything = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if everything or not isinstance(child, _FUNCTIONS):
                stack.append((child, everything))
            elif getattr(child, "name", None) in functions:  # type: ignore[operator]
                stack.append((child, True))
            else:
                args = child.args
                header = [*getattr(child, "decorator_list", []), *args.defaults, *args.kw_defaults]
                stack.extend((part, False) for part in header if part is not None)


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@functools.lru_cache(maxsize=1024)
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    """The module's AST (cached: every stage's closure reads the same files; `mtime_ns` keys it
    to the file's version)."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _defined_functions(tree: ast.Module) -> set[str]:
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def direct_imports(
    module: str,
    path: Path,
    modules: Mapping[str, Path],
    functions: Collection[str] | None = None,
) -> set[str]:
    """The modules of `modules` that `module` (its source at `path`) imports or names.

    `functions`: follow only what runs on import plus these functions (default: everything,
    function-level imports included).
    """
    tree = _parse(path, path.stat().st_mtime_ns)
    if functions is not None and (absent := set(functions) - _defined_functions(tree)):
        raise ValueError(f"{module} defines no function {', '.join(sorted(absent))}")
    is_package = path.name == "__init__.py"
    nodes = list(_executed_nodes(tree, functions))
    in_fstring = {
        id(part) for node in nodes if isinstance(node, ast.JoinedStr) for part in node.values
    }
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update([*_parents(alias.name), alias.name])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _relative_base(module, is_package, node.level, node.module)
            else:
                base = node.module
            if not base:
                continue
            found.update([*_parents(base), base])
            # `from pkg import name`: a submodule when pkg has one of that name.
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in in_fstring
        ):
            name = node.value.split(":", 1)[0]  # "pkg.module" or "pkg.module:attribute"
            if name in modules:
                found.update([*_parents(name), name])
    return {name for name in found if name in modules}


def closure(
    roots: Iterable[str],
    modules: Mapping[str, Path],
    entry_functions: Mapping[str, Collection[str]] | None = None,
) -> set[str]:
    """`roots`, their packages, and everything they import, transitively, within `modules`.

    `entry_functions`: modules of which only the import-time code and the named functions
    count (see `direct_imports`)."""
    entry_functions = entry_functions or {}
    todo = [name for root in roots for name in (*_parents(root), root) if name in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found = direct_imports(name, modules[name], modules, entry_functions.get(name))
        todo.extend(found - seen)
    return seen


def collapse(files: Iterable[Path], all_files: Iterable[Path]) -> list[Path]:
    """The fewest paths covering `files`: a package directory stands for its files when every
    one of `all_files` below it (at any depth) is in `files`; the topmost such directory wins."""
    chosen = set(files)
    below: dict[Path, set[Path]] = {}
    for path in all_files:
        for parent in path.parents:
            below.setdefault(parent, set()).add(path)
    full = {d for d, inside in below.items() if (d / "__init__.py") in inside and inside <= chosen}
    out = set()
    for path in chosen:
        tops = [d for d in path.parents if d in full]
        out.add(tops[-1] if tops else path)  # parents go upwards: the last is the topmost
    return sorted(out)


def stage_module(stage: str) -> str:
    return f"{STAGES_PACKAGE}.{stage}"


def stage_files(stage: str, root: Path = ROOT) -> list[str]:
    """Every file `pricefuse <stage>` runs (its import closure), repo-relative posix paths."""
    modules = discover(root / SRC, PACKAGE)
    if stage_module(stage) not in modules:
        raise KeyError(f"no module {stage_module(stage)} under {root / SRC}")
    needed = closure([ENTRY, stage_module(stage)], modules, ENTRY_FUNCTIONS)
    return sorted(_relative(modules[name], root) for name in needed)


def stage_deps(stage: str, root: Path = ROOT) -> list[str]:
    """`stage_files`, with each package directory whose modules are all needed as one path."""
    files = [root / path for path in stage_files(stage, root)]
    every = discover(root / SRC, PACKAGE).values()
    return [_relative(path, root) for path in collapse(files, every)]


def _relative(path: Path, root: Path) -> str:
    return PurePosixPath(path.relative_to(root)).as_posix()


def covers(dep: str, path: str) -> bool:
    """A dep (file or directory, repo-relative) covers `path` when it is `path` or above it."""
    dep = dep.rstrip("/")
    return path == dep or path.startswith(f"{dep}/")


def missing(needed: Iterable[str], deps: Iterable[str]) -> list[str]:
    """The paths of `needed` that no dep of `deps` covers."""
    deps = list(deps)
    return sorted(path for path in needed if not any(covers(dep, path) for dep in deps))


# --- dvc.yaml ---------------------------------------------------------------------------------


def _round_trip():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def load_dvc(path: Path) -> dict:
    return _round_trip().load(path.read_text(encoding="utf-8"))


def code_stages(dvc: Mapping, root: Path = ROOT) -> list[str]:
    """dvc.yaml stages that run a pricefuse stage module, in file order."""
    modules = discover(root / SRC, PACKAGE)
    return [name for name in dvc.get("stages", {}) if stage_module(name) in modules]


def _dep_path(dep: object) -> str:
    return next(iter(dep)) if isinstance(dep, Mapping) else str(dep)


def is_code_dep(dep: object) -> bool:
    return _dep_path(dep).startswith(CODE_PREFIX)


def code_deps(dvc: Mapping, stage: str) -> list[str]:
    """The stage's deps under src/, as dvc.yaml lists them."""
    return [_dep_path(d) for d in dvc["stages"][stage].get("deps") or [] if is_code_dep(d)]


def extra(needed: Iterable[str], deps: Iterable[str], every: Iterable[str]) -> list[str]:
    """The files of `every` that some dep of `deps` covers but `needed` does not hold: an edit
    to one of them would re-run the stage for nothing."""
    needed = set(needed)
    deps = list(deps)
    return sorted(
        path for path in every if path not in needed and any(covers(d, path) for d in deps)
    )


def module_files(root: Path = ROOT) -> list[str]:
    """Every module file of the package, repo-relative posix paths."""
    return sorted(_relative(path, root) for path in discover(root / SRC, PACKAGE).values())


def check(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """Per stage with a problem: {"missing": needed files no dep covers, "extra": files a dep
    covers that the stage never imports, "stale": code deps that do not exist (dvc repro would
    fail on them)}."""
    dvc = load_dvc(root / "dvc.yaml")
    runs_module = set(code_stages(dvc, root))
    every = module_files(root)
    problems: dict[str, dict[str, list[str]]] = {}
    for stage in dvc.get("stages", {}):
        code = code_deps(dvc, stage)
        needed = stage_files(stage, root) if stage in runs_module else []
        found = {
            "missing": missing(needed, code) if stage in runs_module else [],
            "extra": extra(needed, code, every) if stage in runs_module else [],
            "stale": [d for d in code if not (root / d).exists()],
        }
        if any(found.values()):
            problems[stage] = found
    return problems


def rewrite(dvc: dict, root: Path = ROOT) -> list[str]:
    """Set each stage's code deps to `stage_deps` in `dvc` (a round-trip document); return the
    stages that changed. The other deps keep their order and comments; the code deps, sorted,
    take the place of the first old one (or come last)."""
    from ruamel.yaml.comments import CommentedSeq

    changed = []
    for stage in code_stages(dvc, root):
        spec = dvc["stages"][stage]
        new_code = stage_deps(stage, root)
        if code_deps(dvc, stage) == new_code:
            continue
        if spec.get("deps") is None:
            at = list(spec).index("cmd") + 1 if "cmd" in spec else len(spec)
            spec.insert(at, "deps", CommentedSeq())
        _replace_code_deps(spec["deps"], new_code)
        changed.append(stage)
    return changed


def _replace_code_deps(deps, new_code: list[str]) -> None:
    """Rebuild the CommentedSeq `deps` in place, each comment staying with its item.

    ruamel keys a sequence's comments by item index, so they are re-keyed. The old last item's
    comment also holds whatever precedes the next key (blank lines, comment lines); it stays at
    the end of the list.
    """
    items = list(deps)
    comments = {i: deps.ca.items[i] for i in range(len(items)) if i in deps.ca.items}
    tail = comments.pop(len(items) - 1, None)
    by_path = {_dep_path(d): comments.get(i) for i, d in enumerate(items) if is_code_dep(d)}
    entries = [(d, comments.get(i)) for i, d in enumerate(items) if not is_code_dep(d)]
    at = next((i for i, d in enumerate(items) if is_code_dep(d)), len(items))
    entries[at:at] = [(path, by_path.get(path)) for path in new_code]
    if tail is not None and entries:
        entries[-1] = (entries[-1][0], tail)
    deps.clear()
    deps.ca.items.clear()
    for i, (dep, comment) in enumerate(entries):
        deps.append(dep)
        if comment is not None:
            deps.ca.items[i] = comment


def write(root: Path = ROOT) -> list[str]:
    """`rewrite` root/dvc.yaml in place (untouched when nothing changed); the changed stages."""
    path = root / "dvc.yaml"
    yaml = _round_trip()
    dvc = yaml.load(path.read_text(encoding="utf-8"))
    changed = rewrite(dvc, root)
    if changed:
        with path.open("w", encoding="utf-8") as out:
            yaml.dump(dvc, out)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if dvc.yaml misses a module")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: this repo)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.write:
        changed = write(root)
        print(
            f"dvc.yaml: code deps rewritten for {', '.join(changed)}"
            if changed
            else "dvc.yaml: code deps already up to date"
        )
        return 0
    if args.check:
        problems = check(root)
        for stage, found in problems.items():
            for path in found["missing"]:
                print(f"{stage}: dvc.yaml misses {path}")
            for path in found["extra"]:
                print(f"{stage}: dvc.yaml re-runs it on edits to {path}, which it never imports")
            for path in found["stale"]:
                print(f"{stage}: dvc.yaml lists {path}, which does not exist")
        if problems:
            print(f"run `{WRITE_HINT}`", file=sys.stderr)
            return 1
        print("dvc.yaml: every stage's code deps are exactly its imports")
        return 0
    dvc = load_dvc(root / "dvc.yaml")
    for stage in code_stages(dvc, root):
        print(f"{stage}:")
        for path in stage_deps(stage, root):
            print(f"  - {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
