"""Features computed from parsed rows: text and image encoders (`text`, `image`, which import
torch, so they are not imported here; `embedding` runs both for the embed stage) and the
row-order hash that ties arrays to tables."""

from pricefuse.features.rows import row_hash

__all__ = ["row_hash"]
