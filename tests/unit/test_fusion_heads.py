"""Every head in the registry (pricefuse.models.fusion.heads.HEADS), tiny dims: output shape,
gradient
flow to every parameter, the image mask's exact text-only path, both readouts, the joint tower,
save/load through FusionPredictor, and K-fold training on test_train_fusion's synthetic problem.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_train_fusion import CFG, synthetic

from pricefuse.core.config import ConfigError
from pricefuse.core.metrics import smape_from_log
from pricefuse.features.joint_embedding import joint_embedding
from pricefuse.models.fusion.heads import HEADS, FusionHeadBase, HeadArch, build_head
from pricefuse.models.fusion.inputs import InputSpec, SplitData
from pricefuse.models.fusion.predictor import MANIFEST, FusionPredictor
from pricefuse.models.fusion.training import KFoldResult, head_arch, train_fold, train_kfold

TEXT_DIM, IMAGE_DIM, N_UNITS, N_NUMERIC = 12, 10, 5, 8
# Tiny versions of params.yaml's per-head sections: the shapes of the write-ups, few weights.
TINY = dataclasses.replace(
    CFG.heads,
    gated_residual=dataclasses.replace(CFG.heads.gated_residual, hidden=16),
    projection_mlp=dataclasses.replace(CFG.heads.projection_mlp, proj_dim=8, widths=(16, 8)),
    towers=dataclasses.replace(CFG.heads.towers, tower_dim=8, widths=(8,)),
    dcn=dataclasses.replace(CFG.heads.dcn, proj_dim=4, cross_layers=2, widths=(8,)),
    cross_attention=dataclasses.replace(
        CFG.heads.cross_attention, d_model=8, n_heads=2, text_tokens=2, image_tokens=2, widths=(8,)
    ),
)
TINY_CFG = dataclasses.replace(CFG, heads=TINY)
ARCHS = sorted(HEADS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_head(name: str, joint: bool = True, output: str = "affine") -> FusionHeadBase:
    """gated_residual: hidden 16 and HeadArch's default blocks and dropout (its knobs are those
    fields, `options` stay empty); the others: their TINY section as options."""
    section = getattr(TINY, name)
    arch = HeadArch(
        text_dim=TEXT_DIM,
        image_dim=IMAGE_DIM,
        n_units=N_UNITS,
        n_numeric=N_NUMERIC,
        hidden=16,
        unit_dim=4,
        arch=name,
        output=output,
        joint_dim=TEXT_DIM if joint else 0,
        options={} if name == "gated_residual" else dataclasses.asdict(section),
    )
    torch.manual_seed(0)
    head = build_head(arch)
    head.set_target_scale(2.7, 0.9, 0.5, 6.0)
    return head


def batch(n: int = 16, seed: int = 0, joint: bool = True) -> tuple[torch.Tensor, ...]:
    """Every other row has an image; the joint vector is the text's width (the joint tower)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, TEXT_DIM, generator=g),
        torch.randn(n, IMAGE_DIM, generator=g),
        torch.arange(n) % 2 == 0,
        torch.arange(n) % N_UNITS,
        torch.randn(n, N_NUMERIC, generator=g),
        torch.randn(n, TEXT_DIM if joint else 0, generator=g),
    )


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("joint", [False, True])
def test_output_shape(name: str, joint: bool) -> None:
    head = make_head(name, joint).eval()
    out = head(*batch(7, joint=joint))
    assert out.shape == (7,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_reach_every_parameter(name: str) -> None:
    """Every tower, the joint one included, and every layer after them learns from a batch
    where half the rows have an image; a NaN image on the other half reaches no gradient."""
    head = make_head(name).train()
    text, image, mask, unit, numeric, joint = batch(16)
    image = image.clone()
    image[~mask] = float("nan")
    out = head(text, image, mask, unit, numeric, joint)
    ((out - 3.0) ** 2).mean().backward()
    for param_name, param in head.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} got a NaN gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", ARCHS)
def test_masked_rows_take_exactly_the_text_only_path(name: str) -> None:
    head = make_head(name).eval()
    text, image, mask, unit, numeric, joint = batch(12)
    zeroed = torch.where(mask.unsqueeze(-1), image, 0.0)
    expected = head(text, zeroed, mask, unit, numeric, joint)
    for fill in (float("nan"), float("inf"), -1e30):
        garbage = image.clone()
        garbage[~mask] = fill
        out = head(text, garbage, mask, unit, numeric, joint)
        assert torch.equal(out, expected), (name, fill)
    # The same change on rows that do have an image must move their predictions.
    moved = image.clone()
    moved[mask] = moved[mask] * -3.0 + 1.0
    changed = head(text, moved, mask, unit, numeric, joint)
    assert (changed[mask] != expected[mask]).all()
    assert torch.equal(changed[~mask], expected[~mask])


