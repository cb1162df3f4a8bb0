"""Decode, validate and (when asked) downscale image bytes.

Why decoding is the test: the CDN occasionally returns HTML or truncated bodies, and a partial
JPEG has a valid header that decodes "fine" until training. Here an image only counts once it has
been fully decoded; everything else raises `ImageRejected` saying why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from pricefuse.core.config import FetchConfig

# Formats a product image may come in. Restricting Image.open keeps PIL from handing untrusted
# bytes to exotic plugins (EPS would even start Ghostscript).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}
_JPEG_QUALITY = 90

# decode_timeout / decode_busy come only from `decode_pool` (a decode cut at its time limit; no
# decoder free before the request's deadline): they say nothing certain about the bytes.
RejectKind = Literal[
    "too_large",
    "not_image",
    "too_many_pixels",
    "too_many_scans",
    "undecodable",
    "decode_timeout",
    "decode_busy",
]
# A progressive JPEG has about ten scans; each scan makes the decoder walk every block of the
# image again, and an empty one costs ~60 bytes (tests.support.many_scan_jpeg builds such files:
# 32 refinement scans over 40 Mpx are 2 KB and about a second of CPU). More SOS markers than this
# (an EXIF thumbnail's included) is refused before decoding.
MAX_JPEG_SCANS = 32


class ImageRejected(ValueError):
    """Bytes that are not an acceptable image; `kind` says why (only `undecodable` may be a
    transport truncation worth retrying; `decode_busy` is load, not the image)."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        super().__init__(message)
        self.kind: RejectKind = kind


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to cache for one image: the original, or a downscaled re-encoding."""

    data: bytes
    ext: str
    size: tuple[int, int]
    source_size: tuple[int, int]
    format: str

    @property
    def downscaled(self) -> bool:
        return self.size != self.source_size


def _describe_non_image(data: bytes, content_type: str = "") -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML page, not an image"
    kind = content_type or "unknown type"
    return f"not an image ({kind}, {len(data)} bytes)"


def _open_checked(data: bytes, cfg: FetchConfig, content_type: str) -> Image.Image:
    """Open `data` (header only) and apply the limits that must hold before decoding."""
    if not data:
        raise ImageRejected("not_image", "empty body")
    if len(data) > cfg.max_bytes:
        raise ImageRejected(
            "too_large", f"{len(data)} bytes exceeds fetch.max_bytes={cfg.max_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_image", _describe_non_image(data, content_type)) from exc
    except Image.DecompressionBombError as exc:  # PIL's own, far higher limit hit first
        raise ImageRejected(
            "too_many_pixels", f"{exc} (fetch.max_pixels={cfg.max_pixels})"
        ) from exc
    except Exception as exc:  # malformed headers raise assorted errors inside plugins
        raise ImageRejected("undecodable", f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("undecodable", f"invalid image size {width}x{height}")
    if image.format in ("JPEG", "MPO"):
        # 0xFF 0xDA is always a marker: entropy-coded data stuffs every 0xFF with 0x00
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageRejected(
                "too_many_scans", f"{scans} JPEG scans; at most {MAX_JPEG_SCANS} are decoded"
            )
    if width * height > cfg.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} pixels exceeds fetch.max_pixels={cfg.max_pixels}",
        )
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageRejected("undecodable", f"undecodable {image.format}: {exc}") from exc


def _validation_draft(image: Image.Image) -> None:
    """Let JPEG decode at 1/8 scale when only validity matters.

    Why this is still a full decode: libjpeg entropy-decodes every block of every scan whatever
    the output scale (only the inverse DCT is reduced), so a truncated or cut stream fails the
    same way; on the real product images the verdicts of both agree on every truncation point
    tried, at ~60% of the CPU. Other formats decode in full.
    """
    if image.format in ("JPEG", "MPO"):
        width, height = image.size
        image.draft(image.mode, (-(-width // 8), -(-height // 8)))


def validate_image(data: bytes, cfg: FetchConfig, content_type: str = "") -> str:
    """Decode all of `data`; return its format, or raise ImageRejected saying why it is unusable.

    Why decode everything: a truncated JPEG has a valid header, so `Image.open` (and even
    `verify()`) accept it; only decoding every block shows the missing data. Pixel limits are
    checked on the header first, so a decompression bomb never allocates its pixels.
    Relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`.
    """
    image = _open_checked(data, cfg, content_type)
    _validation_draft(image)
    _load(image)
    return str(image.format)


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _mode_for(image: Image.Image, target_format: str) -> Image.Image:
    if target_format == "JPEG":
        return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def prepare_image(data: bytes, cfg: FetchConfig, content_type: str = "") -> PreparedImage:
    """Validate `data` (full decode) and return the bytes to cache.

    Within `cfg.max_side` the original bytes are kept (byte-identical, no generation loss);
    larger images are downscaled on the longer side and re-encoded (JPEG sources stay JPEG at
    quality 90, everything else becomes lossless PNG).
    """
    image = _open_checked(data, cfg, content_type)
    source_format = str(image.format)
    source_size: tuple[int, int] = image.size
    if cfg.max_side <= 0 or max(source_size) <= cfg.max_side:
        _validation_draft(image)  # the original bytes are kept: only validity matters
        _load(image)
        ext = _EXTENSIONS.get(source_format, ".img")
        return PreparedImage(data, ext, source_size, source_size, source_format)
    # JPEG can decode at 1/2, 1/4, 1/8 scale: it still reads the whole stream (truncation is
    # still caught) but skips computing pixels the downscale would throw away.
    image.draft(image.mode, _fit(source_size, cfg.max_side))
    _load(image)
    target = "JPEG" if source_format in ("JPEG", "MPO") else "PNG"
    exif = image.info.get("exif")
    icc = image.info.get("icc_profile")
    image = _mode_for(image, target)
    image.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    options: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if target == "JPEG":
        options["quality"] = _JPEG_QUALITY
        if exif:
            options["exif"] = exif  # keeps the orientation tag consistent with the original
    image.save(out, format=target, **options)
    return PreparedImage(out.getvalue(), _EXTENSIONS[target], image.size, source_size, target)


def encoder_pixels(image: Image.Image) -> Image.Image:
    """`image` as the image encoders read it: EXIF orientation applied, then RGB — or RGBA where
    it has transparency (which the encoder puts on white). `pricefuse.features.image` starts
    from this, so an image flattened here (in a decoder process) and one flattened there give
    the same pixels."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")


def decoded_image(data: bytes, cfg: FetchConfig) -> Image.Image:
    """`data` validated and prepared as the image cache would hold it (`prepare_image`), then
    decoded to `encoder_pixels`: what serving prices a row's image with.

    Why the pixels and not the prepared bytes: an image within `max_side` keeps its original
    bytes, so whoever decodes those again pays an attacker's decoding cost again; pixels of at
    most `max_side` squared cost nothing more to use.
    """
    prepared = prepare_image(data, cfg)
    with Image.open(io.BytesIO(prepared.data), formats=ALLOWED_FORMATS) as image:
        _load(image)
        return encoder_pixels(image)
