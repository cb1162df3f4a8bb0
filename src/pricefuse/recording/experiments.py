"""One stage with other parameters, run as a DVC experiment (`pricefuse experiment`).

Why: a stage run outside DVC with `--set` overwrites a DVC output that no longer matches
dvc.lock; the next `dvc repro` restores the old one from the run cache and nothing says so.
`dvc exp run -S key=value <stage>` instead writes the values into params.yaml, runs the stage
(and any stale upstream stage), updates dvc.lock and commits the result to an experiment ref,
so DVC knows the new output and the downstream stages go stale until `dvc repro`.

The pure parts (override -> `-S` argument, dvc.yaml outputs and stage graph, parsing what
`dvc exp run`, `dvc status --json` and `dvc exp show --json` print, the report) are separate
functions with unit tests; `run_experiment` only calls the tools and glues them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pricefuse.core.config import (
    ConfigError,
    Params,
    flatten,
    ignored_overrides,
    load_params,
    load_raw,
    parse_override,
)
from pricefuse.core.lineage import read_meta
from pricefuse.recording.tracking import JOIN_STAGE_ENV

DVC_YAML = Path("dvc.yaml")
MLPROJECT = Path("MLproject")
PARAMS_YAML = Path("params.yaml")  # the file dvc.yaml reads and `dvc exp run -S` writes
MLFLOW_RUN_ENV = "MLFLOW_RUN_ID"
_RAN_RE = re.compile(r"^Ran experiment\(s\):\s*(\S+)", re.MULTILINE)
_STAGE_RE = re.compile(
    r"^(?:Running stage '(?P<ran>[^']+)'"
    r"|Stage '(?P<cached>[^']+)' is cached"
    r"|Stage '(?P<same>[^']+)' didn't change)",
    re.MULTILINE,
)
_VAR_RE = re.compile(r"\$\{\s*([^}\s]+)\s*\}")
# `--set fusion.lr={lr}` in an MLproject entry point's command: (dotted key, -P parameter).
_SET_PARAM_RE = re.compile(r"--set\s+([^\s=]+)=\{(\w+)\}")


# ---- overrides -> `dvc exp run -S` -------------------------------------------------------


def effective_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """(key, raw value) of each override that sets something; `key=` (MLproject's default for
    an unset -P) means "as in params.yaml" and is dropped, as `--set` does."""
    parsed = (parse_override(text) for text in overrides)
    return [item for item in parsed if item is not None]


def typed_value(params: Params, key: str) -> Any:
    """The validated value of one dotted key; a section is refused because `-S section=...`
    would replace the whole mapping in params.yaml."""
    node: Any = params
    for part in key.split("."):
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"override {key}: names a section, not one parameter")
    return node


def hydra_value(value: Any) -> str:
    """`value` written in Hydra's override grammar, which `dvc exp run -S` parses.

    Why not pass the user's text through: Hydra and YAML read some text differently (`1e-3`
    is a float to Hydra, a string to YAML; `a:b` or `it's` need quoting), so the validated,
    typed value is rendered instead and params.yaml gets exactly what the stage was checked with.
    Strings are always quoted; in Hydra's quoted strings a backslash is literal except before a
    quote, so only those backslashes are doubled.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, str):
        text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
        return f"'{text}'"
    raise ConfigError(f"cannot pass {value!r} to `dvc exp run -S`")


def set_param_args(overrides: Iterable[str], params: Params) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, from overrides already validated into `params`
    (every valid key is spelled out in params.yaml: the schema has no defaults)."""
    args: list[str] = []
    for key, _raw_value in effective_overrides(overrides):
        args += ["-S", f"{key}={hydra_value(typed_value(params, key))}"]
    return args


def validate(
    overrides: Sequence[str],
    params_path: Path = PARAMS_YAML,
    flags: Mapping[str, str] | None = None,
) -> list[str]:
    """Check the overrides against the params schema and that the configuration they make reads
    each of them (pricefuse.core.config.ignored_overrides: a key it ignores would run the stage
    for nothing), and return the `-S` arguments. ConfigError, before anything runs, on a typo, a
    wrong type or an ignored key; `flags` (key -> MLproject -P name) phrases the fix as -P."""
    params = load_params(params_path, overrides)
    args = set_param_args(overrides, params)
    ignored = ignored_overrides(
        params, [key for key, _value in effective_overrides(overrides)], flags
    )
    if ignored:
        raise ConfigError("\n".join(ignored))
    return args


# ---- MLproject: which -P sets which key ----------------------------------------------------


def mlproject_sets(command: str) -> dict[str, str]:
    """dotted key -> -P parameter for each `--set KEY={param}` of an entry point's command."""
    return dict(_SET_PARAM_RE.findall(command))


