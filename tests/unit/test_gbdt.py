"""The three boosters behind one interface: they learn, are seeded, and round-trip through disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_tabular import embeddings, parsed_frame

from pricefuse.core.config import ConfigError, GbdtConfig
from pricefuse.core.metrics import smape_from_log
from pricefuse.features.fold_features import fold_features
from pricefuse.features.tabular import Embeddings, FeatureMatrix, TabularFeaturizer
from pricefuse.models.gbdt.boosters import (
    BOOSTERS,
    FitOptions,
    MemberKind,
    booster_class,
    member_kind,
    member_view,
    view_columns,
    xgboost_params,
)
from pricefuse.models.gbdt.predictor import GbdtPredictor
from pricefuse.models.gbdt.training import fit_gbdt, train_kfold_boosters
from tests.support import project_params

N = 400


def small_config(**overrides: object) -> GbdtConfig:
    gbdt = {
        "n_estimators": 200,
        "learning_rate": 0.15,
        "early_stopping_rounds": 20,
        "max_bin": 63,
        "text_pca": 3,
        "image_pca": 2,
        "objective": "l2",
        **overrides,
    }
    return project_params(gbdt=gbdt).gbdt


@pytest.fixture(scope="module")
def data() -> tuple[FeatureMatrix, np.ndarray, np.ndarray]:
    frame, emb = parsed_frame(N), embeddings(N)
    x = TabularFeaturizer(3, 2, seed=0).fit(frame, emb).transform(frame, emb)
    return x, frame["log_price"].to_numpy(), frame["fold"].to_numpy()


def fit_one(name: str, x: FeatureMatrix, y: np.ndarray, held: np.ndarray, seed: int = 0):
    options = FitOptions(small_config(), seed=seed, n_jobs=2)
    return booster_class(name)().fit(x.take(~held), y[~held], x.take(held), y[held], options)


@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_booster_beats_the_median_and_round_trips(name: str, data, tmp_path: Path) -> None:
    x, y, folds = data
    held = folds == 0
    model = fit_one(name, x, y, held)
    predicted = model.predict(x.take(held))
    baseline = smape_from_log(y[held], np.full(held.sum(), np.median(y[~held])))
    assert smape_from_log(y[held], predicted) < 0.5 * baseline
    assert 0 < model.best_iteration <= 200

    importance = model.feature_importance()
    assert importance.shape == (len(x.names),)
    assert importance.sum() == pytest.approx(1.0)
    assert importance[x.names.index("log_quantity_times_pack")] > 0

    loaded = booster_class(name).load(model.save(tmp_path / f"model{model.suffix}"))
    np.testing.assert_array_equal(loaded.predict(x.take(held)), predicted)

    same_seed = fit_one(name, x, y, held)
    np.testing.assert_array_equal(same_seed.predict(x.take(held)), predicted)
    other_seed = fit_one(name, x, y, held, seed=1)
    assert not np.array_equal(other_seed.predict(x.take(held)), predicted)


@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_unknown_category_and_missing_values_predict(name: str, data) -> None:
    x, y, folds = data
    model = fit_one(name, x, y, folds == 0)
    odd = x.take(np.arange(5)).values.copy()
    odd[:, list(x.categorical)] = np.nan
    odd[:, x.names.index("value")] = np.nan
    predicted = model.predict(FeatureMatrix(odd, x.names, x.categorical))
    assert predicted.shape == (5,) and np.isfinite(predicted).all()


def test_catboost_predicts_from_the_object_array_as_from_the_frame(data) -> None:
    """Serving feeds CatBoost an object array (`_rows`, 10x cheaper per row) where training
    feeds a DataFrame (`_frame`): the same predictions, unknown/missing codes included."""
    x, y, folds = data
    model = fit_one("catboost", x, y, folds == 0)
    odd = x.take(np.arange(12)).values.copy()
    odd[:3, list(x.categorical)] = np.nan
    odd[3, x.categorical[0]] = 999.0  # a code no tree has seen
    odd[4, x.names.index("value")] = np.nan
    rows = FeatureMatrix(odd, x.names, x.categorical)
    from_frame = model.native.predict(model._frame(rows))
    np.testing.assert_array_equal(model.predict(rows), from_frame)
    np.testing.assert_array_equal(model.predict(x), model.native.predict(model._frame(x)))


def test_xgboost_inplace_predict_matches_the_dmatrix_path(data) -> None:
    """Serving predicts XGBoost in place on the values; training built a DMatrix with the
    categorical feature types: the same predictions, unknown/missing codes included, and a
    matrix with other feature names is refused as the DMatrix path refused it."""
    x, y, folds = data
    model = fit_one("xgboost", x, y, folds == 0)
    odd = x.take(np.arange(12)).values.copy()
    odd[:3, list(x.categorical)] = np.nan
    odd[3, x.categorical[0]] = 999.0
    odd[4, x.names.index("value")] = np.nan
    for rows in (FeatureMatrix(odd, x.names, x.categorical), x, x.take(np.arange(1))):
        through_dmatrix = model.native.predict(model._matrix(rows))
        np.testing.assert_array_equal(model.predict(rows), through_dmatrix)
    renamed = FeatureMatrix(odd, ("other", *x.names[1:]), x.categorical)
    with pytest.raises(ValueError, match="expects"):
        model.predict(renamed)


@pytest.mark.parametrize("n", [1, 4, 5])
def test_lightgbm_one_thread_small_inputs_predict_as_the_pool(data, n: int) -> None:
    """Up to SMALL_PREDICT_ROWS rows predict on one thread: the same values as on the pool."""
    x, y, folds = data
    model = fit_one("lightgbm", x, y, folds == 0)
    rows = x.take(np.arange(n))
    np.testing.assert_array_equal(model.predict(rows), model.native.predict(rows.values))


def test_unknown_booster_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="lightgbm"):
        booster_class("randomforest")


def log_quantity_of(x: FeatureMatrix) -> np.ndarray:
    """The features' log1p quantity, 0 where unknown: what a per-unit member's target omits."""
    column = x.values[:, x.names.index("log_quantity")].astype(np.float64)
    return np.nan_to_num(column, nan=0.0)


def test_kfold_fills_every_oof_row_and_averages_test_over_folds() -> None:
    """Every member (the per-unit `xgboost_unit` too) predicts clip(model + offset + b) with b
    = log1p(quantity) for a per-unit member (0 otherwise), on OOF and test rows alike."""
    frame, emb = parsed_frame(N), embeddings(N)
    y, folds = frame["log_price"].to_numpy(), frame["fold"].to_numpy()
    cfg = small_config(
        boosters=["lightgbm", "xgboost"], unit_price_boosters=["xgboost"], own_view_boosters=[]
    )
    test, test_emb = parsed_frame(7, seed=9), embeddings(7, seed=9)
    test.loc[0, ["value", "quantity", "log_quantity"]] = np.nan  # b = 0 on this row
    sets = fold_features(frame, emb, folds, cfg, 1, test, test_emb)
    result = train_kfold_boosters(sets, y, cfg, seed=1, n_jobs=2)
    lo, hi = result.clip
    members = {"lightgbm", "xgboost", "xgboost_unit"}
    assert set(result.oof) == set(result.test) == set(result.offsets) == members
    for name, oof in result.oof.items():
        per_unit = name.endswith("_unit")

        def b(x: FeatureMatrix, per_unit: bool = per_unit) -> np.ndarray | float:
            return log_quantity_of(x) if per_unit else 0.0

        assert oof.shape == y.shape and np.isfinite(oof).all()
        assert ((oof >= lo) & (oof <= hi)).all()
        assert sorted(result.fold_smape[name]) == [0, 1, 2, 3, 4]
        assert result.oof_smape[name] == pytest.approx(smape_from_log(y, oof))
        assert len(result.models[name]) == 5
        offsets = result.offsets[name]
        for s, offset in zip(sets, offsets, strict=True):
            assert offset == pytest.approx(np.median(y[~s.held] - b(s.x_fit)))
        fold_mean = np.mean(
            [
                np.clip(m.predict(s.x_test) + offset + b(s.x_test), lo, hi)
                for m, s, offset in zip(result.models[name], sets, offsets, strict=True)
            ],
            0,
        )
        np.testing.assert_allclose(result.test[name], fold_mean)
        held = folds == 3
        x_held = sets[3].x_held
        np.testing.assert_allclose(
            oof[held],
            np.clip(result.models[name][3].predict(x_held) + offsets[3] + b(x_held), lo, hi),
        )
    # b matters: most rows have a quantity, and leaving it out would move the predictions.
    x_held = sets[3].x_held
    assert (log_quantity_of(x_held) > 0.5).mean() > 0.5
    without_b = np.clip(
        result.models["xgboost_unit"][3].predict(x_held) + result.offsets["xgboost_unit"][3],
        lo,
        hi,
    )
    assert np.abs(result.oof["xgboost_unit"][folds == 3] - without_b).mean() > 0.5
    assert result.offsets["xgboost_unit"] != result.offsets["xgboost"]


@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_huber_objective_reaches_the_price_level(name: str) -> None:
    """With a bounded-gradient loss the boosters fit residuals from the fold's median; without
    that, XGBoost's pseudo-Huber never left 0 in the round budget (SMAPE ~190%)."""
    frame, emb = parsed_frame(N), embeddings(N)
    frame["log_price"] += 3.0  # far from 0, like real prices
    y, folds = frame["log_price"].to_numpy(), frame["fold"].to_numpy()
    cfg = small_config(
        boosters=[name],
        unit_price_boosters=[],
        own_view_boosters=[],
        objective="huber",
        huber_delta=0.5,
        n_estimators=80,
    )
    result = train_kfold_boosters(fold_features(frame, emb, folds, cfg, 0), y, cfg, 0, n_jobs=2)
    baseline = smape_from_log(y, np.full_like(y, np.median(y)))
    assert result.oof_smape[name] < 0.5 * baseline, result.oof_smape


