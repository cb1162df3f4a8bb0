"""Inputs, the K-fold training loop and the saved predictor of the fusion head.

Flow: `SplitData` (parsed table + embedding arrays, as the stages and the serving model hold
them) -> `InputSpec.fit` on a fold's training rows (unit vocabulary, numeric scaler, clip range)
-> `InputSpec.build` -> `FusionInputs` (tensors) -> `FusionHead` (which keeps the per-dimension
embedding scaler, also fit on the fold's training rows, in its state dict). A fitted spec and
its head form a `FoldModel`; `FusionPredictor` is the fold models averaged, saved as
`predictor.json` + `fold_k.pt`.

Why a spec per fold, fit on that fold's training rows only: the validation rows then see the
model exactly as test rows will — a unit that only occurs in the validation fold maps to <unk>
just like a unit only seen at serving time, so out-of-fold SMAPE is an honest estimate.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from tqdm.auto import tqdm

from pricefuse.config import FusionConfig
from pricefuse.metrics import smape_from_log
from pricefuse.models.fusion import FusionArch, FusionHead
from pricefuse.models.losses import LossFn, get_loss

UNK = "<unk>"
# A unit seen fewer times than this in training shares the <unk> embedding. Why: <unk> must be
# trained on something that resembles "a unit we know little about", and one row cannot fit an
# embedding of its own anyway.
MIN_UNIT_COUNT = 2
# Parsed-table columns the numeric features come from (see docs/contracts.md, parse_frame).
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
FOLD_COLUMN = "fold"
# Hard bounds on any log1p prediction ($0.01 .. $100k); the per-fold clip range from the
# training targets is applied inside these.
LOG_PRICE_BOUNDS = (math.log1p(0.01), math.log1p(100_000.0))
# Rows per forward pass at prediction time: bounds memory for large test sets.
PREDICT_BATCH = 8192
# Global gradient norm cap: one exploding batch (a mispriced listing) must not wreck a fold.
GRAD_CLIP_NORM = 1.0
# Linear learning-rate warm-up before the cosine decay, as a fraction of all steps: AdamW's
# second-moment estimates are noisy for the first few steps.
WARMUP_FRACTION = 0.05
MANIFEST = "predictor.json"
FORMAT_VERSION = 1


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


def numeric_matrix(data: SplitData, extra: Sequence[str] = ()) -> np.ndarray:
    """Raw numeric features (n, len(NUMERIC_FEATURES) + len(extra)), NaN where a value is missing.

    `extra` names further numeric columns of the parsed table taken as they are (the neighbour
    features, already in log-price units); a column the table lacks is all NaN.

    Counts and sizes enter in log space: price scales roughly multiplicatively with them.
    `has_image` comes from the embedding mask, not the parsed column, because the mask is what
    the image branch actually used (an image that failed to decode has a path but no vector).
    """
    f = data.frame

    def col(name: str) -> np.ndarray:
        return pd.to_numeric(f[name], errors="coerce").to_numpy(dtype=np.float64)

    columns = [
        col("log_quantity"),
        np.log1p(np.clip(col("pack"), 1.0, None)),
        np.log1p(np.clip(col("value"), 0.0, None)),
        col("value_missing"),
        col("unit_missing"),
        np.asarray(data.image_mask, dtype=np.float64),
        np.log1p(np.clip(col("n_bullets"), 0.0, None)),
        np.log1p(np.clip(col("text_len"), 0.0, None)),
    ]
    columns += [col(c) if c in f.columns else np.full(len(f), np.nan) for c in extra]
    return np.column_stack(columns)


def _tensor(array: Any, dtype: type[np.generic]) -> torch.Tensor:
    """Share memory with the array when possible (embedding matrices are large); copy when it is
    read-only (pandas copy-on-write views, memory-mapped .npy), which torch cannot wrap safely."""
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


@dataclass(frozen=True)
class FusionInputs:
    """Model-ready tensors for a set of rows, in FusionHead.forward's argument order."""

    text: torch.Tensor
    image: torch.Tensor
    image_mask: torch.Tensor
    unit: torch.Tensor
    numeric: torch.Tensor

    def __len__(self) -> int:
        return self.text.shape[0]

    def features(self, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, ...]:
        """The FusionHead.forward arguments, optionally for a subset of rows."""
        tensors = (self.text, self.image, self.image_mask, self.unit, self.numeric)
        if rows is None:
            return tensors
        return tuple(t[rows] for t in tensors)


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

    @classmethod
    def fit(cls, data: SplitData, modalities: Sequence[str] = MODALITY_GROUPS) -> InputSpec:
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
        )

    @property
    def n_numeric(self) -> int:
        return len(NUMERIC_FEATURES) + len(self.extra_numeric)

    @property
    def n_units(self) -> int:
        """Vocabulary size including <unk> at index 0."""
        return len(self.units) + 1

    def unit_index(self, units: pd.Series | Sequence[Any]) -> np.ndarray:
        """Index per row; unseen, rare or missing units map to <unk> (0)."""
        lookup = {u: i + 1 for i, u in enumerate(self.units)}
        return np.array(
            [lookup.get(u, 0) if isinstance(u, str) else 0 for u in units], dtype=np.int64
        )

    def build(self, data: SplitData) -> FusionInputs:
        if data.text.shape[1] != self.text_dim or data.image.shape[1] != self.image_dim:
            raise ValueError(
                f"embedding dims (text {data.text.shape[1]}, image {data.image.shape[1]}) differ "
                f"from the ones the model was trained on ({self.text_dim}, {self.image_dim}); "
                "were the embeddings made with other encoders?"
            )
        numeric = (
            numeric_matrix(data, self.extra_numeric) - np.asarray(self.numeric_mean)
        ) / np.asarray(self.numeric_std)
        numeric = np.nan_to_num(numeric, nan=0.0, posinf=0.0, neginf=0.0)
        text, image, mask = data.text, data.image, np.asarray(data.image_mask, dtype=bool)
        unit = self.unit_index(data.frame[UNIT_COLUMN])
        # A left-out modality becomes a constant input: the head cannot learn anything from it,
        # which is what the ablation measures (and serving repeats).
        if "text" not in self.modalities:
            text = np.zeros_like(text)
        if "image" not in self.modalities:
            mask = np.zeros_like(mask)
        if "tabular" not in self.modalities:
            numeric, unit = np.zeros_like(numeric), np.zeros_like(unit)
        return FusionInputs(
            text=_tensor(text, np.float32),
            image=_tensor(image, np.float32),
            image_mask=_tensor(mask, np.bool_),
            unit=_tensor(unit, np.int64),
            numeric=_tensor(numeric, np.float32),
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
        )


