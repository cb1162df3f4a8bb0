"""Keep requirements-serve.txt's pins equal to requirements.lock's, local labels dropped.

    python tools/serve_requirements.py           # rewrite the pins in place (`make lock` runs it)
    python tools/serve_requirements.py --check   # exit 1 listing the pins out of step

requirements-serve.txt names what the served model needs (see its header); the versions come
from the lock, so there is one source of truth for them. A local version label is dropped
(`torch==2.13.0+cpu` -> `torch==2.13.0`): plain PyPI serves no local versions, and pip's
`==2.13.0` still accepts the +cpu wheel where a find-links or extra index offers it (PEP 440).
Comments, order and the names' spelling stay as written. Standard library only: `make lock`
runs it with the base interpreter.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SERVE = ROOT / "requirements-serve.txt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalize(name: str) -> str:
    """PEP 503: pip treats `PyYAML`, `pyyaml` and `py_yaml` alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: 2.13.0+cpu -> 2.13.0."""
    return version.split("+", 1)[0]


def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a requirements file, comments (whole-line or trailing) removed."""
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def requirement_name(line: str) -> str:
    match = _NAME.match(line)
    if match is None:
        raise ValueError(f"not a requirement: {line!r}")
    return match.group(0)


def lock_versions(lock_text: str) -> dict[str, str]:
    """Normalized name -> version of every `name==version` line of the lock."""
    versions = {}
    for line in requirement_lines(lock_text):
        name, sep, version = line.partition("==")
        if sep:
            versions[normalize(name)] = version.strip()
    return versions


def out_of_step(serve_text: str, lock_text: str) -> list[str]:
    """One message per requirement whose pin is not the lock's public version (or is absent)."""
    locked = lock_versions(lock_text)
    problems = []
    for line in requirement_lines(serve_text):
        name = requirement_name(line)
        if normalize(name) not in locked:
            problems.append(f"{name}: not in requirements.lock (add it to requirements.txt)")
            continue
        wanted = f"{name}=={public_version(locked[normalize(name)])}"
        if line.replace(" ", "") != wanted:
            problems.append(f"{line}: the lock pins {wanted}")
    return problems


def synced(serve_text: str, lock_text: str) -> str:
    """`serve_text` with every requirement pinned to the lock's public version."""
    locked = lock_versions(lock_text)
    missing = [
        name
        for name in map(requirement_name, requirement_lines(serve_text))
        if normalize(name) not in locked
    ]
    if missing:
        raise KeyError(f"not in requirements.lock: {', '.join(missing)}")
    out = []
    for line in serve_text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            name = requirement_name(stripped)
            comment = line.partition(" #")[2]
            line = f"{name}=={public_version(locked[normalize(name)])}"
            line += f"  #{comment}" if comment else ""
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report, do not rewrite")
    args = parser.parse_args(argv)
    serve_text, lock_text = SERVE.read_text(), LOCK.read_text()
    if args.check:
        problems = out_of_step(serve_text, lock_text)
        for problem in problems:
            print(f"{SERVE.name}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    SERVE.write_text(synced(serve_text, lock_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
