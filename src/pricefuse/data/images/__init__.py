"""Fetch, validate and cache product images; load one image for serving.

Why this is more than a download loop: the competition's image links point at a CDN that
throttles (429/503), drops connections and occasionally returns HTML or truncated bodies, and the
starter kit's loop left teams with partial JPEGs that decoded "fine" until training. Here an image
only counts once it has been fully decoded, cache files appear only by atomic rename, and every
link ends with one manifest row saying what happened (ok, cached, missing, bad, failed).

One module per job (this package re-exports their public API):
- `validate`: decode fully, reject what is not an image we want, downscale (`ImageRejected`).
- `links`: link kinds (network or disk), local paths, the distinct usable links.
- `records`: `LinkRecord`, the manifest row every link ends with.
- `cache`: the cache directory layout, atomic writes, the journal and the manifest.
- `http`: the asynchronous fetch run: retries, backoff, Retry-After, host-down detection.
- `fetch`: `fetch_images`, the orchestration, and its `FetchResult`.
- `guard`: `ImagePolicy` and `guarded_get`, the only way serving fetches a link (allow-listed
  public hosts, pinned addresses, checked redirects, size and time limits).
- `source`: `load_image_source` / `load_images`, one image per serving row with its status.
- `fetch_slots`: the process-wide limits on concurrent fetches (and per host) and the bounded
  name-lookup threads the guard uses.
- `decode_pool`: untrusted bytes decoded in killable worker processes, each decode time-bounded.
- `update`: the fetch_images stage's work (links of the raw CSVs -> cache + what it records);
  not re-exported: it imports the plotting stack, which serving does not need.

The names below are re-exported lazily (PEP 562): importing one module of the package (the image
encoder imports `validate`) does not import the others — a decode worker starts faster, and a
stage's code dependencies (tools/stage_deps.py) stay the modules it really runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "ImageCache": "cache",
    "cache_stem": "cache",
    "read_manifest": "cache",
    "write_manifest": "cache",
    "FetchResult": "fetch",
    "fetch_images": "fetch",
    "ImagePolicy": "guard",
    "Refused": "guard",
    "guarded_get": "guard",
    "backoff_delay": "http",
    "parse_retry_after": "http",
    "distinct_links": "links",
    "link_kind": "links",
    "local_path": "links",
    "STATUSES": "records",
    "LinkRecord": "records",
    "ImageOutcome": "source",
    "image_columns": "source",
    "load_image_source": "source",
    "load_images": "source",
    "ALLOWED_FORMATS": "validate",
    "ImageRejected": "validate",
    "PreparedImage": "validate",
    "prepare_image": "validate",
    "validate_image": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