@dataclass
class FoldModel:
    """One fold's fitted spec and trained head."""

    spec: InputSpec
    head: FusionHead

    @torch.inference_mode()
    def predict_inputs(self, inputs: FusionInputs) -> np.ndarray:
        """Clipped log1p predictions for already built inputs (eval mode: no dropout)."""
        was_training = self.head.training
        self.head.eval()
        out = [
            self.head(*inputs.features(slice(start, start + PREDICT_BATCH))).numpy()
            for start in range(0, len(inputs), PREDICT_BATCH)
        ]
        self.head.train(was_training)
        pred = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
        return self.spec.clip(pred)

    def predict(self, data: SplitData) -> np.ndarray:
        return self.predict_inputs(self.spec.build(data))


class FusionPredictor:
    """The fold models of one training run; predicts the mean of their log1p predictions.

    This is what the serving model and the ensemble load: `FusionPredictor.load(model_dir)`.
    """

    def __init__(self, folds: Sequence[FoldModel]) -> None:
        if not folds:
            raise ValueError("a FusionPredictor needs at least one fold model")
        self.folds = list(folds)

    def predict(
        self,
        parsed: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
    ) -> np.ndarray:
        """log1p price per row (fold-averaged, each fold's prediction clipped to its range)."""
        data = SplitData(parsed, text_emb, image_emb, image_mask)
        return np.mean([fold.predict(data) for fold in self.folds], axis=0)

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.members)."""
        return {"fusion": self.predict(batch.parsed, batch.text, batch.image, batch.image_mask)}

    def save(self, model_dir: Path | str) -> Path:
        """Write `predictor.json` (specs and architecture, readable) and `fold_k.pt` (weights)."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for k, fold in enumerate(self.folds):
            name = f"fold_{k}.pt"
            torch.save(fold.head.state_dict(), model_dir / name)
            entries.append(
                {"weights": name, "arch": fold.head.arch.to_dict(), "spec": fold.spec.to_dict()}
            )
        manifest = {"format": FORMAT_VERSION, "folds": entries}
        path = model_dir / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: Path | str) -> FusionPredictor:
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a fusion model directory")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: format {manifest.get('format')}, expected {FORMAT_VERSION}")
        folds = []
        for entry in manifest["folds"]:
            head = FusionHead(FusionArch.from_dict(entry["arch"]))
            state = torch.load(model_dir / entry["weights"], map_location="cpu", weights_only=True)
            head.load_state_dict(state)
            head.eval()
            folds.append(FoldModel(InputSpec.from_dict(entry["spec"]), head))
        return cls(folds)


