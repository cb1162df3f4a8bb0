"""The gated residual head (LORAverse): its gates, parameter groups and image-branch isolation.

What every head shares (shapes, gradients, mask, readouts, save/load) is in
test_fusion_heads.py; these are the checks that name this head's own layers."""

from __future__ import annotations

import pytest
import torch

from pricefuse.models.fusion.heads import HeadArch, build_head
from pricefuse.models.fusion.heads.gated_residual import GatedResidualHead

ARCH = HeadArch(text_dim=12, image_dim=10, n_units=5, n_numeric=8, hidden=16, n_blocks=2)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, ARCH.text_dim, generator=g)
    image = torch.randn(n, ARCH.image_dim, generator=g)
    mask = torch.arange(n) % 2 == 0  # every other row has an image
    unit = torch.arange(n) % ARCH.n_units
    numeric = torch.randn(n, ARCH.n_numeric, generator=g)
    return text, image, mask, unit, numeric


@pytest.fixture
def head() -> GatedResidualHead:
    torch.manual_seed(0)
    model = build_head(ARCH)
    assert isinstance(model, GatedResidualHead)
    model.set_target_scale(2.7, 0.9)
    return model.eval()


def test_shapes_and_gates(head: GatedResidualHead) -> None:
    batch = _batch(7)
    out = head(*batch)
    assert out.shape == (7,)
    assert torch.isfinite(out).all()
    _, gates = head.gated(*batch)
    assert gates.shape == (7, 4)  # text, image, unit, numeric
    assert ((gates > 0) & (gates < 1)).all()


def test_output_is_centred_on_the_target_scale(head: GatedResidualHead) -> None:
    batch = _batch(6)
    first = head(*batch)
    head.set_target_scale(2.7 + 5.0, 0.9)
    assert torch.allclose(head(*batch), first + 5.0)


def test_gradients_reach_every_parameter_group(head: GatedResidualHead) -> None:
    head.train()
    out = head(*_batch(16))
    ((out - 3.0) ** 2).mean().backward()
    groups = ("text_proj", "image_proj", "unit_embedding", "unit_proj", "numeric_proj", "gate")
    groups += ("fuse", "blocks.0", "blocks.1", "out")
    seen = {g: False for g in groups}
    for name, param in head.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        for group in groups:
            if name.startswith(group + "."):
                seen[group] = True
    assert all(seen.values()), f"parameter groups missing from the model: {seen}"


def test_masked_rows_ignore_their_image_vector(head: GatedResidualHead) -> None:
    text, image, mask, unit, numeric = _batch(10)
    before = head(text, image, mask, unit, numeric)
    other = image.clone()
    other[~mask] = torch.randn(int((~mask).sum()), ARCH.image_dim) * 100.0
    after = head(text, other, mask, unit, numeric)
    assert torch.equal(before, after)

    # The same change on rows that do have an image must move their predictions.
    changed = image.clone()
    changed[mask] = torch.randn(int(mask.sum()), ARCH.image_dim) * 100.0
    moved = head(text, changed, mask, unit, numeric)
    assert (moved[mask] != before[mask]).all()
    assert torch.equal(moved[~mask], before[~mask])


def test_masked_rows_are_exactly_the_text_only_path(head: GatedResidualHead) -> None:
    text, image, mask, unit, numeric = _batch(10)
    none = torch.zeros_like(mask)
    # A row without an image predicts the same whatever its image vector, NaN included ...
    garbage = torch.full_like(image, float("nan"))
    assert torch.equal(
        head(text, garbage, none, unit, numeric), head(text, image, none, unit, numeric)
    )
    # ... and sends no gradient into it.
    image = image.clone().requires_grad_(True)
    head(text, image, mask, unit, numeric).sum().backward()
    assert image.grad is not None
    assert torch.equal(image.grad[~mask], torch.zeros_like(image.grad[~mask]))
    assert image.grad[mask].abs().sum() > 0


def test_rows_without_image_do_not_touch_the_image_branch(head: GatedResidualHead) -> None:
    """Exactly zero image contribution: not even the branch's biases reach the output."""
    text, image, _, unit, numeric = _batch(8)
    none = torch.zeros(8, dtype=torch.bool)
    head(text, image, none, unit, numeric).sum().backward()
    for name, param in head.image_proj.named_parameters():
        assert param.grad is None or not param.grad.any(), f"image_proj.{name} got a gradient"
    assert head.text_proj[0].weight.grad is not None


def test_input_scale_makes_the_head_independent_of_embedding_units(head: GatedResidualHead) -> None:
    text, image, mask, unit, numeric = _batch(16)
    head.set_input_scale(text, image, mask)
    before = head(text, image, mask, unit, numeric)
    text2, image2 = text * 50.0 + 3.0, image * 0.01 - 1.0
    head.set_input_scale(text2, image2, mask)
    after = head(text2, image2, mask, unit, numeric)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_state_dict_keeps_the_former_fusion_head_names(head: GatedResidualHead) -> None:
    """Weights saved by the former pricefuse.models.fusion.FusionHead (format-1 predictors)
    load strictly: the same parameter and buffer names, nothing added without the joint tower
    or the sigmoid readout."""
    layers = {"text_proj.0", "image_proj.0", "unit_proj.0", "numeric_proj.0", "gate", "fuse"}
    layers |= {f"blocks.{b}.body.{i}" for b in range(2) for i in (0, 1, 4)}
    layers |= {"out.0", "out.1"}
    expected = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    expected |= {"unit_embedding.weight", "target_mean", "target_std"}
    expected |= {f"{m}_{s}" for m in ("text", "image") for s in ("mean", "std")}
    assert set(head.state_dict()) == expected
