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
- `update`: the fetch_images stage's work (links of the raw CSVs -> cache + what it records);
  not re-exported: it imports the plotting stack, which serving does not need.
"""

from __future__ import annotations

from pricefuse.data.images.cache import ImageCache, cache_stem, read_manifest, write_manifest
from pricefuse.data.images.fetch import FetchResult, fetch_images
from pricefuse.data.images.guard import ImagePolicy, Refused, guarded_get
from pricefuse.data.images.http import backoff_delay, parse_retry_after
from pricefuse.data.images.links import distinct_links, link_kind, local_path
from pricefuse.data.images.records import STATUSES, LinkRecord
from pricefuse.data.images.source import (
    ImageOutcome,
    image_columns,
    load_image_source,
    load_images,
)
from pricefuse.data.images.validate import (
    ALLOWED_FORMATS,
    ImageRejected,
    PreparedImage,
    prepare_image,
    validate_image,
)

__all__ = [
    "ALLOWED_FORMATS",
    "STATUSES",
    "FetchResult",
    "ImageCache",
    "ImageOutcome",
    "ImagePolicy",
    "ImageRejected",
    "LinkRecord",
    "PreparedImage",
    "Refused",
    "backoff_delay",
    "cache_stem",
    "distinct_links",
    "fetch_images",
    "guarded_get",
    "image_columns",
    "link_kind",
    "load_image_source",
    "load_images",
    "local_path",
    "parse_retry_after",
    "prepare_image",
    "read_manifest",
    "validate_image",
    "write_manifest",
]
