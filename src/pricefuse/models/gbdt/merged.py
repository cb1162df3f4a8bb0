"""The K fold models of one booster as one native model with K outputs, for serving.

Why: a served row asked each booster's 5 fold models in turn, 15 library calls, and each call
costs a fixed setup (thread pool, input checks, output buffers) that outweighs walking a few
hundred trees for one row. A merged model answers all folds in one call.

How it stays exact: each fold keeps its own trees, leaf values and bias, and its own output
column; only the feature indices move. The merged model reads the folds' feature matrices side
by side (fold k's columns at k * n_features), because every fold's featurizer is fitted on its
own training rows (PCA bases, category codes), so fold k's trees must see fold k's features.
Fold k's output is then fold k's prediction, the same trees summed in the same order, so the
GbdtPredictor can still clip each fold before averaging (as training wrote the test
predictions); a merged sum of all folds would lose that clip.

- LightGBM: a multiclass model text with one class per fold (`num_tree_per_iteration` = K),
  predicted with `raw_score=True`; iterations where a fold has no tree any more get a single
  leaf of 0.
- XGBoost: a multi-target model (`num_target` = K, one output per tree) whose `tree_info`
  sends each tree to its fold's output; the folds' intercepts become the base-score vector.

CatBoost is not merged: its JSON export does load back, but its trees address every binary
feature (float borders and the categorical CTRs, each with its own fold's tables) by one
model-wide split index whose order CatBoost derives itself, so moving fold k's features would
mean re-deriving that order for the merged model, with nothing in CatBoost's API to check it
against. Its folds are still called one by one (on one thread for a few rows).

tests/unit/test_gbdt.py checks every output of a merged model against its fold model on random
rows with missing values and categorical codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# A LightGBM tree with one leaf of value 0: what a fold adds in iterations after its last tree.
_LGB_EMPTY_TREE = (
    "num_leaves=1\nnum_cat=0\nsplit_feature=\nsplit_gain=\nthreshold=\ndecision_type=\n"
    "left_child=\nright_child=\nleaf_value=0\nleaf_weight=\nleaf_count=\ninternal_value=\n"
    "internal_weight=\ninternal_count=\nis_linear=0\nshrinkage=1\n"
)


def _lgb_sections(text: str) -> tuple[dict[str, str], list[str]]:
    """(header key -> value, tree bodies without their `Tree=i` line) of a LightGBM model text."""
    head, _, rest = text.partition("\nTree=")
    header = dict(
        line.split("=", 1) for line in head.splitlines()[1:] if "=" in line
    )  # the first line is the model kind ("tree")
    trees_text = ("Tree=" + rest).split("end of trees", 1)[0]
    bodies = [
        body.split("\n", 1)[1].strip("\n") + "\n"
        for body in re.split(r"(?m)^(?=Tree=\d+$)", trees_text)
        if body.strip()
    ]
    return header, bodies


def _lgb_shift_features(body: str, offset: int) -> str:
    """A tree body with every split feature index moved by `offset`."""

    def shift(match: re.Match[str]) -> str:
        values = match.group(1).split()
        return "split_feature=" + " ".join(str(int(v) + offset) for v in values)

    return re.sub(r"(?m)^split_feature=(.*)$", shift, body, count=1)


def merge_lightgbm(models: Sequence[Any], n_features: int) -> Any:
    """One `lightgbm.Booster` whose raw output k (`predict(x, raw_score=True)[:, k]`) is
    `models[k].predict(x_k)`, for x = the folds' matrices side by side (n, K * n_features)."""
    import lightgbm as lgb

    folds = [_lgb_sections(model.model_to_string()) for model in models]
    for header, _ in folds:
        if header.get("num_tree_per_iteration", "1") != "1":
            raise ValueError("only single-output LightGBM models can be merged")
        if int(header["max_feature_idx"]) + 1 != n_features:
            raise ValueError("the fold models do not share one feature layout")
    k_folds = len(folds)
    rounds = max(len(bodies) for _, bodies in folds)
    trees = []
    for i in range(rounds):
        for k, (_, bodies) in enumerate(folds):
            body = _lgb_shift_features(bodies[i], k * n_features) if i < len(bodies) else None
            trees.append(body or _LGB_EMPTY_TREE)
    names = [
        f"{name}__fold{k}"
        for k, (header, _) in enumerate(folds)
        for name in header["feature_names"].split()
    ]
    infos = [info for header, _ in folds for info in header["feature_infos"].split()]
    lines = [
        "tree",
        f"version={folds[0][0]['version']}",
        f"num_class={k_folds}",
        f"num_tree_per_iteration={k_folds}",
        "label_index=0",
        f"max_feature_idx={k_folds * n_features - 1}",
        f"objective=multiclass num_class:{k_folds}",
        f"feature_names={' '.join(names)}",
        f"feature_infos={' '.join(infos)}",
        "",
    ]
    blocks = [f"Tree={t}\n{body}\n" for t, body in enumerate(trees)]
    text = "\n".join(lines) + "\n" + "\n".join(blocks) + "end of trees\n\npandas_categorical:null\n"
    return lgb.Booster(model_str=text)


