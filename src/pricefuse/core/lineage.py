"""Lineage files: the `meta.json` each stage writes into its output directory.

Why apart from the MLflow glue: the file names the run that produced a directory and facts a
consumer checks (the embeddings' row-order hash), and every stage reads it, including the
library cores that must never import MLflow. Reading and writing it is plain JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "meta.json"


def write_meta(out_dir: Path | str, stage: str, run_id: str | None, **extra: Any) -> Path:
    """Record which run produced an output directory (plus stage-specific facts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / META_FILE
    payload = {"stage": stage, "run_id": run_id, **extra}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_meta(out_dir: Path | str) -> dict[str, Any]:
    path = Path(out_dir) / META_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())