def test_kfold_rejects_rows_without_a_fold() -> None:
    frame, emb = parsed_frame(60), embeddings(60)
    folds = frame["fold"].to_numpy()
    with pytest.raises(ValueError, match="folds"):
        fold_features(frame, emb, np.where(folds == 0, -1, folds), small_config(), seed=0)


def test_fold_features_never_see_the_held_fold() -> None:
    """The featurizer of fold k is fitted without fold k: changing the *other* rows of fold 0
    (text embeddings, images, units) leaves row r's fold-0 features unchanged, while the same
    change to fold-1 rows moves them (so the check can fail)."""
    frame, emb = parsed_frame(N), embeddings(N)
    folds = frame["fold"].to_numpy()
    cfg = small_config()
    r = int(np.flatnonzero(folds == 0)[0])

    def features_of_r(rows: np.ndarray) -> np.ndarray:
        changed_frame = frame.copy()
        text, image = emb.text.copy(), emb.image.copy()
        rng = np.random.default_rng(11)
        text[rows] = rng.normal(size=text[rows].shape) * 5
        image[rows] = rng.normal(size=image[rows].shape) * 5
        changed_frame.loc[rows, "unit"] = "rare_unit"
        changed = Embeddings(text, image, emb.image_mask)
        sets = fold_features(changed_frame, changed, folds, cfg, seed=0)
        position = int(np.flatnonzero(np.flatnonzero(folds == 0) == r)[0])
        return sets[0].x_held.values[position]

    baseline = features_of_r(np.array([], dtype=int))
    fold0_others = np.setdiff1d(np.flatnonzero(folds == 0), [r])
    np.testing.assert_array_equal(features_of_r(fold0_others), baseline)
    assert not np.allclose(features_of_r(np.flatnonzero(folds == 1)), baseline, equal_nan=True)


