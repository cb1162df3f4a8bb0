"""What the fusion head sees of a split, and what is learnt from training rows before it.

Flow: `SplitData` (parsed table + embedding arrays, as the stages and the serving model hold
them) -> `InputSpec.fit` on a fold's training rows (unit vocabulary, numeric scaler, clip range)
-> `InputSpec.build` -> `FusionInputs` (tensors) -> a fusion head (pricefuse.models.fusion.heads).

Why a spec per fold, fit on that fold's training rows only: the validation rows then see the
model exactly as test rows will — a unit that only occurs in the validation fold maps to <unk>
just like a unit only seen at serving time, so out-of-fold SMAPE is an honest estimate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pricefuse.features.joint_embedding import check_joint_dims, joint_embedding

if TYPE_CHECKING:
    from pricefuse.pipeline.members import MemberBatch

UNK = "<unk>"
# A unit seen fewer times than this in training shares the <unk> embedding. Why: <unk> must be
# trained on something that resembles "a unit we know little about", and one row cannot fit an
# embedding of its own anyway.
MIN_UNIT_COUNT = 2
# Parsed-table columns the numeric features come from (docs/architecture.md: parse_frame).
NUMERIC_SOURCE_COLUMNS = (
    "log_quantity",
    "pack",
    "value",
    "value_missing",
    "unit_missing",
    "n_bullets",
    "text_len",
)
NUMERIC_FEATURES = (
    "log_quantity",
    "log_pack",
    "log_value",
    "value_missing",
    "unit_missing",
    "has_image",
    "log_n_bullets",
    "log_text_len",
)
# What the ablation can leave out: text embedding, image embedding, tabular (unit + numeric,
# neighbour features included).
MODALITY_GROUPS = ("text", "image", "tabular")
# Numeric columns taken as they are when the table has them: neighbour-price features and
# stacked member predictions (both in log-price units).
EXTRA_PREFIXES = ("nbr_", "member_")
UNIT_COLUMN = "unit"
TARGET_COLUMN = "log_price"
# Hard bounds on any log1p prediction ($0.01 .. $100k); the per-fold clip range from the
# training targets is applied inside these.
LOG_PRICE_BOUNDS = (math.log1p(0.01), math.log1p(100_000.0))


@dataclass(frozen=True)
class SplitData:
    """One split as stored on disk: parsed rows and the embedding arrays in the same row order."""

    frame: pd.DataFrame
    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.frame)
        if self.text.ndim != 2 or self.image.ndim != 2:
            raise ValueError(
                f"embeddings must be 2-D, got text {self.text.shape}, image {self.image.shape}"
            )
        shapes = {
            "text": self.text.shape[0],
            "image": self.image.shape[0],
            "image_mask": len(self.image_mask),
        }
        wrong = {k: v for k, v in shapes.items() if v != n}
        if wrong:
            raise ValueError(f"{n} parsed rows but row counts {wrong} (row order must match)")
        missing = [c for c in (UNIT_COLUMN, *NUMERIC_SOURCE_COLUMNS) if c not in self.frame]
        if missing:
            raise ValueError(f"parsed table lacks column(s) {', '.join(missing)}")
        if not np.isfinite(self.text).all():
            raise ValueError("text embeddings contain NaN or inf")
        mask = np.asarray(self.image_mask, dtype=bool)
        if not np.isfinite(self.image[mask]).all():
            raise ValueError("image embeddings of rows with an image contain NaN or inf")

    @classmethod
    def from_batch(cls, batch: MemberBatch) -> SplitData:
        """The rows the shared loader (pricefuse.pipeline.inputs) or the serving model hands over,
        checked
        as above (ValueError)."""
        return cls(batch.parsed, batch.text, batch.image, batch.image_mask)

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, rows: np.ndarray) -> SplitData:
        return SplitData(
            self.frame.iloc[rows].reset_index(drop=True),
            self.text[rows],
            self.image[rows],
            np.asarray(self.image_mask)[rows],
        )

    @property
    def target(self) -> np.ndarray:
        if TARGET_COLUMN not in self.frame:
            raise ValueError(f"parsed table has no {TARGET_COLUMN} column (test split?)")
        target = self.frame[TARGET_COLUMN].to_numpy(dtype=np.float64)
        if not np.isfinite(target).all():
            raise ValueError(f"{TARGET_COLUMN} contains NaN or inf")
        return target


def numeric_matrix(
    data: SplitData, extra: Sequence[str] = (), columns: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """Raw numeric features (n, len(NUMERIC_FEATURES) + len(extra)), NaN where a value is missing.

    `extra` names further numeric columns of the parsed table taken as they are (the neighbour
    features, already in log-price units); a column the table lacks is all NaN. `columns`:
    some of them already as float64 arrays (a MemberBatch's `arrays`, the same numbers as the
    table's columns), taken from there.

    Counts and sizes enter in log space: price scales roughly multiplicatively with them.
    `has_image` comes from the embedding mask, not the parsed column, because the mask is what
    the image branch actually used (an image that failed to decode has a path but no vector).
    """
    f = data.frame

    def col(name: str) -> np.ndarray:
        column = f[name]
        # Already numbers (what parsing writes): `to_numeric` would return them unchanged, at
        # several times the cost on a served row; NumPy dtypes skip pandas' NA handling too.
        if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
            return column.to_numpy().astype(np.float64)
        if pd.api.types.is_numeric_dtype(column.dtype):
            return column.to_numpy(dtype=np.float64, na_value=np.nan)
        return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)

    matrix = [
        col("log_quantity"),
        np.log1p(np.clip(col("pack"), 1.0, None)),
        np.log1p(np.clip(col("value"), 0.0, None)),
        col("value_missing"),
        col("unit_missing"),
        np.asarray(data.image_mask, dtype=np.float64),
        np.log1p(np.clip(col("n_bullets"), 0.0, None)),
        np.log1p(np.clip(col("text_len"), 0.0, None)),
    ]
    given = columns or {}
    matrix += [
        given[c] if c in given else col(c) if c in f.columns else np.full(len(f), np.nan)
        for c in extra
    ]
    return np.column_stack(matrix)


def to_tensor(array: Any, dtype: type[np.generic]) -> torch.Tensor:
    """Share memory with the array when possible (embedding matrices are large); copy when it is
    read-only (pandas copy-on-write views, memory-mapped .npy), which torch cannot wrap safely."""
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


@dataclass(frozen=True)
class FusionInputs:
    """Model-ready tensors for a set of rows, in the heads' forward argument order
    (pricefuse.models.fusion.heads.base.FusionHeadBase.forward). `joint` is (n, 0) without the joint
    tower, so every head takes the same arguments."""

    text: torch.Tensor
    image: torch.Tensor
    image_mask: torch.Tensor
    unit: torch.Tensor
    numeric: torch.Tensor
    joint: torch.Tensor

    def __len__(self) -> int:
        return self.text.shape[0]

    def features(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, ...]:
        """The heads' forward arguments, optionally for a subset of rows."""
        tensors = (self.text, self.image, self.image_mask, self.unit, self.numeric, self.joint)
        if rows is None:
            return tensors
        return tuple(t[rows] for t in tensors)

    def to(self, device: torch.device | str) -> FusionInputs:
        """The same inputs on `device` (themselves, not a copy, where they already are)."""
        moved = [t.to(device) for t in self.features()]
        return FusionInputs(*moved)


@dataclass(frozen=True)
class InputSpec:
    """What is learnt from training rows before the network: unit vocabulary, numeric scaler,
    embedding dims and the clip range of predictions. Serialisable to JSON."""

    units: tuple[str, ...]
    numeric_mean: tuple[float, ...]
    numeric_std: tuple[float, ...]
    text_dim: int
    image_dim: int
    log_price_range: tuple[float, float]
    extra_numeric: tuple[str, ...] = ()
    modalities: tuple[str, ...] = MODALITY_GROUPS
    joint_tower: bool = False

    @classmethod
    def fit(
        cls,
        data: SplitData,
        modalities: Sequence[str] = MODALITY_GROUPS,
        joint_tower: bool = False,
    ) -> InputSpec:
        """`joint_tower`: also build the joint embedding (pricefuse.features.joint_embedding);
        the text and image embeddings must then come from one joint model (same dim, else
        ValueError)."""
        if joint_tower:
            check_joint_dims(data.text.shape[1], data.image.shape[1])
        unknown = sorted(set(modalities) - set(MODALITY_GROUPS))
        if unknown or not modalities:
            raise ValueError(
                f"fusion.modalities must be a non-empty subset of {MODALITY_GROUPS}, got "
                f"{tuple(modalities)}"
            )
        extra = tuple(c for c in data.frame.columns if c.startswith(EXTRA_PREFIXES))
        counts = data.frame[UNIT_COLUMN].dropna().astype(str).value_counts()
        units = tuple(sorted(u for u, c in counts.items() if c >= MIN_UNIT_COUNT and u != UNK))
        raw = numeric_matrix(data, extra)
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(raw, axis=0), nan=0.0)
            std = np.nan_to_num(np.nanstd(raw, axis=0), nan=1.0)
        std = np.where(std > 1e-6, std, 1.0)
        target = data.target
        lo = max(float(target.min()), LOG_PRICE_BOUNDS[0])
        hi = min(float(target.max()), LOG_PRICE_BOUNDS[1])
        return cls(
            units=units,
            numeric_mean=tuple(float(v) for v in mean),
            numeric_std=tuple(float(v) for v in std),
            text_dim=int(data.text.shape[1]),
            image_dim=int(data.image.shape[1]),
            log_price_range=(lo, hi),
            extra_numeric=extra,
            modalities=tuple(m for m in MODALITY_GROUPS if m in modalities),
            joint_tower=joint_tower,
        )

    @property
    def joint_dim(self) -> int:
        """Width of the joint embedding; 0 without the joint tower."""
        return self.text_dim if self.joint_tower else 0

    @property
    def n_numeric(self) -> int:
        return len(NUMERIC_FEATURES) + len(self.extra_numeric)

    @property
    def n_units(self) -> int:
        """Vocabulary size including <unk> at index 0."""
        return len(self.units) + 1

    @functools.cached_property
    def _unit_lookup(self) -> dict[str, int]:
        """Unit -> index, built once per spec (not per call: every served row asks)."""
        return {u: i + 1 for i, u in enumerate(self.units)}

    def unit_index(self, units: pd.Series | Sequence[Any]) -> np.ndarray:
        """Index per row; unseen, rare or missing units map to <unk> (0)."""
        lookup = self._unit_lookup
        return np.array(
            [lookup.get(u, 0) if isinstance(u, str) else 0 for u in units], dtype=np.int64
        )

    def build(
        self,
        data: SplitData,
        raw_numeric: np.ndarray | None = None,
        units: Sequence[Any] | None = None,
    ) -> FusionInputs:
        """`raw_numeric` is `numeric_matrix(data, self.extra_numeric)` and `units` the unit
        column as a list when the caller already has them (fold models of one run share both;
        neither has fitted state)."""
        if data.text.shape[1] != self.text_dim or data.image.shape[1] != self.image_dim:
            raise ValueError(
                f"embedding dims (text {data.text.shape[1]}, image {data.image.shape[1]}) differ "
                f"from the ones the model was trained on ({self.text_dim}, {self.image_dim}); "
                "were the embeddings made with other encoders?"
            )
        if raw_numeric is None:
            raw_numeric = numeric_matrix(data, self.extra_numeric)
        numeric = (raw_numeric - np.asarray(self.numeric_mean)) / np.asarray(self.numeric_std)
        numeric = np.nan_to_num(numeric, nan=0.0, posinf=0.0, neginf=0.0)
        text, image, mask = data.text, data.image, np.asarray(data.image_mask, dtype=bool)
        unit = self.unit_index(data.frame[UNIT_COLUMN] if units is None else units)
        # A left-out modality becomes a constant input: the head cannot learn anything from it,
        # which is what the ablation measures (and serving repeats).
        if "text" not in self.modalities:
            text = np.zeros_like(text)
        if "image" not in self.modalities:
            mask = np.zeros_like(mask)
        if "tabular" not in self.modalities:
            numeric, unit = np.zeros_like(numeric), np.zeros_like(unit)
        # From the inputs as the head sees them: a left-out text or image is left out here too.
        joint = (
            joint_embedding(text, image, mask)
            if self.joint_tower
            else np.zeros((len(text), 0), dtype=np.float32)
        )
        return FusionInputs(
            text=to_tensor(text, np.float32),
            image=to_tensor(image, np.float32),
            image_mask=to_tensor(mask, np.bool_),
            unit=to_tensor(unit, np.int64),
            numeric=to_tensor(numeric, np.float32),
            joint=to_tensor(joint, np.float32),
        )

    def clip(self, log_pred: np.ndarray) -> np.ndarray:
        return np.clip(log_pred, *self.log_price_range)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InputSpec:
        return cls(
            units=tuple(raw["units"]),
            numeric_mean=tuple(raw["numeric_mean"]),
            numeric_std=tuple(raw["numeric_std"]),
            text_dim=int(raw["text_dim"]),
            image_dim=int(raw["image_dim"]),
            log_price_range=(float(raw["log_price_range"][0]), float(raw["log_price_range"][1])),
            extra_numeric=tuple(raw.get("extra_numeric", ())),
            modalities=tuple(raw.get("modalities", MODALITY_GROUPS)),
            joint_tower=bool(raw.get("joint_tower", False)),
        )
