"""Serving: the one image a request row refers to (a link or base64), never raising."""

from __future__ import annotations

import base64
import io
import logging

from PIL import Image

from pricefuse.config import FetchConfig
from pricefuse.data.images.http import USER_AGENT
from pricefuse.data.images.links import link_kind, local_path
from pricefuse.data.images.validate import prepare_image

log = logging.getLogger(__name__)


def _b64_bytes(text: str, cfg: FetchConfig) -> bytes | None:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) * 3 // 4 > cfg.max_bytes:
        return None
    return base64.b64decode(text, validate=False)


def _http_bytes(url: str, cfg: FetchConfig) -> bytes | None:
    """One GET with the fetch timeouts: serving answers a request now, so no retry loop."""
    import requests

    with requests.get(
        url,
        timeout=(cfg.connect_timeout, cfg.read_timeout),
        stream=True,
        headers={"User-Agent": USER_AGENT},
    ) as response:
        if response.status_code != 200:
            return None
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(1 << 16):
            size += len(chunk)
            if size > cfg.max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def load_image_source(
    link: str | None = None, b64: str | None = None, *, cfg: FetchConfig
) -> Image.Image | None:
    """The image a serving row refers to, prepared exactly as the training cache would hold it
    (same validation, same downscale and re-encoding), or None when absent or broken.

    Never raises: a missing or broken image sends the row down the text-only path, as in
    training. `b64` wins over `link` when both are given (the bytes are already here).
    """
    try:
        data: bytes | None = None
        if isinstance(b64, str) and b64.strip():
            data = _b64_bytes(b64.strip(), cfg)
        elif isinstance(link, str) and link.strip():
            link = link.strip()
            if link_kind(link) == "http":
                data = _http_bytes(link, cfg)
            else:
                path = local_path(link)
                data = path.read_bytes() if path.stat().st_size <= cfg.max_bytes else None
        if not data:
            return None
        prepared = prepare_image(data, cfg)
        image = Image.open(io.BytesIO(prepared.data))
        image.load()
        return image
    except Exception as exc:  # the contract: never raise, fall back to text-only
        log.debug("image source unusable (%s): %s", link or "b64", exc)
        return None