def test_predictor_save_load_gives_identical_predictions(tmp_path: Path) -> None:
    train, test = parsed_frame(200, seed=4), parsed_frame(30, seed=5)
    train_emb, test_emb = embeddings(200, seed=4), embeddings(30, seed=5)
    test.loc[0, "unit"] = "unseen_unit"
    fit = fit_gbdt(
        train,
        train_emb,
        train["log_price"].to_numpy(),
        train["fold"].to_numpy(),
        small_config(n_estimators=60),
        seed=3,
        test=test,
        test_emb=test_emb,
        n_jobs=2,
    )
    args = (test, test_emb.text, test_emb.image, test_emb.image_mask)
    before = fit.predictor.predict(*args)
    assert set(before) == {"lightgbm", "xgboost", "catboost", "lightgbm_unit", "lightgbm_own"}
    for name, values in fit.kfold.test.items():
        np.testing.assert_allclose(before[name], values)

    loaded = GbdtPredictor.load(fit.predictor.save(tmp_path / "gbdt"))
    after = loaded.predict(*args)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert sorted(p.name for p in (tmp_path / "gbdt" / "catboost").iterdir()) == [
        f"fold_{k}.cbm" for k in range(5)
    ]
    assert sorted(p.name for p in (tmp_path / "gbdt" / "lightgbm_unit").iterdir()) == [
        f"fold_{k}.txt" for k in range(5)
    ]
    members = json.loads((tmp_path / "gbdt" / "gbdt.json").read_text())["members"]
    assert {name: (m["booster"], m["per_unit"], m["own_view"]) for name, m in members.items()} == {
        "lightgbm": ("lightgbm", False, False),
        "xgboost": ("xgboost", False, False),
        "catboost": ("catboost", False, False),
        "lightgbm_unit": ("lightgbm", True, False),
        "lightgbm_own": ("lightgbm", False, True),
    }
    assert members["lightgbm_unit"]["offsets"] == fit.kfold.offsets["lightgbm_unit"]
    # Nothing pickled: featurizers are JSON + .npy, boosters their libraries' own formats.
    suffixes = {p.suffix for p in (tmp_path / "gbdt").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".npy", ".txt", ".ubj", ".cbm"}, suffixes


