"""Serving: the one image a request row refers to (a link or base64), never raising.

Each row ends with an `ImageOutcome`: the image, or None and the reason (`status`) — so the
served answer can say per row whether an image was used and, if not, why, instead of silently
pricing from the text alone. Links go through `guard` (allow-listed public hosts only; local
paths only when the policy allows them).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import stat
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from pricefuse.core.config import FetchConfig
from pricefuse.data.images.guard import ImagePolicy, Refused, guarded_get
from pricefuse.data.images.links import local_path
from pricefuse.data.images.validate import ALLOWED_FORMATS, ImageRejected, decoded_image

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_NO_IMAGE = "no_image"
STATUS_PIXEL_BUDGET = "pixel_budget"
_REJECTED = {"not_image": "not_an_image"}  # validate's kinds, named for a reader of the output
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ImageOutcome:
    """One row's image, or None and why: `ok`, `no_image`, or a refusal/failure reason."""

    image: Image.Image | None
    status: str

    @property
    def used(self) -> bool:
        return self.image is not None


class PixelBudget(Protocol):
    """The decoded pixels a request's images may still use (pricefuse.serving.limits)."""

    def take(self, pixels: int) -> bool: ...


class ImageDecoder(Protocol):
    """Decodes untrusted image bytes (pricefuse.data.images.decode_pool: in killable worker
    processes, each decode time-bounded); raises `ImageRejected`."""

    seconds: float  # the most one decode may take

    def decode(self, data: bytes, cfg: FetchConfig, deadline: float | None) -> Image.Image: ...


def _header_pixels(data: bytes) -> int | None:
    """Width x height from the image header (no pixel is decoded); None when unreadable (the
    decoder then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
    except Exception:
        return None
    return width * height


def _b64_bytes(text: str, max_bytes: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    packed = _WHITESPACE.sub(b"", text.encode("ascii", "replace"))
    if len(packed) * 3 // 4 > max_bytes:
        raise Refused("too_large", "base64 image")
    altchars = b"-_" if b"-" in packed or b"_" in packed else None  # URL-safe alphabet
    try:
        return base64.b64decode(packed, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused("bad_base64", str(exc)) from exc


def _is_local(link: str) -> bool:
    """Paths and file:// URLs (a one-letter scheme is a Windows drive); other schemes are not."""
    scheme = urllib.parse.urlsplit(link).scheme.lower()
    return scheme in ("", "file") or len(scheme) == 1