def entry_point_flags(stage: str, mlproject_path: Path = MLPROJECT) -> dict[str, str]:
    """`mlproject_sets` of the MLproject entry point named `stage` (empty without one)."""
    if not mlproject_path.is_file():
        return {}
    project = yaml.safe_load(mlproject_path.read_text()) or {}
    entry = (project.get("entry_points") or {}).get(stage) or {}
    return mlproject_sets(str(entry.get("command", "")))


# ---- dvc.yaml: outputs and the stage graph -----------------------------------------------


def _interpolate(text: str, raw: Mapping[str, Any]) -> str:
    """`${data.models_dir}/fusion` -> `data/models/fusion` (unknown variables stay as written)."""

    def lookup(match: re.Match[str]) -> str:
        node: Any = raw
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                return match.group(0)
            node = node[part]
        return str(node)

    return _VAR_RE.sub(lookup, text)


def _paths(entries: Iterable[Any], raw: Mapping[str, Any]) -> list[str]:
    """dvc.yaml deps/outs entries (plain strings or `{path: {options}}`) -> paths."""
    paths: list[str] = []
    for entry in entries or ():
        names = entry.keys() if isinstance(entry, Mapping) else [entry]
        paths += [_interpolate(str(name), raw).rstrip("/") for name in names]
    return paths


def stage_outputs(dvc_yaml: Mapping[str, Any], raw: Mapping[str, Any], stage: str) -> list[str]:
    """The stage's `outs` (what a run of it writes for the next stage); its metrics and plots
    files when it has no outs (e.g. ablation)."""
    spec = dvc_yaml.get("stages", {}).get(stage) or {}
    outs = _paths(spec.get("outs", ()), raw)
    return outs or _paths([*spec.get("metrics", ()), *spec.get("plots", ())], raw)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def downstream_stages(
    dvc_yaml: Mapping[str, Any], raw: Mapping[str, Any], stages: Iterable[str]
) -> list[str]:
    """Every stage that consumes (directly or not) an output of `stages`, in dvc.yaml order.

    Why: `dvc status` lists only stages whose own deps changed (the ensemble after a new fusion
    model), not those that will change once it re-runs (submit); `dvc repro` re-runs both.
    """
    specs: Mapping[str, Any] = dvc_yaml.get("stages", {})
    outs = {name: _paths(spec.get("outs", ()), raw) for name, spec in specs.items()}
    deps = {name: _paths(spec.get("deps", ()), raw) for name, spec in specs.items()}
    found: set[str] = set()
    frontier = [s for s in stages if s in specs]
    while frontier:
        current = frontier.pop()
        for name in specs:
            if name in found or name == current:
                continue
            if any(_inside(d, o) or _inside(o, d) for d in deps[name] for o in outs[current]):
                found.add(name)
                frontier.append(name)
    return [name for name in specs if name in found]


# ---- what DVC printed ----------------------------------------------------------------------


def experiment_name(output: str) -> str | None:
    """The name in `dvc exp run`'s `Ran experiment(s): <name>` line."""
    match = _RAN_RE.search(output)
    return match.group(1) if match else None


def stage_outcomes(output: str) -> dict[str, str]:
    """stage -> `ran` | `cached` (restored from DVC's run cache) | `unchanged`, from `dvc exp run`
    (or `dvc repro`) output: a stage that did not run left its output from an earlier run."""
    outcomes: dict[str, str] = {}
    for match in _STAGE_RE.finditer(output):
        kind = match.lastgroup or ""
        name = match.group(kind)
        outcomes[name] = {"ran": "ran", "cached": "cached", "same": "unchanged"}[kind]
    return outcomes


def stale_stages(status_json: str) -> list[str]:
    """Stage names in `dvc status --json` (`{}` when everything is up to date); a stage of a
    dvc.yaml elsewhere is keyed `path/dvc.yaml:name`."""
    data = json.loads(status_json or "{}")
    return [str(key).rsplit(":", 1)[-1] for key in data]