def test_a_predictor_saved_with_pickled_featurizers_asks_for_a_rerun(tmp_path: Path) -> None:
    manifest = {
        "featurizers": ["featurizer_0.joblib"],
        "clip": [0, 1],
        "offsets": [0],
        "models": {},
    }
    (tmp_path / "gbdt.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="re-run train_gbdt"):
        GbdtPredictor.load(tmp_path)


@pytest.fixture(scope="module")
def fold_fit():
    """A 5-fold fit whose folds stop at different rounds (so a merge must pad), and query rows
    with missing values, an unseen unit and a few images."""
    train, test = parsed_frame(300, seed=6), parsed_frame(40, seed=7)
    train_emb, test_emb = embeddings(300, seed=6), embeddings(40, seed=7)
    test.loc[0, "unit"] = "unseen_unit"
    test.loc[1, ["value", "quantity", "log_quantity"]] = np.nan
    fit = fit_gbdt(
        train,
        train_emb,
        train["log_price"].to_numpy(),
        train["fold"].to_numpy(),
        small_config(
            objective="huber", huber_delta=0.3, unit_price_boosters=["lightgbm", "xgboost"]
        ),
        seed=2,
        n_jobs=2,
    )
    return fit.predictor, (test, test_emb.text, test_emb.image, test_emb.image_mask)


@pytest.mark.parametrize("name", ["lightgbm", "xgboost", "lightgbm_unit", "xgboost_unit"])
def test_merged_fold_models_answer_each_fold_exactly(name: str, fold_fit) -> None:
    """Output k of the merged model is fold k's own prediction, bit for bit, on each fold's
    features side by side (random values, NaNs, every category code and unknown ones)."""
    predictor, _ = fold_fit
    models = predictor.models[name]
    assert len({model.best_iteration for model in models}) > 1  # padding is exercised
    merged = predictor.merged_folds()[name]
    assert merged is not None and merged.k_folds == len(models)
    names = predictor.featurizers[0].names
    categorical = predictor.featurizers[0].categorical
    rng = np.random.default_rng(0)
    xs = []
    for _ in models:
        values = rng.normal(0, 3, size=(64, len(names))).astype(np.float32)
        values[:, list(categorical)] = rng.integers(0, 6, size=(64, len(categorical)))
        values[rng.random(values.shape) < 0.1] = np.nan
        xs.append(FeatureMatrix(values, names, categorical))
    side_by_side = np.hstack([x.values for x in xs])
    for small in (True, False):
        rows = side_by_side[:2] if small else side_by_side
        out = merged.predict(rows, small=small)
        for k, (model, x) in enumerate(zip(models, xs, strict=True)):
            np.testing.assert_array_equal(out[:, k], model.predict(x.take(slice(0, len(rows)))))


def test_served_rows_through_merged_models_equal_the_fold_by_fold_path(fold_fit, monkeypatch):
    """GbdtPredictor.predict gives the same numbers through the merged models (a few rows, as
    served) as calling every fold model (the path of large inputs); CatBoost is not merged."""
    from pricefuse.models.gbdt import predictor as module

    predictor, args = fold_fit
    assert predictor.merged_folds()["catboost"] is None
    assert {"lightgbm_unit", "xgboost_unit"} <= set(predictor.models)
    rows = np.arange(module.MERGED_MAX_ROWS)  # a request small enough for the merged models
    args = (args[0].iloc[rows], *(a[rows] for a in args[1:]))
    merged = predictor.predict(*args)
    single = [predictor.predict(args[0].iloc[[i]], *(a[[i]] for a in args[1:])) for i in (0, 1)]
    monkeypatch.setattr(module, "MERGED_MAX_ROWS", 0)
    fold_by_fold = predictor.predict(*args)
    for name in predictor.models:
        np.testing.assert_array_equal(merged[name], fold_by_fold[name])
        np.testing.assert_array_equal([s[name][0] for s in single], fold_by_fold[name][:2])


def test_only_multi_fold_lightgbm_and_xgboost_models_merge(fold_fit) -> None:
    from pricefuse.models.gbdt.merged import merge_folds

    predictor, _ = fold_fit
    width = len(predictor.featurizers[0].names)
    natives = {name: [m.native for m in models] for name, models in predictor.models.items()}
    assert merge_folds("catboost", natives["catboost"], width) is None
    assert merge_folds("lightgbm", natives["lightgbm"][:1], width) is None
    assert merge_folds("xgboost", natives["xgboost"], width + 1) is None  # another layout


def test_unit_members_serve_model_plus_offset_plus_log_quantity(fold_fit, monkeypatch) -> None:
    """A served `_unit` member is the fold mean of clip(model + offset + log1p quantity), b = 0
    where the quantity is unknown, through the merged models and fold by fold; a plain member of
    the same kind has no b."""
    from pricefuse.models.gbdt import predictor as module

    predictor, args = fold_fit
    rows = np.arange(module.MERGED_MAX_ROWS)
    args = (args[0].iloc[rows], *(a[rows] for a in args[1:]))
    emb = Embeddings(args[1], args[2], args[3])
    xs = [f.transform(args[0], emb) for f in predictor.featurizers]
    assert log_quantity_of(xs[0])[1] == 0.0 and (log_quantity_of(xs[0]) > 0).sum() > 10
    lo, hi = predictor.clip
    for monkey_rows in (module.MERGED_MAX_ROWS, 0):  # merged, then fold by fold
        monkeypatch.setattr(module, "MERGED_MAX_ROWS", monkey_rows)
        served = predictor.predict(*args)
        for name in ("lightgbm_unit", "xgboost_unit", "lightgbm"):
            per_unit = name.endswith("_unit")
            expected = np.mean(
                [
                    np.clip(m.predict(x) + o + (log_quantity_of(x) if per_unit else 0.0), lo, hi)
                    for m, x, o in zip(
                        predictor.models[name], xs, predictor.offsets[name], strict=True
                    )
                ],
                0,
            )
            np.testing.assert_allclose(served[name], expected, rtol=0, atol=1e-12)


def _assert_same_answers_on_both_paths(predictor, loaded, args, monkeypatch) -> None:
    """`loaded` answers every member of `predictor` bit for bit: 5 rows (the merged models), 40
    rows (fold by fold), and the 5 rows again with merging off."""
    from pricefuse.models.gbdt import predictor as module

    small = (args[0].iloc[:5], *(a[:5] for a in args[1:]))
    for rows in (small, args):  # 5 rows: merged; 40 rows: fold by fold
        before, after = predictor.predict(*rows), loaded.predict(*rows)
        assert set(after) == set(predictor.models)
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])
    monkeypatch.setattr(module, "MERGED_MAX_ROWS", 0)
    fold_by_fold = loaded.predict(*small)
    for name, values in predictor.predict(*small).items():
        np.testing.assert_array_equal(fold_by_fold[name], values)


