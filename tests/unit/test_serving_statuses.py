"""Every `image_status` a served row can get is in docs/serving.md's table, and nothing else is.

Why a test: two statuses the code produced (`image_error`, `file_unreadable`) were missing from
the documented list, so a client could not tell what they meant. The code's statuses are read
from the source itself (each `Refused("reason")`, each reason assigned before one, the decoder's
rejection kinds and the outcome constants), so a new refusal without a documented meaning fails.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from pricefuse.data.images import source
from pricefuse.data.images.validate import RejectKind

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "src" / "pricefuse" / "data" / "images"
DOC = ROOT / "docs" / "serving.md"
# what `guard` builds from a variable: documented as patterns
PATTERNS = {"http_<code>", "redirect_<reason>"}


def code_statuses() -> set[str]:
    found: set[str] = set()
    for module in ("source.py", "guard.py", "fetch_slots.py"):
        text = (IMAGES / module).read_text()
        found |= set(re.findall(r'Refused\(\s*"([a-z0-9_]+)"', text))
        found |= set(re.findall(r'reason, detail = "([a-z0-9_]+)"', text))
        found |= set(re.findall(r'return ImageOutcome\(None, "([a-z0-9_]+)"\)', text))
        if 'Refused(f"http_{' in text:
            found.add("http_<code>")
        if 'Refused(f"redirect_{' in text:
            found.add("redirect_<reason>")
    kinds = {source._REJECTED.get(kind, kind) for kind in get_args(RejectKind)}
    outcomes = {source.STATUS_OK, source.STATUS_NO_IMAGE, source.STATUS_PIXEL_BUDGET}
    return found | kinds | outcomes


def documented_statuses() -> set[str]:
    table = DOC.read_text().split("| `image_status` | the row's image |", 1)[1]
    rows = []
    for line in table.splitlines()[2:]:  # after the header's rule, until the table ends
        if not line.startswith("| "):
            break
        rows.append(line)
    assert rows, "the status table in docs/serving.md is empty"
    first_cells = [row.split("|")[1] for row in rows]
    return {status for cell in first_cells for status in re.findall(r"`([a-z0-9_<>]+)`", cell)}


def test_every_status_the_code_gives_is_documented_and_no_other():
    code, documented = code_statuses(), documented_statuses()
    assert code >= PATTERNS
    assert {"image_error", "file_unreadable", "pixel_budget", "decode_timeout"} <= code
    assert code - documented == set(), f"undocumented statuses: {sorted(code - documented)}"
    assert documented - code == set(), f"documented but never given: {sorted(documented - code)}"