@dataclass(frozen=True)
class ShownExperiment:
    """One experiment from `dvc exp show --json`, with the commit it branches from."""

    name: str
    rev: str
    baseline_name: str | None
    baseline_rev: str
    params: dict[str, Any] = field(default_factory=dict)
    baseline_params: dict[str, Any] = field(default_factory=dict)


def _params_of(entry: Mapping[str, Any], file: str) -> dict[str, Any]:
    data = (entry.get("data") or {}).get("params") or {}
    return dict((data.get(file) or {}).get("data") or {})


def find_experiment(
    shown_json: str, name: str, params_file: str = str(PARAMS_YAML)
) -> ShownExperiment | None:
    """Look `name` up in `dvc exp show --json` output (a list: `workspace`, then each baseline
    commit with `experiments: [{revs: [{name, rev, data: {params: {file: {data}}}}]}]`)."""
    for baseline in json.loads(shown_json or "[]") or ():
        for group in baseline.get("experiments") or ():
            for rev in group.get("revs") or ():
                if rev.get("name") == name:
                    return ShownExperiment(
                        name=name,
                        rev=str(rev.get("rev")),
                        baseline_name=baseline.get("name"),
                        baseline_rev=str(baseline.get("rev")),
                        params=_params_of(rev, params_file),
                        baseline_params=_params_of(baseline, params_file),
                    )
    return None


def changed_params(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple]:
    """dotted key -> (before, after) for every value that differs (None where absent)."""
    old, new = flatten(dict(before)), flatten(dict(after))
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    }


# ---- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one `pricefuse experiment` did, as far as the report needs it."""

    stage: str
    name: str
    overrides: dict[str, tuple]  # key -> (value before, value now) in the workspace params.yaml
    outputs: list[str]
    output_runs: list[str | None]  # MLflow run recorded in each output's meta.json
    this_run: str | None  # the MLflow run of this command (`mlflow run`), if any
    stage_outcome: str  # ran | cached | unchanged | unknown
    stale: list[str]  # stages the next `dvc repro` re-runs
    downstream: list[str]  # every stage that consumes the outputs, stale or not
    baseline: str | None = None  # `master@1a2b3c4`
    also_changed: dict[str, tuple] = field(default_factory=dict)  # vs the baseline commit


def _fmt(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def report(outcome: Outcome) -> str:
    """The plain-words summary printed after the experiment ran."""
    o = outcome
    where = f" from {o.baseline}" if o.baseline else ""
    lines = [f"DVC experiment '{o.name}': stage {o.stage}{where}."]
    if o.overrides:
        changes = ", ".join(
            f"{key} {_fmt(old)} -> {_fmt(new)}" if old != new else f"{key} {_fmt(new)} (as before)"
            for key, (old, new) in o.overrides.items()
        )
        lines.append(f"  params changed: {changes}")
    else:
        lines.append("  params changed: none (params.yaml as it was)")
    if o.also_changed:
        extra = ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in o.also_changed.items())
        lines.append(f"  also differs from {o.baseline} (uncommitted workspace changes): {extra}")
    outputs = ", ".join(o.outputs) or "(no outputs)"
    runs = sorted({r for r in o.output_runs if r})
    written_by = f"MLflow run {', '.join(runs)}" if runs else "no recorded MLflow run"
    if o.stage_outcome == "ran" or (o.this_run and o.this_run in runs):
        who = f"this run's output (MLflow run {o.this_run or ', '.join(runs) or '?'})"
        verb = "holds" if len(o.outputs) == 1 else "hold"
        lines.append(f"  {outputs} now {verb} {who}; params.yaml and dvc.lock match it.")
    elif o.stage_outcome == "cached":
        lines.append(
            f"  {o.stage} was NOT retrained: DVC restored {outputs} from its run cache (these "
            f"params ran before, {written_by}); params.yaml and dvc.lock match it."
        )
    else:
        lines.append(
            f"  {o.stage} was up to date and did not run: {outputs} still holds the output of "
            f"{written_by}."
        )
    if o.this_run and o.stage_outcome != "ran" and o.this_run not in runs:
        lines.append(f"  This MLflow run ({o.this_run}) trained nothing; the output is that run's.")
    consumers = [name for name in o.stale if name in o.downstream]
    others = [name for name in o.stale if name not in o.downstream]
    if consumers:
        who = (
            "the ensemble (and the submission) will use it after `dvc repro`, which re-runs them"
            if "ensemble" in consumers
            else "they will after `dvc repro`, which re-runs them"
        )
        lines.append(f"  Stale: {', '.join(consumers)} do NOT use this output yet; {who}.")
    elif o.downstream:
        lines.append(f"  Up to date with it: {', '.join(o.downstream)} (nothing stale downstream).")
    else:
        lines.append("  No stage consumes it (nothing downstream).")
    if others:
        lines.append(f"  Also stale, for other reasons: {', '.join(others)}.")
    lines += [
        "  compare:   dvc exp show --only-changed   |   dvc exp diff",
        "  keep it:   git add params.yaml dvc.lock && git commit   "
        f"(or on a branch: dvc exp branch {o.name} <branch>)",
        "  go back:   git checkout HEAD -- params.yaml dvc.lock && dvc checkout   "
        "(or another experiment: dvc exp apply <name>)",
        f"  discard:   dvc exp remove {o.name}",
    ]
    return "\n".join(lines)