def test_save_load_round_trip_of_unit_members_through_both_paths(
    fold_fit, tmp_path: Path, monkeypatch
) -> None:
    """A saved and reloaded predictor answers every member (the `_unit` ones too) bit for bit,
    on a request small enough for the merged models and on the fold-by-fold path."""

    predictor, args = fold_fit
    loaded = GbdtPredictor.load(predictor.save(tmp_path / "gbdt"))
    assert loaded.kinds == predictor.kinds
    assert loaded.kinds["xgboost_unit"] == MemberKind("xgboost", per_unit=True)
    assert loaded.offsets == predictor.offsets
    assert loaded.merged_folds()["lightgbm_unit"] is not None
    assert loaded.merged_folds()["xgboost_unit"] is not None
    _assert_same_answers_on_both_paths(predictor, loaded, args, monkeypatch)


def test_a_manifest_without_member_kinds_still_loads(fold_fit, tmp_path: Path) -> None:
    """A model saved before per-unit members (no `members` in gbdt.json, one `offsets` list for
    every booster) loads as plain boosters named by their kind."""
    predictor, args = fold_fit
    plain = {name: predictor.models[name] for name in ("lightgbm", "xgboost", "catboost")}
    shared = predictor.offsets["lightgbm"]
    old = GbdtPredictor(predictor.featurizers, plain, predictor.clip, shared)
    model_dir = old.save(tmp_path / "gbdt")
    manifest = json.loads((model_dir / "gbdt.json").read_text())
    del manifest["members"]
    manifest["offsets"] = shared
    (model_dir / "gbdt.json").write_text(json.dumps(manifest))
    loaded = GbdtPredictor.load(model_dir)
    assert loaded.kinds == {name: MemberKind(name) for name in plain}
    before, after = old.predict(*args), loaded.predict(*args)
    for name in plain:
        np.testing.assert_array_equal(after[name], before[name])


