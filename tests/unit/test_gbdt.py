"""The three boosters behind one interface: they learn, are seeded, and round-trip through disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_tabular import embeddings, parsed_frame

from pricefuse.core.config import GbdtConfig
from pricefuse.core.metrics import smape_from_log
from pricefuse.features.fold_features import fold_features
from pricefuse.features.tabular import Embeddings, FeatureMatrix, TabularFeaturizer
from pricefuse.models.gbdt.boosters import BOOSTERS, FitOptions, booster_class
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


def test_kfold_fills_every_oof_row_and_averages_test_over_folds() -> None:
    frame, emb = parsed_frame(N), embeddings(N)
    y, folds = frame["log_price"].to_numpy(), frame["fold"].to_numpy()
    cfg = small_config(boosters=["lightgbm", "xgboost"])
    test, test_emb = parsed_frame(7, seed=9), embeddings(7, seed=9)
    sets = fold_features(frame, emb, folds, cfg, 1, test, test_emb)
    result = train_kfold_boosters(sets, y, cfg, seed=1, n_jobs=2)
    lo, hi = result.clip
    assert set(result.oof) == set(result.test) == {"lightgbm", "xgboost"}
    for name, oof in result.oof.items():
        assert oof.shape == y.shape and np.isfinite(oof).all()
        assert ((oof >= lo) & (oof <= hi)).all()
        assert sorted(result.fold_smape[name]) == [0, 1, 2, 3, 4]
        assert result.oof_smape[name] == pytest.approx(smape_from_log(y, oof))
        assert len(result.models[name]) == 5
        fold_mean = np.mean(
            [
                np.clip(m.predict(s.x_test) + offset, lo, hi)
                for m, s, offset in zip(result.models[name], sets, result.offsets, strict=True)
            ],
            0,
        )
        np.testing.assert_allclose(result.test[name], fold_mean)
        held = folds == 3
        np.testing.assert_allclose(
            oof[held],
            np.clip(result.models[name][3].predict(sets[3].x_held) + result.offsets[3], lo, hi),
        )


@pytest.mark.parametrize("name", sorted(BOOSTERS))
def test_huber_objective_reaches_the_price_level(name: str) -> None:
    """With a bounded-gradient loss the boosters fit residuals from the fold's median; without
    that, XGBoost's pseudo-Huber never left 0 in the round budget (SMAPE ~190%)."""
    frame, emb = parsed_frame(N), embeddings(N)
    frame["log_price"] += 3.0  # far from 0, like real prices
    y, folds = frame["log_price"].to_numpy(), frame["fold"].to_numpy()
    cfg = small_config(boosters=[name], objective="huber", huber_delta=0.5, n_estimators=80)
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
    assert set(before) == {"lightgbm", "xgboost", "catboost"}
    for name, values in fit.kfold.test.items():
        np.testing.assert_allclose(before[name], values)

    loaded = GbdtPredictor.load(fit.predictor.save(tmp_path / "gbdt"))
    after = loaded.predict(*args)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert sorted(p.name for p in (tmp_path / "gbdt" / "catboost").iterdir()) == [
        f"fold_{k}.cbm" for k in range(5)
    ]
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
        small_config(objective="huber", huber_delta=0.3),
        seed=2,
        n_jobs=2,
    )
    return fit.predictor, (test, test_emb.text, test_emb.image, test_emb.image_mask)


@pytest.mark.parametrize("name", ["lightgbm", "xgboost"])
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