def merge_xgboost(models: Sequence[Any], n_features: int) -> Any:
    """One `xgboost.Booster` whose output k (`inplace_predict(x)[:, k]`) is
    `models[k].inplace_predict(x_k)`, for x = the folds' matrices side by side."""
    import xgboost as xgb

    folds = [json.loads(bytes(model.save_raw("json"))) for model in models]
    learners = [fold["learner"] for fold in folds]
    for learner in learners:
        params = learner["learner_model_param"]
        booster = learner["gradient_booster"]
        if booster["name"] != "gbtree" or params.get("num_target", "1") != "1":
            raise ValueError("only single-output gbtree XGBoost models can be merged")
        if params.get("num_class", "0") != "0" or int(params["num_feature"]) != n_features:
            raise ValueError("the fold models do not share one single-output feature layout")
    merged = folds[0]
    learner = merged["learner"]
    trees, tree_info, indptr = [], [], [0]
    rounds = max(len(fold["gradient_booster"]["model"]["trees"]) for fold in learners)
    for i in range(rounds):
        for k, fold in enumerate(learners):
            fold_trees = fold["gradient_booster"]["model"]["trees"]
            if i >= len(fold_trees):
                continue
            tree = dict(fold_trees[i])
            tree["split_indices"] = [
                int(index) + k * n_features if int(left) != -1 else int(index)
                for index, left in zip(tree["split_indices"], tree["left_children"], strict=True)
            ]
            tree["id"] = len(trees)
            trees.append(tree)
            tree_info.append(k)
        indptr.append(len(trees))
    model = learner["gradient_booster"]["model"]
    model["trees"] = trees
    model["tree_info"] = tree_info
    model["iteration_indptr"] = indptr
    model["gbtree_model_param"] = {
        **model["gbtree_model_param"],
        "num_trees": str(len(trees)),
    }
    intercepts = [_xgb_base_scores(fold) for fold in learners]
    if any(len(values) != 1 for values in intercepts):
        raise ValueError("only single-intercept XGBoost models can be merged")
    params = learner["learner_model_param"]
    params["num_target"] = str(len(learners))
    params["num_feature"] = str(len(learners) * n_features)
    params["base_score"] = "[" + ",".join(values[0] for values in intercepts) + "]"
    learner["feature_names"] = [
        f"{name}__fold{k}" for k, fold in enumerate(learners) for name in fold["feature_names"]
    ]
    learner["feature_types"] = [t for fold in learners for t in fold["feature_types"]]
    out = xgb.Booster()
    out.load_model(bytearray(json.dumps(merged).encode()))
    return out


def _xgb_base_scores(learner: dict[str, Any]) -> list[str]:
    """A learner's intercept(s) as written in its JSON (`"[2.75E0]"` -> ["2.75E0"])."""
    raw = learner["learner_model_param"]["base_score"].strip()
    return [v for v in raw.strip("[]").split(",") if v] if raw.startswith("[") else [raw]


class MergedFolds:
    """One booster's K fold models as one merged native model (see the module docstring):
    `predict(x)` with x the folds' feature matrices side by side -> (n, K) raw fold outputs."""

    def __init__(self, name: str, native: Any, k_folds: int) -> None:
        self.name = name
        self.native = native
        self.k_folds = k_folds
        # XGBoost takes its thread count from the booster, not the call, and set_param while
        # another request predicts is not safe (nor cheap: the learner reconfigures on the next
        # call). So a second copy is configured once for one thread, for the few-row requests.
        self._one_thread = None
        if name == "xgboost":
            self._one_thread = native.copy()
            self._one_thread.set_param({"nthread": 1})

    def predict(self, x: np.ndarray, small: bool) -> np.ndarray:
        """(n, K) outputs; `small`: a few rows, predicted on one thread (the same numbers:
        each row's trees are summed in order whatever the threads)."""
        if self.name == "lightgbm":
            threads = {"num_threads": 1} if small else {}
            out = self.native.predict(x, raw_score=True, **threads)
        else:
            out = (self._one_thread if small else self.native).inplace_predict(x)
        return np.asarray(out, dtype=np.float64).reshape(len(x), self.k_folds)


MERGERS = {"lightgbm": merge_lightgbm, "xgboost": merge_xgboost}


def merge_folds(name: str, natives: Sequence[Any], n_features: int) -> MergedFolds | None:
    """The merged model of one booster's fold models, or None where that booster is not merged:
    CatBoost, a single fold (nothing to merge), or fold models of a shape the mergers do not
    handle (multi-output, other tree kinds), which are then called fold by fold as before."""
    if name not in MERGERS or len(natives) < 2:
        return None
    try:
        return MergedFolds(name, MERGERS[name](natives, n_features), len(natives))
    except ValueError:
        return None