def test_member_kind_reads_a_member_name_back() -> None:
    assert member_kind("lightgbm") == MemberKind("lightgbm", per_unit=False, own_view=False)
    assert member_kind("lightgbm_unit") == MemberKind("lightgbm", per_unit=True)
    assert member_kind("catboost_unit") == MemberKind("catboost", per_unit=True)
    assert member_kind("xgboost_own") == MemberKind("xgboost", own_view=True)
    for name in ("randomforest_unit", "randomforest_own"):
        with pytest.raises(ValueError, match="unknown booster 'randomforest'"):
            member_kind(name)


def test_unknown_unit_price_booster_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"gbdt\.unit_price_boosters.*'randomforest'.*lightgbm"):
        small_config(unit_price_boosters=["lightgbm", "randomforest"])
    with pytest.raises(ConfigError, match="more than once"):
        small_config(unit_price_boosters=["xgboost", "xgboost"])
    none = small_config(unit_price_boosters=[], own_view_boosters=[])
    assert none.members == none.boosters


def test_the_member_registry_lists_the_unit_members() -> None:
    from pricefuse.pipeline.members import producer_of, selected_members

    params = project_params()
    assert params.gbdt.unit_price_boosters == ("lightgbm",)
    assert params.gbdt.own_view_boosters == ("lightgbm",)
    assert params.gbdt.members == (*params.gbdt.boosters, "lightgbm_unit", "lightgbm_own")
    assert producer_of("lightgbm_own", params).name == "gbdt"
    assert "lightgbm_own" in selected_members(params)
    assert producer_of("lightgbm_unit", params).name == "gbdt"
    assert "lightgbm_unit" in selected_members(params)
    both = project_params(gbdt={"unit_price_boosters": ["xgboost", "catboost"]})
    assert producer_of("catboost_unit", both).name == "gbdt"


def test_xgboost_huber_starts_from_the_fold_median(fold_fit) -> None:
    """Targets are centred on the fold median, so the pseudo-Huber model's base_score is 0.0
    (set, not estimated by XGBoost); squared error is left as it was."""
    from pricefuse.models.gbdt.merged import _xgb_base_scores

    assert xgboost_params(FitOptions(small_config(objective="huber"), seed=0))["base_score"] == 0.0
    assert "base_score" not in xgboost_params(FitOptions(small_config(objective="l2"), seed=0))
    predictor, _ = fold_fit  # trained with objective huber
    for name in ("xgboost", "xgboost_unit"):
        for model in predictor.models[name]:
            learner = json.loads(bytes(model.native.save_raw("json")))["learner"]
            assert [float(v) for v in _xgb_base_scores(learner)] == [0.0]


# Own-view members (`<booster>_own`, gbdt.own_view_boosters): trained without the stacked
# `member_*` and neighbour `nbr_*` columns (tabular.EXTRA_PREFIXES, spelled out here).
EXTRA = ("member_", "nbr_")