def shell_quote(arg: str) -> str:
    """shlex.quote, but "double quotes" around an argument holding single quotes (a quoted
    Hydra string) when that is safe: `-S "a.b='x y'"` reads better than shlex's '"'"'."""
    quoted = shlex.quote(arg)
    if quoted == arg or "'" not in arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def direct_run_warning(
    stage: str,
    overrides: Iterable[str],
    dvc_yaml_path: Path = DVC_YAML,
    params_path: Path = PARAMS_YAML,
) -> str | None:
    """The stderr warning for `pricefuse <stage> --set ...` run by hand on a dvc.yaml stage:
    its output will not match dvc.lock and the next `dvc repro` throws it away."""
    effective = effective_overrides(overrides)
    if not effective or not dvc_yaml_path.is_file():
        return None
    dvc_yaml = yaml.safe_load(dvc_yaml_path.read_text()) or {}
    if stage not in (dvc_yaml.get("stages") or {}):
        return None
    raw = load_raw(params_path) if params_path.is_file() else {}
    outputs = ", ".join(stage_outputs(dvc_yaml, raw, stage)) or "its output"
    texts = [text.strip() for text in overrides if parse_override(text) is not None]
    try:
        dvc_args = validate(texts, params_path)
    except ConfigError:
        dvc_args = [arg for text in texts for arg in ("-S", text)]
    as_set = " ".join(f"--set {shell_quote(text)}" for text in texts)
    as_dvc = " ".join(shell_quote(arg) for arg in dvc_args)
    return (
        f"warning: {as_set} runs DVC stage '{stage}' outside DVC: {outputs} will no longer "
        "match dvc.lock, and the next `dvc repro` re-runs the stage or restores the old output "
        "from its cache, discarding this run's without a word. To keep the result, run it as a "
        f"DVC experiment: `pricefuse experiment {stage} {as_set}` "
        f"(or `dvc exp run {as_dvc} {stage}`)."
    )


# ---- running it ----------------------------------------------------------------------------


def _tee(cmd: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Run `cmd`, echoing its output (stderr merged) as it comes; (exit code, output)."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env)
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def _dvc_stdout(args: Sequence[str]) -> str | None:
    """Stdout of a read-only dvc command; None (with a note) if it fails: the report then
    leaves that part out rather than failing an experiment that ran."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: `dvc {' '.join(args)}` failed: {result.stderr.strip()}", file=sys.stderr)
        return None
    return result.stdout


def error_lines(output: str) -> list[str]:
    """The lines of a failed `dvc exp run` that say why (DVC's `ERROR:`, a stage's `error:`)."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.lstrip().startswith(("ERROR", "error:"))
    ]


def _tag_run(run_id: str, tags: Mapping[str, str]) -> None:
    """Name the DVC experiment on the MLflow run, so the run leads to the exact commit."""
    try:
        import mlflow

        from pricefuse.recording.tracking import default_tracking_uri

        client = mlflow.MlflowClient(default_tracking_uri())
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception as exc:  # the experiment ran; a tracking hiccup must not hide that
        print(f"note: could not tag MLflow run {run_id}: {exc}", file=sys.stderr)


