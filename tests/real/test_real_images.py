"""Image validation on the real product images (skipped when ../shared/data/amazon2025/images is
absent)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pricefuse.data.images import ImageRejected, prepare_image, validate_image
from tests.support import project_params


def test_real_product_images_validate_and_detect_truncation(shared_data: Path) -> None:
    images = shared_data / "images"
    if not images.is_dir():
        pytest.skip(f"real images not found at {images} (see its README)")
    fetch = project_params().fetch
    paths = sorted(images.glob("*.jpg"))[::25]
    assert paths
    for path in paths:
        data = path.read_bytes()
        assert validate_image(data, fetch) == "JPEG"
        assert prepare_image(data, replace(fetch, max_side=384)).data == data  # already <= 384 px
        with pytest.raises(ImageRejected):
            validate_image(data[: len(data) * 95 // 100], fetch)