def with_extra_columns(frame, seed: int):
    """`frame` with a stacked member column that nearly gives the price away (so the plain
    boosters lean on it) and a neighbour-price column, as the boosters' table has them."""
    rng = np.random.default_rng(seed)
    log_price = frame["log_price"].to_numpy()
    return frame.assign(
        member_linear=log_price + rng.normal(0, 0.02, len(frame)),
        nbr_text_mean=log_price + rng.normal(0, 0.3, len(frame)),
    )


@pytest.fixture(scope="module")
def own_fit():
    """A 5-fold fit of plain and own-view LightGBM and XGBoost members on a table with
    `member_*` / `nbr_*` columns, with test rows (so kfold.test can be compared to serving)."""
    train = with_extra_columns(parsed_frame(300, seed=6), seed=1)
    test = with_extra_columns(parsed_frame(40, seed=7), seed=2)
    train_emb, test_emb = embeddings(300, seed=6), embeddings(40, seed=7)
    cfg = small_config(
        boosters=["lightgbm", "xgboost"],
        unit_price_boosters=[],
        own_view_boosters=["lightgbm", "xgboost"],
    )
    assert cfg.members == ("lightgbm", "xgboost", "lightgbm_own", "xgboost_own")
    fit = fit_gbdt(
        train,
        train_emb,
        train["log_price"].to_numpy(),
        train["fold"].to_numpy(),
        cfg,
        seed=2,
        test=test,
        test_emb=test_emb,
        n_jobs=2,
    )
    return fit, (test, test_emb.text, test_emb.image, test_emb.image_mask)


def test_view_columns_drop_member_and_neighbour_columns_and_renumber_categoricals() -> None:
    names = ("value", "member_linear", "unit", "nbr_text_mean", "type_code", "text_pc0")
    values = np.arange(12, dtype=np.float32).reshape(2, 6)
    x = FeatureMatrix(values, names, (2, 4))
    assert view_columns(names, own_view=False) is None
    assert view_columns(names, own_view=True) == [0, 2, 4, 5]
    assert member_view(x, MemberKind("lightgbm")) is x
    own = member_view(x, MemberKind("lightgbm", own_view=True))
    assert own.names == ("value", "unit", "type_code", "text_pc0")
    assert [own.names[i] for i in own.categorical] == ["unit", "type_code"]
    np.testing.assert_array_equal(own.values, values[:, [0, 2, 4, 5]])


def test_own_view_models_never_see_member_or_neighbour_columns(own_fit) -> None:
    """Each fold model of an own-view member was trained on the features less every
    `member_*` / `nbr_*` column (its native feature names and width say so), while the plain
    member of the same kind read them; importance and its plot labels follow each member's
    own columns, and the MLflow flavor is the booster's."""
    from pricefuse.models.gbdt.member import flavor_models, kfold_plots

    fit, _ = own_fit
    kfold, predictor = fit.kfold, fit.predictor
    full = predictor.featurizers[0].names
    assert {"member_linear", "nbr_text_mean"} <= set(full)
    own = tuple(n for n in full if not n.startswith(EXTRA))
    assert len(own) == len(full) - 2

    def native_names(name: str) -> list[tuple[str, ...]]:
        models = predictor.models[name]
        if name.startswith("lightgbm"):
            return [tuple(m.native.feature_name()) for m in models]
        return [tuple(m.native.feature_names) for m in models]

    for kind in ("lightgbm", "xgboost"):
        assert native_names(f"{kind}_own") == [own] * 5
        assert native_names(kind) == [full] * 5
        assert kfold.features_of(f"{kind}_own") == own and kfold.features_of(kind) == full
        assert kfold.importance[f"{kind}_own"].shape == (len(own),)
        assert predictor.kinds[f"{kind}_own"] == MemberKind(kind, own_view=True)
    # the plain members do lean on the stacked column, so its absence is a real difference
    assert kfold.importance["lightgbm"][full.index("member_linear")] > 0.2

    plots = {
        p.name: p for p in kfold_plots(kfold, parsed_frame(300, seed=6)["log_price"].to_numpy())
    }
    for name in ("lightgbm_own", "xgboost_own", "lightgbm"):
        bars = plots[f"importance_{name}"].frame
        names, gains = kfold.features_of(name), kfold.importance[name]
        assert list(bars["label"]) == [names[i] for i in np.argsort(gains)[::-1][: len(bars)]]
    assert not any(
        label.startswith(EXTRA) for label in plots["importance_lightgbm_own"].frame["label"]
    )
    assert plots["importance_lightgbm"].frame["label"].iloc[0] == "member_linear"
    flavors = {name: m.flavor for name, m in flavor_models(kfold).items()}
    assert flavors["lightgbm_own_fold0"] == "mlflow.lightgbm"
    assert flavors["xgboost_own_fold0"] == "mlflow.xgboost"


