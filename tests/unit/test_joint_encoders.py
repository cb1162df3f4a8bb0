"""CLIP / SigLIP / open_clip encoders on tiny random models: text and image in one space.

No weights ship offline, so the models are randomly initialised and tiny (tests.support
tiny_joint_model, a small open_clip config below); what is tested is the loading and encoding
code: the right tower and projection, each family's tokenisation conventions, the refusals.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, resolve
from pricefuse.features import openclip
from pricefuse.features.image import ImageEncoder
from pricefuse.features.joint import load_tower
from pricefuse.features.text import TextEncoder
from tests.support import TINY_JOINT_DIM

compat.apply()

TEXTS = ["taco sauce 12 oz pack of 6", "x", "butter cookies 8 ounce pack of 4 classic tin"]


def _picture() -> Image.Image:
    pixels = np.full((30, 40, 3), 255, dtype=np.uint8)
    pixels[5:-5, 8:-8] = (200, 30, 30)
    return Image.fromarray(pixels)


def _features(output: object) -> torch.Tensor:
    """get_*_features returns a tensor (CLIP) or an output with pooler_output (SigLIP)."""
    return getattr(output, "pooler_output", output)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_text_and_image_match_the_full_model_in_one_space(
    family: str, request: pytest.FixtureRequest
) -> None:
    """Both encoders give the full model's get_text_features / get_image_features (text
    L2-normalised), so the two towers and their projections are the checkpoint's own."""
    from transformers import CLIPModel, SiglipModel

    directory = request.getfixturevalue(f"tiny_{family}_dir")
    text = TextEncoder.from_ref(directory, max_length=128, batch_size=2)
    image = ImageEncoder.from_ref(directory, image_size=32, batch_size=2)
    assert text.dim == image.dim == TINY_JOINT_DIM[family]
    assert text.max_length == 16  # capped at the text tower's positions (CLIP's 77 when real)

    emb = text.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    vectors, mask = image.encode([_picture(), None])
    assert mask.tolist() == [True, False] and not vectors[1].any()

    full = {"clip": CLIPModel, "siglip": SiglipModel}[family].from_pretrained(directory).eval()
    padding = "max_length" if family == "siglip" else True
    tokens = text.tokenizer(TEXTS, padding=padding, truncation=True, max_length=16)
    inputs = {k: torch.tensor(v) for k, v in tokens.items()}
    if family == "siglip":
        inputs = {"input_ids": inputs["input_ids"]}  # trained without an attention mask
    with torch.inference_mode():
        expected_text = torch.nn.functional.normalize(_features(full.get_text_features(**inputs)))
        pixels = image.preprocess(_picture())[None]
        expected_image = _features(full.get_image_features(pixel_values=pixels))
    np.testing.assert_allclose(emb, expected_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(vectors[0], expected_image[0].numpy(), atol=1e-5)


def test_siglip_pads_to_its_trained_length(tiny_siglip_dir: str) -> None:
    """SigLIP pools the last position: with padding to the full length a text's vector does not
    depend on the longest text of its batch, and a shorter max_length is refused, not honoured."""
    encoder = TextEncoder.from_ref(tiny_siglip_dir, max_length=16, batch_size=3)
    alone = np.vstack([encoder.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(encoder.encode(TEXTS), alone, atol=1e-5)
    with pytest.raises(ValueError, match="trained length of 16"):
        TextEncoder(tiny_siglip_dir, encoder.tower, max_length=8, batch_size=2)


def test_one_tower_checkpoints(tiny_clip_dir: str, tmp_path: Path) -> None:
    """A vision-only CLIP checkpoint embeds images; asked for text, it says what is missing."""
    load_tower(resolve(tiny_clip_dir), "vision").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert ImageEncoder.from_ref(str(tmp_path), image_size=32).dim == TINY_JOINT_DIM["clip"]
    with pytest.raises(ModelSourceError, match="has no text tower"):
        TextEncoder.from_ref(str(tmp_path))


@pytest.mark.parametrize(
    ("family", "key", "load"),
    [
        ("clip", "text_projection.weight", TextEncoder.from_ref),
        ("clip", "visual_projection.weight", ImageEncoder.from_ref),
        ("siglip", "text_model.head.weight", TextEncoder.from_ref),
        ("siglip", "vision_model.head.probe", ImageEncoder.from_ref),
    ],
)
def test_checkpoint_with_missing_weights_is_refused(
    family: str, key: str, load, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """transformers would fill a missing tensor with random numbers: embeddings of noise."""
    source = Path(request.getfixturevalue(f"tiny_{family}_dir"))
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="weights missing"):
        load(str(tmp_path))


# --- open_clip -------------------------------------------------------------------------------

TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 12,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "preprocess_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]},
}


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip checkpoint directory (the hub layout Marqo's models use), random weights."""
    import open_clip

    directory = tmp_path_factory.mktemp("tiny-open-clip")
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    with torch.random.fork_rng():  # the other tests' random stream is left as it was
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{directory}")  # no weights yet: random
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return directory


def test_open_clip_reference_embeds_text_and_images_in_one_space(open_clip_dir: Path) -> None:
    import open_clip

    ref = f"open_clip:local-dir:{open_clip_dir}"
    text = TextEncoder.from_ref(ref, max_length=128, batch_size=2)
    image = ImageEncoder.from_ref(ref, image_size=32, batch_size=2)
    assert text.dim == image.dim == 16 and text.max_length == 12  # the model's context length
    assert image.preprocess.mean == (0.4, 0.4, 0.4)  # the checkpoint's preprocess_cfg
    assert text.model is image.model.model  # one model object for both encoders

    model = open_clip.create_model(f"local-dir:{open_clip_dir}", require_pretrained=True)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    with torch.inference_mode():
        expected = model.eval().encode_text(tokenizer(TEXTS), normalize=True).numpy()
        expected_image = model.encode_image(image.preprocess(_picture())[None]).numpy()
    np.testing.assert_allclose(text.encode(TEXTS), expected, atol=1e-5)
    vectors, mask = image.encode([_picture(), None])
    assert mask.tolist() == [True, False]
    np.testing.assert_allclose(vectors[0], expected_image[0], atol=1e-5)
    with pytest.raises(ModelSourceError, match="image_size: 32"):
        ImageEncoder.from_ref(ref, image_size=48)  # open_clip does not interpolate


def test_open_clip_refusals(
    open_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    with pytest.raises(ModelSourceError, match="cannot load the open_clip model"):
        ImageEncoder.from_ref(f"open_clip:local-dir:{tmp_path}")  # config, no weights: random
    with pytest.raises(ModelSourceError, match="names no model"):
        TextEncoder.from_ref("open_clip:")
    openclip.load.cache_clear()
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` fails from here on
    with pytest.raises(ModelSourceError, match="pip install open-clip-torch"):
        TextEncoder.from_ref(f"open_clip:local-dir:{open_clip_dir}")