@pytest.mark.parametrize("name", ARCHS)
def test_readouts(name: str) -> None:
    """affine: the output shifts with the target mean; sigmoid: inside [lo, hi] even for wild
    inputs, and only with the training min/max given."""
    head = make_head(name).eval()
    args = batch(10)
    first = head(*args)
    head.set_target_scale(2.7 + 5.0, 0.9)
    torch.testing.assert_close(head(*args), first + 5.0)

    bounded = make_head(name, output="sigmoid").eval()
    wild = (args[0] * 1e4, args[1] * -1e4, *args[2:4], args[4] * 1e4, args[5])
    for inputs in (args, wild):
        out = bounded(*inputs)
        assert ((out >= 0.5) & (out <= 6.0)).all(), out
    with pytest.raises(ValueError, match="min and max"):
        bounded.set_target_scale(2.7, 0.9)


def test_unknown_arch_and_option_fail_clearly() -> None:
    with pytest.raises(ValueError, match="known: cross_attention, dcn, gated_residual"):
        build_head(HeadArch(TEXT_DIM, IMAGE_DIM, N_UNITS, N_NUMERIC, arch="mlp"))
    opts = {**dataclasses.asdict(TINY.towers), "width": 3}
    with pytest.raises(ConfigError, match=r"fusion\.heads\.towers\.width"):
        build_head(HeadArch(TEXT_DIM, IMAGE_DIM, N_UNITS, N_NUMERIC, arch="towers", options=opts))
    with pytest.raises(ValueError, match=r"fusion\.output"):
        HeadArch(TEXT_DIM, IMAGE_DIM, N_UNITS, N_NUMERIC, output="softplus")


def test_joint_embedding() -> None:
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(6, 4)) * 5, rng.normal(size=(6, 4))
    mask = np.array([True, False, True, False, True, True])
    image[~mask] = np.nan
    joint = joint_embedding(text, image, mask)
    assert joint.dtype == np.float32 and np.isfinite(joint).all()
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1.0, rtol=1e-6)
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(joint[~mask], unit[~mask], rtol=1e-6)
    both = unit[mask] + image[mask] / np.linalg.norm(image[mask], axis=1, keepdims=True)
    expected = both / np.linalg.norm(both, axis=1, keepdims=True)
    np.testing.assert_allclose(joint[mask], expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"embed\.text_model and embed\.image_model"):
        joint_embedding(text, image[:, :3], mask)