def test_own_view_predictions_ignore_member_and_neighbour_columns(own_fit, monkeypatch) -> None:
    """Changing a query row's `member_*` (or `nbr_*`) value moves the plain members' served
    prediction but leaves the own-view members' unchanged, through the merged models and fold
    by fold alike, and the served own-view prediction is the one training wrote for the test
    rows (the same column subset on both sides)."""
    from pricefuse.models.gbdt import predictor as module

    fit, args = own_fit
    predictor = fit.predictor
    for name in ("lightgbm_own", "xgboost_own"):
        assert predictor.merged_folds()[name] is not None  # merged on the subset's width
    served = predictor.predict(*args)  # 40 rows: fold by fold
    for name, values in fit.kfold.test.items():
        np.testing.assert_allclose(served[name], values, rtol=0, atol=1e-12)

    rows = np.arange(module.MERGED_MAX_ROWS)
    small = (args[0].iloc[rows].reset_index(drop=True), *(a[rows] for a in args[1:]))
    for column in ("member_linear", "nbr_text_mean"):
        changed_table = small[0].assign(**{column: small[0][column] + 1.5})
        changed = (changed_table, *small[1:])
        outputs = []
        for limit in (module.MERGED_MAX_ROWS, 0):  # merged, then fold by fold
            monkeypatch.setattr(module, "MERGED_MAX_ROWS", limit)
            before, after = predictor.predict(*small), predictor.predict(*changed)
            for kind in ("lightgbm", "xgboost"):
                np.testing.assert_array_equal(after[f"{kind}_own"], before[f"{kind}_own"])
            outputs.append(before)
        if column == "member_linear":
            for kind in ("lightgbm", "xgboost"):
                assert np.abs(after[kind] - before[kind]).max() > 0.1, kind
        for name in predictor.models:  # the merged models answer as the fold models
            np.testing.assert_array_equal(outputs[0][name], outputs[1][name])


def test_own_view_save_load_round_trip_through_both_paths(
    own_fit, tmp_path: Path, monkeypatch
) -> None:
    """A saved and reloaded predictor keeps each member's view (recorded in gbdt.json) and
    answers every member bit for bit, merged (a few rows) and fold by fold; a manifest written
    before own-view members (no `own_view`) loads its members as full-view ones."""

    fit, args = own_fit
    predictor = fit.predictor
    model_dir = predictor.save(tmp_path / "gbdt")
    manifest = json.loads((model_dir / "gbdt.json").read_text())
    assert {name: m["own_view"] for name, m in manifest["members"].items()} == {
        "lightgbm": False,
        "xgboost": False,
        "lightgbm_own": True,
        "xgboost_own": True,
    }
    loaded = GbdtPredictor.load(model_dir)
    assert loaded.kinds == predictor.kinds
    assert loaded.merged_folds()["lightgbm_own"] is not None
    assert loaded.merged_folds()["xgboost_own"] is not None
    _assert_same_answers_on_both_paths(predictor, loaded, args, monkeypatch)

    for name in ("lightgbm", "xgboost"):
        del manifest["members"][name]["own_view"]
    (model_dir / "gbdt.json").write_text(json.dumps(manifest))
    assert GbdtPredictor.load(model_dir).kinds == predictor.kinds


def test_unknown_own_view_booster_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"gbdt\.own_view_boosters.*'randomforest'.*lightgbm"):
        small_config(own_view_boosters=["lightgbm", "randomforest"])
    with pytest.raises(ConfigError, match=r"gbdt\.own_view_boosters lists.*more than once"):
        small_config(own_view_boosters=["catboost", "catboost"])
    cfg = small_config(boosters=["xgboost"], unit_price_boosters=[], own_view_boosters=["catboost"])
    assert cfg.members == ("xgboost", "catboost_own")