@dataclass
class FoldHistory:
    """Per-epoch curves of one fold and the epoch whose weights were kept (1-based)."""

    train_loss: list[float] = field(default_factory=list)
    val_smape: list[float] = field(default_factory=list)
    best_epoch: int = 0

    def as_series(self) -> dict[str, list[float]]:
        return {"train_loss": self.train_loss, "val_smape": self.val_smape}


def _seeds(seed: int, fold: int) -> tuple[int, np.random.Generator]:
    """Independent, reproducible (torch seed, numpy generator) per (run seed, fold)."""
    sequence = np.random.SeedSequence([seed, fold])
    torch_seed = int(sequence.generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch_seed, np.random.default_rng(sequence)


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """Linear warm-up, then cosine decay to zero over the full epoch budget."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def _train_epoch(
    head: FusionHead,
    inputs: FusionInputs,
    target: torch.Tensor,
    batches: Sequence[torch.Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
) -> float:
    """One pass over the batches (row indices); returns the row-weighted mean training loss."""
    head.train()
    total, rows_seen = 0.0, 0
    for rows in batches:
        loss = loss_fn(head(*inputs.features(rows)), target[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(rows)
        rows_seen += len(rows)
    return total / max(rows_seen, 1)


def train_fold(
    train: SplitData,
    valid: SplitData,
    cfg: FusionConfig,
    seed: int,
    fold: int = 0,
    progress: bool = False,
) -> tuple[FoldModel, FoldHistory]:
    """Train one head on `train`, early-stopping on `valid` SMAPE; returns the best epoch's model.

    The same validation rows pick the epoch and give the fold's out-of-fold predictions, so OOF
    SMAPE is slightly optimistic (by the epoch selection only); a nested split would cost a
    fifth of the training data for a small correction.
    """
    torch_seed, rng = _seeds(seed, fold)
    spec = InputSpec.fit(train, cfg.modalities)
    train_inputs = spec.build(train)
    target = train.target
    valid_inputs = spec.build(valid)
    valid_target = valid.target
    loss_fn = get_loss(cfg.loss)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        arch = FusionArch(
            text_dim=spec.text_dim,
            image_dim=spec.image_dim,
            n_units=spec.n_units,
            n_numeric=spec.n_numeric,
            hidden=cfg.hidden,
            n_blocks=cfg.n_blocks,
            dropout=cfg.dropout,
            unit_dim=cfg.unit_dim,
        )
        head = FusionHead(arch)
        head.set_target_scale(float(target.mean()), float(target.std()))
        head.set_input_scale(train_inputs.text, train_inputs.image, train_inputs.image_mask)
        model = FoldModel(spec, head)
        # fused: one kernel for the whole update instead of a chain of per-tensor ops; measured
        # ~12% faster per step on CPU for this head.
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
        )
        n = len(train_inputs)
        target_t = _tensor(target, np.float32)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        scheduler = _schedule(optimizer, cfg.epochs * steps_per_epoch)
        history = FoldHistory()
        best_smape, best_state = math.inf, copy.deepcopy(head.state_dict())
        epochs = tqdm(
            range(cfg.epochs), desc=f"fold {fold}", leave=False, disable=None if progress else True
        )
        for epoch in epochs:
            order = torch.as_tensor(rng.permutation(n))
            batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            history.train_loss.append(
                _train_epoch(head, train_inputs, target_t, batches, loss_fn, optimizer, scheduler)
            )
            val_smape = smape_from_log(valid_target, model.predict_inputs(valid_inputs))
            history.val_smape.append(val_smape)
            epochs.set_postfix(val_smape=f"{val_smape:.2f}")
            if val_smape < best_smape:
                best_smape, history.best_epoch = val_smape, epoch + 1
                best_state = copy.deepcopy(head.state_dict())
            elif epoch + 1 - history.best_epoch >= cfg.patience:
                break
        head.load_state_dict(best_state)
        head.eval()
    return model, history


@dataclass
class KFoldResult:
    """Everything a K-fold run produces; predictions in log1p space, clipped."""

    oof: np.ndarray  # per train row, from the fold model that did not train on it
    test: np.ndarray | None  # mean over fold models
    folds: np.ndarray  # fold id per train row (as given)
    histories: dict[str, FoldHistory]  # "fold_k" -> curves
    fold_smape: list[float]
    smape_oof: float
    predictor: FusionPredictor
    seconds: float


def train_kfold(
    train: SplitData,
    cfg: FusionConfig,
    seed: int,
    test: SplitData | None = None,
    progress: bool = False,
) -> KFoldResult:
    """Train one head per fold id of `train.frame['fold']` (0..K-1, assigned by preprocess)."""
    if FOLD_COLUMN not in train.frame:
        raise ValueError(f"parsed train table has no {FOLD_COLUMN!r} column")
    fold_ids = train.frame[FOLD_COLUMN].to_numpy(dtype=np.int64)
    folds = sorted(set(fold_ids.tolist()))
    if len(folds) < 2 or folds != list(range(len(folds))):
        raise ValueError(f"fold ids must be 0..K-1 with K >= 2, got {folds}")
    target = train.target
    started = time.perf_counter()
    oof = np.full(len(train), np.nan)
    models, histories, fold_smape = [], {}, []
    for k in tqdm(folds, desc="fusion folds", disable=None if progress else True):
        val_rows = np.flatnonzero(fold_ids == k)
        fit_rows = np.flatnonzero(fold_ids != k)
        model, history = train_fold(
            train.take(fit_rows), train.take(val_rows), cfg, seed, fold=k, progress=progress
        )
        oof[val_rows] = model.predict(train.take(val_rows))
        fold_smape.append(smape_from_log(target[val_rows], oof[val_rows]))
        models.append(model)
        histories[f"fold_{k}"] = history
    predictor = FusionPredictor(models)
    test_pred = None
    if test is not None:
        test_pred = predictor.predict(test.frame, test.text, test.image, test.image_mask)
    return KFoldResult(
        oof=oof,
        test=test_pred,
        folds=fold_ids,
        histories=histories,
        fold_smape=fold_smape,
        smape_oof=smape_from_log(target, oof),
        predictor=predictor,
        seconds=time.perf_counter() - started,
    )