def joint_data(n: int, seed: int, with_target: bool = True) -> SplitData:
    """The synthetic problem with the image vector widened to the text's (a joint model's)."""
    data = synthetic(n, seed, with_target)
    reps = -(-data.text.shape[1] // data.image.shape[1])
    image = np.tile(data.image, reps)[:, : data.text.shape[1]]
    return SplitData(data.frame, data.text, image, data.image_mask)


def test_joint_tower_inputs() -> None:
    data = joint_data(40, seed=3)
    plain = InputSpec.fit(data).build(data)
    assert plain.joint.shape == (40, 0)
    spec = InputSpec.fit(data, joint_tower=True)
    assert spec.joint_dim == data.text.shape[1]
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    inputs = spec.build(data)
    np.testing.assert_array_equal(
        inputs.joint.numpy(), joint_embedding(data.text, data.image, data.image_mask)
    )
    with pytest.raises(ValueError, match="same CLIP/SigLIP reference"):
        InputSpec.fit(synthetic(40, seed=3), joint_tower=True)


def kfold(name: str, **changes: Any) -> tuple[SplitData, SplitData, KFoldResult]:
    # A high rate and few epochs: every head gets well below the constant in about a second.
    fast = {"arch": name, "epochs": 10, "patience": 10, "lr": 1e-2, "batch_size": 64}
    cfg = dataclasses.replace(TINY_CFG, **{**fast, **changes})
    train, test = joint_data(300, seed=1), joint_data(60, seed=2, with_target=False)
    return train, test, train_kfold(train, cfg, seed=7, test=test)


@pytest.fixture(scope="module", params=ARCHS)
def trained(request) -> tuple[str, SplitData, SplitData, KFoldResult]:
    torch.set_num_threads(1)
    return (request.param, *kfold(request.param, joint_tower=True))


def test_training_beats_a_constant(trained) -> None:
    name, train, _, result = trained
    y = train.target
    constant = smape_from_log(y, np.full_like(y, np.median(y)))
    assert result.smape_oof < 0.7 * constant, (name, result.smape_oof, constant)
    assert result.predictor.folds[0].head.arch.arch == name


def test_save_load_reproduces_predictions(trained, tmp_path: Path) -> None:
    name, _, test, result = trained
    result.predictor.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == 2
    assert {fold["arch"]["arch"] for fold in manifest["folds"]} == {name}
    loaded = FusionPredictor.load(tmp_path)
    args = (test.frame, test.text, test.image, test.image_mask)
    np.testing.assert_array_equal(loaded.predict(*args), result.predictor.predict(*args))


def test_format_1_manifest_loads_as_the_gated_residual_head(tmp_path: Path) -> None:
    """A predictor saved before the heads existed: no arch name, output or joint fields."""
    _, test, result = kfold("gated_residual", epochs=1)
    result.predictor.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format"] = 1
    for fold in manifest["folds"]:
        for key in ("arch", "output", "joint_dim", "options"):
            del fold["arch"][key]
        del fold["spec"]["joint_tower"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    loaded = FusionPredictor.load(tmp_path)
    assert loaded.folds[0].head.arch == result.predictor.folds[0].head.arch
    args = (test.frame, test.text, test.image, test.image_mask)
    np.testing.assert_array_equal(loaded.predict(*args), result.predictor.predict(*args))


def test_sigmoid_readout_trains_inside_the_training_range() -> None:
    train, _, result = kfold("towers", output="sigmoid", epochs=3)
    assert result.predictor.folds[0].head.arch.output == "sigmoid"
    y = train.target
    assert np.isfinite(result.oof).all() and result.test is not None
    assert y.min() <= result.test.min() and result.test.max() <= y.max()


def test_head_arch_takes_the_chosen_heads_knobs() -> None:
    spec = InputSpec.fit(synthetic(40, seed=3))
    dcn = head_arch(dataclasses.replace(TINY_CFG, arch="dcn"), spec)
    assert dcn.options == dataclasses.asdict(TINY.dcn) and dcn.joint_dim == 0
    assert (dcn.hidden, dcn.n_blocks, dcn.dropout) == (256, 2, 0.15)  # HeadArch's, unread
    # gated_residual's knobs are HeadArch's own fields, where saved manifests have them.
    gated = head_arch(dataclasses.replace(TINY_CFG, arch="gated_residual"), spec)
    assert gated.options == {}
    assert (gated.hidden, gated.n_blocks, gated.dropout) == (16, 1, 0.1)
    assert dataclasses.asdict(TINY.gated_residual) == {"hidden": 16, "n_blocks": 1, "dropout": 0.1}


def test_a_last_batch_of_one_row_still_trains_batchnorm_heads() -> None:
    """65 training rows in batches of 64: the lone last row joins the batch before it (a
    BatchNorm layer cannot normalise one row in training mode)."""
    train, valid = synthetic(65, seed=1), synthetic(20, seed=2)
    cfg = dataclasses.replace(TINY_CFG, arch="towers", epochs=1, batch_size=64)
    model, history = train_fold(train, valid, cfg, seed=0)
    assert len(history.train_loss) == 1 and np.isfinite(model.predict(valid)).all()


def _trained_like(head: FusionHeadBase, seed: int, n_units: int) -> FusionHeadBase:
    """`head` with random weights, BatchNorm statistics and input scales (as after training), a
    unit vocabulary of `n_units`, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    arch = dataclasses.replace(head.arch, n_units=n_units)
    out = build_head(arch)
    with torch.no_grad():
        for tensor in [*out.parameters(), *out.buffers()]:
            if tensor.dtype.is_floating_point and tensor.dim() > 0:
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        out.set_target_scale(2.5 + seed / 10, 0.8, 0.4, 6.5)
    return out.eval()


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("output", ["affine", "sigmoid"])
def test_stacked_dcn_heads_answer_as_each_head(joint: bool, output: str) -> None:
    """StackedDcn (the served rows' batched forward of the fold heads) gives each fold's head
    output to float rounding: its own weights, BatchNorm statistics, input scales, unit
    vocabulary (of another size per fold), image mask and readout."""
    from pricefuse.models.fusion.heads.dcn import StackedDcn

    base = make_head("dcn", joint=joint, output=output)
    heads = [_trained_like(base, seed, n_units) for seed, n_units in enumerate((5, 3, 7))]
    inputs = [batch(9, seed=10 + k, joint=joint) for k in range(len(heads))]
    inputs = [
        (*x[:3], x[3] % head.arch.n_units, *x[4:]) for x, head in zip(inputs, heads, strict=True)
    ]
    stacked = StackedDcn(heads)(*(torch.stack(parts) for parts in zip(*inputs, strict=True)))
    with torch.inference_mode():
        for k, (head, x) in enumerate(zip(heads, inputs, strict=True)):
            torch.testing.assert_close(stacked[k], head(*x), rtol=1e-5, atol=1e-5)
    heads[0].train()
    with pytest.raises(ValueError, match="eval mode"):
        StackedDcn(heads)


def test_fusion_predictor_stacks_dcn_heads_for_few_rows_only(monkeypatch) -> None:
    """A predictor of `dcn` fold heads answers a few rows through StackedDcn and many rows head
    by head, with the same predictions to float rounding; other heads never stack."""
    from pricefuse.models.fusion import predictor as module
    from pricefuse.models.fusion.heads.dcn import StackedDcn

    data = synthetic(120, seed=5)
    cfg = dataclasses.replace(TINY_CFG, arch="dcn", epochs=2)
    result = train_kfold(data, cfg, seed=3)
    predictor = result.predictor
    assert isinstance(predictor.stacked(), StackedDcn)
    query = synthetic(20, seed=6, with_target=False)
    args = (query.frame, query.text, query.image, query.image_mask)
    stacked = predictor.predict(*args)
    monkeypatch.setattr(module, "STACKED_MAX_ROWS", 0)
    np.testing.assert_allclose(stacked, predictor.predict(*args), rtol=1e-6)
    gated = train_kfold(data, dataclasses.replace(cfg, arch="gated_residual"), seed=3)
    assert gated.predictor.stacked() is None