def run_experiment(stage: str, overrides: Sequence[str], name: str | None = None) -> int:
    """Validate the overrides, run `dvc exp run -S ... <stage>`, print what it did; exit code.

    Under `mlflow run` (MLFLOW_RUN_ID set) the stage joins that run; a stale upstream stage that
    DVC re-runs first logs a child run of it instead (JOIN_STAGE_ENV), so the run holds exactly
    one stage's params and metrics (pricefuse.recording.tracking.route_mlflow_run). ConfigError,
    before anything runs, on a bad override or one the configuration ignores.
    """
    if not DVC_YAML.is_file():
        raise ConfigError(f"no {DVC_YAML} here: run from the project root")
    dvc_yaml = yaml.safe_load(DVC_YAML.read_text()) or {}
    if stage not in (dvc_yaml.get("stages") or {}):
        raise ConfigError(f"{stage} is not a stage of {DVC_YAML}")
    # Under `mlflow run` the overrides came as -P: say which -P to pass with a refused one.
    flags = entry_point_flags(stage) if os.environ.get(MLFLOW_RUN_ENV) else None
    set_args = validate(overrides, flags=flags)
    params_before = PARAMS_YAML.read_text()
    before = load_raw(PARAMS_YAML)

    cmd = ["dvc", "exp", "run", *set_args, *(["--name", name] if name else []), stage]
    env = dict(os.environ)
    this_run = env.get(MLFLOW_RUN_ENV) or None
    if this_run:
        env[JOIN_STAGE_ENV] = stage
    shown = " ".join(shell_quote(arg) for arg in cmd)
    print(f"pricefuse experiment: {shown}", flush=True)
    try:
        code, output = _tee(cmd, env)
    except FileNotFoundError:
        print("error: `dvc` not found on PATH", file=sys.stderr)
        return 127
    if code != 0:
        why = "\n  ".join(error_lines(output)) or "(see its output above)"
        restored = ""
        if PARAMS_YAML.read_text() != params_before:
            PARAMS_YAML.write_text(params_before)
            restored = " params.yaml is restored to what it was."
        print(
            f"error: `{shown}` failed (exit {code}):\n  {why}\n"
            f"No experiment was recorded.{restored} The failed stage's outputs may be missing "
            "or partial; `dvc checkout` brings back those recorded in dvc.lock.",
            file=sys.stderr,
        )
        return code

    raw = load_raw(PARAMS_YAML)
    exp = name or experiment_name(output) or "(unnamed)"
    outputs = stage_outputs(dvc_yaml, raw, stage)
    output_runs = [
        read_meta(path).get("run_id") if Path(path).is_dir() else None for path in outputs
    ]
    stale = stale_stages(_dvc_stdout(["status", "--json"]) or "{}")
    will_rerun = set(stale) | set(downstream_stages(dvc_yaml, raw, stale))
    found = find_experiment(_dvc_stdout(["exp", "show", "--json"]) or "[]", exp)
    keys = [key for key, _value in effective_overrides(overrides)]
    after_flat, before_flat = flatten(raw), flatten(before)
    also: dict[str, tuple] = {}
    baseline = None
    if found:
        baseline = f"{found.baseline_name or 'commit'}@{found.baseline_rev[:7]}"
        also = {
            key: change
            for key, change in changed_params(found.baseline_params, found.params).items()
            if key not in keys
        }
    outcome = Outcome(
        stage=stage,
        name=exp,
        overrides={key: (before_flat.get(key), after_flat.get(key)) for key in keys},
        outputs=outputs,
        output_runs=output_runs,
        this_run=this_run,
        stage_outcome=stage_outcomes(output).get(stage, "unknown"),
        stale=[s for s in dvc_yaml["stages"] if s in will_rerun],
        downstream=downstream_stages(dvc_yaml, raw, [stage]),
        baseline=baseline,
        also_changed=also,
    )
    tagged = this_run or next((r for r in output_runs if r), None)
    if tagged and (this_run or outcome.stage_outcome == "ran"):
        tags = {"dvc.experiment": exp}
        if found:
            tags["dvc.experiment_rev"] = found.rev
        _tag_run(tagged, tags)
    print("\n" + report(outcome), flush=True)
    return 0