def _local_bytes(link: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_local:
        raise Refused("local_path_refused")
    path = local_path(link)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise Refused("not_a_file", str(path))
        if info.st_size > policy.fetch.max_bytes:
            raise Refused("too_large", str(path))
        with path.open("rb") as handle:
            data = handle.read(policy.fetch.max_bytes + 1)
    except FileNotFoundError as exc:
        raise Refused("file_not_found", str(path)) from exc
    except OSError as exc:
        raise Refused("file_unreadable", f"{path}: {exc}") from exc
    if len(data) > policy.fetch.max_bytes:
        raise Refused("too_large", str(path))
    return data


def _has_source(link: object, b64: object) -> bool:
    """Whether a row names an image (`_source_bytes` reads one): a blank or non-text value (a
    pandas NaN) is no source."""
    return any(isinstance(value, str) and value.strip() for value in (link, b64))


def _source_bytes(
    link: str | None, b64: str | None, policy: ImagePolicy, deadline: float | None = None
) -> bytes | None:
    if isinstance(b64, str) and b64.strip():
        return _b64_bytes(b64.strip(), policy.fetch.max_bytes)
    if not (isinstance(link, str) and link.strip()):
        return None
    link = link.strip()
    scheme = urllib.parse.urlsplit(link).scheme.lower()
    if scheme in ("http", "https"):
        return guarded_get(link, policy, deadline)
    if _is_local(link):
        return _local_bytes(link, policy)
    raise Refused("scheme_refused", scheme)


def load_image_source(
    link: str | None = None,
    b64: str | None = None,
    *,
    policy: ImagePolicy,
    deadline: float | None = None,
    pixel_budget: PixelBudget | None = None,
    decoder: ImageDecoder | None = None,
) -> ImageOutcome:
    """The image a serving row refers to, prepared exactly as the training cache would hold it
    (same validation, same downscale and re-encoding), with its status.

    Never raises: an absent, refused or broken image sends the row down the text-only path, as
    in training, and the status says which. `b64` wins over `link` when both are given (the
    bytes are already here). `deadline` (a `time.monotonic()` value, the request's) ends a
    link's fetch early: a request the server gave up on stops fetching for it.
    `pixel_budget` (shared by a request's rows) is charged the image's header size before it is
    decoded: an image past it is not decoded (`pixel_budget`). `decoder` decodes (served
    requests: time-bounded worker processes); without one, this thread decodes.
    """
    try:
        data = _source_bytes(link, b64, policy, deadline)
        if data is None:
            return ImageOutcome(None, STATUS_NO_IMAGE)
        if pixel_budget is not None:
            pixels = _header_pixels(data)
            if pixels is not None and not pixel_budget.take(pixels):
                return ImageOutcome(None, STATUS_PIXEL_BUDGET)
        if decoder is not None:
            # a row waits for a free decoder at most one decode's time (then `decode_busy`):
            # decoders kept busy by other requests' bombs must not hold it to its deadline
            wait_until = time.monotonic() + 2 * decoder.seconds
            image = decoder.decode(data, policy.fetch, min(wait_until, deadline or wait_until))
        else:
            image = decoded_image(data, policy.fetch)
        return ImageOutcome(image, STATUS_OK)
    except Refused as refused:
        log.info("image not used (%s): %s", link or "b64", refused)
        return ImageOutcome(None, refused.reason)
    except ImageRejected as rejected:
        return ImageOutcome(None, _REJECTED.get(rejected.kind, rejected.kind))
    except Exception as exc:  # the contract: never raise, fall back to text-only
        log.warning("image source unusable (%s): %s", link or "b64", exc)
        return ImageOutcome(None, "image_error")


def load_images(
    links: Sequence[str | None],
    b64s: Sequence[str | None],
    policy: ImagePolicy,
    *,
    deadline: float | None = None,
    pixel_budget: PixelBudget | None = None,
    decoder: ImageDecoder | None = None,
) -> list[ImageOutcome]:
    """`load_image_source` for every row, in row order.

    Rows with a source are loaded concurrently (at most `fetch.per_host` at a time: serving's
    links all go to the few allow-listed hosts), so a batch waits about as long as its slowest
    image rather than the sum of them; each fetch is bounded by the policy's deadline and by
    `deadline` (the request's). No more workers start than there are rows with a source, nor
    than the process-wide `policy.max_fetches` (more could only wait for a fetch slot).
    """
    pairs = list(zip(links, b64s, strict=True))

    def load(pair: tuple[str | None, str | None]) -> ImageOutcome:
        return load_image_source(
            pair[0],
            pair[1],
            policy=policy,
            deadline=deadline,
            pixel_budget=pixel_budget,
            decoder=decoder,
        )

    sourced = [i for i, (link, b64) in enumerate(pairs) if _has_source(link, b64)]
    if len(sourced) <= 1:
        return [load(pair) for pair in pairs]
    outcomes = [ImageOutcome(None, STATUS_NO_IMAGE)] * len(pairs)
    workers = max(1, min(policy.fetch.per_host, policy.max_fetches, len(sourced)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pricefuse-serve-img") as pool:
        loaded = pool.map(load, [pairs[i] for i in sourced])
        for i, outcome in zip(sourced, loaded, strict=True):
            outcomes[i] = outcome
    return outcomes


def image_columns(outcomes: Sequence[ImageOutcome]) -> dict[str, list]:
    """The served output's per-row image columns: `image_used` and `image_status`."""
    return {
        "image_used": [outcome.used for outcome in outcomes],
        "image_status": [outcome.status for outcome in outcomes],
    }
