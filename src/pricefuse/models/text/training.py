"""The text member's K-fold training loop, under Hugging Face accelerate.

One command scales from CPU to one GPU to several: the loop only talks to an `Accelerator`
(`prepare` for model, optimizer and dataloaders, `accumulate` + `backward` for the update,
`gather_for_metrics` for predictions, `autocast` for mixed precision, main-process-only writes).
A plain `pricefuse train-text` is one process; `torchrun --nproc_per_node N -m pricefuse.cli
train-text` (or `accelerate launch` on GPU machines) is N data-parallel processes that train each
fold together, each on its shard of every epoch's batches.

Per fold k: the pretrained backbone (restored, not reloaded: see below) and a fresh head, trained
on the other folds' rows for `text.epochs` (the first `frozen_epochs` with the backbone frozen;
Huber, then SMAPE for the last `smape_epochs`), validated on fold k every epoch (the learning
curve); the last epoch's weights give fold k's out-of-fold predictions and pooled vectors. Each
row's OOF output therefore comes from the one model that never saw it. Every fold is seeded from
(text.seed, fold) alone, so a resumed run reproduces the folds an uninterrupted run would have
trained.

The backbone is loaded once per process (a GGUF decoder dequantises every tensor in numpy on each
load): every model restores its pristine trainable state from a CPU copy taken at load (an
encoder's weights) and redraws its random part from the model's seed (LoRA adapters), so fold k
trained after other folds equals fold k trained alone. The test predictions and the reload check
(pricefuse.models.text.member) reuse it too.

Precision follows the device (pricefuse.models.text.precision): `text.mixed_precision` is a
preference, bf16 autocast only where the GPU has it natively, else fp16 with loss scaling; the
run records what it got (`TextFit.precision`). The training loss is summed on the device and read
every `text.log_every` optimizer steps (history `step_loss`, the progress bar), not per batch.

Test rows (and serving) get either one model refit on every row (`text.refit: true`) or the mean
of the fold models. Finished folds are checkpointed (pricefuse.models.text.checkpoints); a killed
run resumes at the first unfinished fold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pricefuse.core.config import TextConfig
from pricefuse.core.device import resolve_device
from pricefuse.core.errors import StageError
from pricefuse.core.metrics import smape_from_log
from pricefuse.models.text import checkpoints as ckpt
from pricefuse.models.text.backbones import TextBackbone, load_backbone
from pricefuse.models.text.data import (
    EpochShuffle,
    PadCollate,
    TokenRows,
    by_length,
    pad_id,
    tokenize,
)
from pricefuse.models.text.precision import PREFERENCES, Precision, device_precision
from pricefuse.models.text.regressor import (
    RowOutputs,
    TargetScale,
    TextRegressor,
    build_regressor,
    head_state,
    predict_batches,
    set_frozen,
)
from pricefuse.models.text.schedules import epoch_loss_name, make_loss, make_scheduler

# text.mixed_precision is a preference (pricefuse.models.text.precision)
MIXED_PRECISION = PREFERENCES


def make_accelerator(cfg: TextConfig) -> Any:
    """The Accelerator for `cfg`: on `text.device` (auto: the GPU when torch sees one; cpu
    forces the CPU), mixed precision on CUDA only, as the device does it natively
    (`choose_precision`: bf16 on Ampere+, else fp16 with loss scaling; CPU trains in fp32),
    gradient accumulation, and DDP told that frozen epochs leave the backbone without gradients."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.mixed_precision not in MIXED_PRECISION:
        raise StageError(
            f"text.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
            f"got {cfg.mixed_precision!r}"
        )
    cuda = resolve_device(cfg.device, "text.device") == "cuda"
    precision = device_precision(cfg.mixed_precision, "cuda" if cuda else "cpu")
    return Accelerator(
        mixed_precision=precision.mixed,
        gradient_accumulation_steps=max(1, cfg.grad_accum),
        cpu=not cuda,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.frozen_epochs > 0)
        ],
    )


def model_seed(seed: int, name: str) -> int:
    """Independent, reproducible seed per (text.seed, fold name)."""
    key = -1 if name == ckpt.REFIT else int(name.removeprefix("fold_"))
    state = np.random.SeedSequence([seed, key + 1]).generate_state(1, dtype=np.uint32)
    return int(state[0])


def param_groups(regressor: TextRegressor, cfg: TextConfig) -> list[dict[str, Any]]:
    """Discriminative learning rates (backbone `encoder_lr`, head `head_lr`); no weight decay on
    biases and norms (1-d parameters)."""
    groups = []
    for part, lr in ((regressor.backbone, cfg.encoder_lr), (regressor.head, cfg.head_lr)):
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": plain, "lr": lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


@dataclass
class ModelOutcome:
    """One trained (or resumed) model: a fold's, or the refit on every row."""

    name: str  # fold_<k> | refit
    path: Path
    rows: np.ndarray  # validation rows (train positions); empty for the refit
    pred: np.ndarray  # log1p on `rows`
    pooled: np.ndarray | None
    history: dict[str, list[float]]
    resumed: bool


@dataclass
class TextFit:
    """Everything the K-fold run produces; predictions in log1p space, clipped."""

    oof: np.ndarray
    oof_pooled: np.ndarray | None
    test: np.ndarray
    test_pooled: np.ndarray | None
    folds: np.ndarray
    fold_smape: dict[int, float]
    smape_oof: float
    histories: dict[str, dict[str, list[float]]]
    serving_files: list[Path]
    resumed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = "fp32"  # what the run trained in (Precision.label): fp32, bf16, fp16+scaler
    backbone: TextBackbone | None = field(default=None, repr=False)  # the one the run used


class TextTrainer:
    """Trains the fold models (and the refit) of one run; see the module docstring.

    The backbone is loaded once (`backbone`, or `load_backbone` here) and shared by every model
    of the run: each model starts from the pristine trainable state (a CPU copy taken at load),
    its random part (LoRA adapters) redrawn from the model's seed, so a fold trained after
    another equals that fold trained alone. `loads` counts the backbone loads (one)."""

    def __init__(
        self,
        cfg: TextConfig,
        accelerator: Any,
        model_dir: Path,
        train_texts: Sequence[str],
        y_log: np.ndarray,
        folds: np.ndarray,
        train_ids: pd.Series,
        progress: bool = False,
        *,
        backbone: TextBackbone | None = None,
    ) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.precision = Precision.of(str(accelerator.mixed_precision))
        self.model_dir = Path(model_dir)
        self.y = np.asarray(y_log, dtype=np.float64)
        self.folds = np.asarray(folds, dtype=np.int64)
        self.progress = progress
        self.fingerprint = ckpt.fingerprint(cfg, train_ids, self.folds, self.y)
        self.loads = 0
        if backbone is None:
            backbone = load_backbone(cfg, dtype=self.precision.param_dtype)
            self.loads = 1
        self.backbone: TextBackbone = backbone
        self._pristine = backbone.trainable_state_dict()  # CPU copies, before any training
        self.tokenizer = backbone.tokenizer
        self.pad = pad_id(self.tokenizer)
        self.ids = tokenize(self.tokenizer, train_texts, cfg.max_length)
        self.optimizer_steps = 0  # over every model this trainer trained

    # --- backbones ------------------------------------------------------------------------------

    def _fresh_backbone(self, seed: int) -> TextBackbone:
        """The shared backbone with the trainable state a freshly loaded one would start from
        (pretrained weights; LoRA adapters drawn from `seed`), wherever it now lives."""
        self.backbone.load_trainable_state_dict(self._pristine)
        self.backbone.reinit_trainable(seed)
        for parameter in self.backbone.module.parameters():
            parameter.grad = None  # nothing of the previous model's last step carries over
        return self.backbone

    def _loader(self, ids: Sequence[Sequence[int]], rows: np.ndarray, **kwargs: Any) -> Any:
        dataset = TokenRows(ids, rows, kwargs.pop("target", None))
        return DataLoader(dataset, collate_fn=PadCollate(self.pad), **kwargs)

    def predict(
        self, regressor: TextRegressor, ids: Sequence[Sequence[int]], rows: np.ndarray, pooled: bool
    ) -> RowOutputs:
        """Outputs for `rows` of `ids`, batches sharded over the processes and gathered."""
        if len(rows) == 0:
            dim = regressor.head[1].in_features
            return RowOutputs(rows, np.zeros(0), np.zeros((0, dim), np.float32) if pooled else None)
        ordered = by_length(ids, rows)
        loader = self.acc.prepare(
            self._loader(ids, ordered, batch_size=self.cfg.predict_batch_size)
        )
        regressor.to(self.acc.device)
        with self.acc.autocast():
            out = predict_batches(
                regressor, loader, ordered, self.acc.device, pooled, self.acc.gather_for_metrics
            )
        position = {int(r): i for i, r in enumerate(ordered)}
        order = np.array([position[int(r)] for r in rows], dtype=np.int64)
        return RowOutputs(
            np.asarray(rows), out.z[order], None if out.pooled is None else out.pooled[order]
        )

    # --- one model ------------------------------------------------------------------------------

    def train_model(self, name: str, fit_rows: np.ndarray, val_rows: np.ndarray) -> ModelOutcome:
        """Train one model on `fit_rows`, validating on `val_rows` (none for the refit), and
        checkpoint it (main process)."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.acc
        seed = model_seed(cfg.seed, name)
        set_seed(seed)
        backbone = self._fresh_backbone(seed)
        regressor = build_regressor(backbone, cfg.head_dropout)
        scale = TargetScale.fit(self.y[fit_rows])
        optimizer = torch.optim.AdamW(param_groups(regressor, cfg))
        loader = self._loader(
            self.ids,
            fit_rows,
            target=self.y,
            batch_size=cfg.batch_size,
            sampler=EpochShuffle(len(fit_rows), seed),
        )
        model, optimizer, loader = acc.prepare(regressor, optimizer, loader)
        steps_per_epoch = max(1, math.ceil(len(loader) / max(1, cfg.grad_accum)))
        scheduler = make_scheduler(
            optimizer,
            cfg.schedule,
            cfg.epochs * steps_per_epoch,
            cfg.warmup_fraction,
            steps_per_epoch,
        )
        history: dict[str, list[float]] = {"train_loss": [], "lr": [], "step_loss": []}
        if len(val_rows):
            history["val_smape"] = []
        outputs = RowOutputs(val_rows, np.zeros(0), None)
        epochs = tqdm(range(cfg.epochs), desc=f"text {name}", disable=self._bar_off())
        for epoch in epochs:
            set_frozen(backbone, regressor, epoch < cfg.frozen_epochs)
            loss_name = epoch_loss_name(epoch, cfg.epochs, cfg.smape_epochs)
            loss_fn = make_loss(loss_name, scale, cfg.huber_delta)
            desc = f"epoch {epoch + 1}/{cfg.epochs} ({loss_name})"
            loss = self._train_epoch(
                model, optimizer, scheduler, loader, loss_fn, desc, history["step_loss"]
            )
            history["train_loss"].append(loss)
            history["lr"].append(float(scheduler.get_last_lr()[0]))
            set_frozen(backbone, regressor, False)
            shown = {"epoch": epoch + 1, f"{loss_name}_loss": f"{loss:.4f}"}
            if len(val_rows):
                last = epoch == cfg.epochs - 1
                outputs = self.predict(acc.unwrap_model(model), self.ids, val_rows, pooled=last)
                history["val_smape"].append(
                    smape_from_log(self.y[val_rows], outputs.log_price(scale))
                )
                shown["val_smape"] = f"{history['val_smape'][-1]:.2f}"
            epochs.set_postfix(shown)
            if acc.is_main_process and self.progress:
                tqdm.write(f"text {name} " + ", ".join(f"{k} {v}" for k, v in shown.items()))
        path = ckpt.checkpoint_path(self.model_dir, name)
        payload = {
            "format": ckpt.FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "name": name,
            "rows": torch.as_tensor(np.asarray(val_rows, dtype=np.int64)),
            "pred": torch.as_tensor(outputs.log_price(scale) if len(val_rows) else np.zeros(0)),
            "history": history,
            "scale": scale.to_dict(),
            "dim": int(backbone.dim),
            "trainable": backbone.trainable_state_dict(),
            "head": head_state(regressor),
        }
        if outputs.pooled is not None:
            payload["pooled"] = torch.as_tensor(outputs.pooled).half()
        if acc.is_main_process:
            ckpt.save_atomic(path, payload)
        acc.wait_for_everyone()
        del model, optimizer, loader, scheduler
        acc.free_memory()  # drops accelerate's references (DDP wrapper, optimizer state)
        return self._outcome(name, path, payload, resumed=False)

    def _bar_off(self) -> bool | None:
        """tqdm's `disable`: off on other processes and without `progress`; None = auto (off
        when the output is not a terminal, e.g. a DVC log)."""
        return None if self.progress and self.acc.is_main_process else True

    def _train_epoch(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        loader: Any,
        loss_fn: Any,
        desc: str,
        step_loss: list[float] | None = None,
    ) -> float:
        """One pass over the (sharded) batches; returns the mean training loss over every
        process's rows.

        The loss is summed on the device: nothing waits for the GPU per micro-batch. Every
        `text.log_every` optimizer steps the window's mean loss (over every process) is read
        once, appended to `step_loss` and shown on the progress bar; a window left at the
        epoch's end counts in the epoch's mean only."""
        acc, cfg = self.acc, self.cfg
        every = max(1, cfg.log_every)
        device = acc.device
        epoch_sum, epoch_rows = torch.zeros((), device=device), 0
        window_sum, window_rows, window_steps = torch.zeros((), device=device), 0, 0
        model.train()
        bar = tqdm(loader, desc=desc, leave=False, disable=self._bar_off())
        for batch in bar:
            with acc.accumulate(model):
                z, _ = model(batch["input_ids"], batch["attention_mask"])
                loss = loss_fn(z.float(), batch["target"])
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stepped = acc.sync_gradients
                # fp16: the scaler skips steps whose gradients overflowed; so does the schedule
                if stepped and not getattr(optimizer, "step_was_skipped", False):
                    scheduler.step()
            rows = len(batch["target"])  # a shape, not a value: no device sync
            weighted = loss.detach().float() * rows
            epoch_sum += weighted
            window_sum += weighted
            epoch_rows += rows
            window_rows += rows
            if stepped:
                self.optimizer_steps += 1
                window_steps += 1
                if window_steps == every:
                    mean = self._reduced_mean(window_sum, window_rows)  # the one sync per window
                    if step_loss is not None:
                        step_loss.append(mean)
                    bar.set_postfix(loss=f"{mean:.4f}")
                    window_sum, window_rows, window_steps = torch.zeros((), device=device), 0, 0
        return self._reduced_mean(epoch_sum, epoch_rows)

    def _reduced_mean(self, total: torch.Tensor, rows: int) -> float:
        """Sum of `total` over the processes divided by the sum of `rows`."""
        both = torch.stack([total.float(), torch.tensor(float(rows), device=total.device)])
        both = self.acc.reduce(both, reduction="sum")
        return float(both[0] / both[1].clamp(min=1))

    def _outcome(self, name: str, path: Path, payload: dict, resumed: bool) -> ModelOutcome:
        pooled = payload.get("pooled")
        return ModelOutcome(
            name=name,
            path=path,
            rows=payload["rows"].numpy(),
            pred=payload["pred"].numpy().astype(np.float64),
            pooled=None if pooled is None else pooled.float().numpy(),
            history={k: [float(v) for v in vs] for k, vs in payload["history"].items()},
            resumed=resumed,
        )

    def fit_or_resume(
        self, name: str, fit_rows: np.ndarray, val_rows: np.ndarray, weights: bool
    ) -> ModelOutcome:
        """A finished checkpoint of this run's fingerprint, or a newly trained model.

        `weights`: whether the checkpoint must still hold its weights (fold models that serve)."""
        path = ckpt.checkpoint_path(self.model_dir, name)
        payload = ckpt.load(path, self.fingerprint, weights=weights)
        if payload is not None:
            if self.acc.is_main_process and self.progress:
                tqdm.write(f"text {name}: resumed from {path}")
            return self._outcome(name, path, payload, resumed=True)
        return self.train_model(name, fit_rows, val_rows)

    # --- serving models on new rows -------------------------------------------------------------

    def predict_with(
        self, paths: Sequence[Path], texts: Sequence[str], pooled: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean log1p prediction (and mean pooled vector) of the checkpointed models on `texts`.

        The path `TextPredictor` takes too (same batches, longest rows first): the reload check
        re-predicts the first batch through it and must find what this computed."""
        ids = tokenize(self.tokenizer, texts, self.cfg.max_length)
        rows = np.arange(len(ids))
        preds, vectors = [], []
        backbone = self.backbone
        for path in paths:
            payload = ckpt.load(path, self.fingerprint, weights=True)
            if payload is None:
                raise RuntimeError(f"{path} vanished or changed during the run")
            backbone.load_trainable_state_dict(payload["trainable"])
            regressor = build_regressor(backbone, self.cfg.head_dropout)
            regressor.head.load_state_dict(payload["head"])
            out = self.predict(regressor, ids, rows, pooled)
            preds.append(out.log_price(TargetScale.from_dict(payload["scale"])))
            if out.pooled is not None:
                vectors.append(out.pooled)
        self.acc.free_memory()
        mean_pooled = np.mean(vectors, axis=0).astype(np.float32) if vectors else None
        return np.mean(preds, axis=0), mean_pooled


def train_text_kfold(
    cfg: TextConfig,
    train_texts: Sequence[str],
    y_log: np.ndarray,
    folds: np.ndarray,
    train_ids: pd.Series,
    test_texts: Sequence[str],
    model_dir: Path,
    accelerator: Any,
    progress: bool = False,
    on_model_done: Callable[[str], None] | None = None,
    *,
    backbone: TextBackbone | None = None,
) -> TextFit:
    """K fold models (resumed where checkpointed), the refit when `cfg.refit`, OOF predictions
    and the test predictions of the serving models.

    `backbone`: one already loaded (for `text.model` at the accelerator's precision) to train
    on instead of loading it; the fit returns the one it used (`TextFit.backbone`)."""
    started = time.perf_counter()
    folds = np.asarray(folds, dtype=np.int64)
    fold_ids = sorted(set(folds.tolist()))
    if len(fold_ids) < 2 or fold_ids != list(range(len(fold_ids))):
        raise ValueError(f"fold ids must be 0..K-1 with K >= 2, got {fold_ids}")
    if not 0 <= cfg.smape_epochs <= cfg.epochs or cfg.epochs < 1:
        raise ValueError(
            f"text.epochs must be >= 1 and text.smape_epochs in 0..epochs, got "
            f"{cfg.epochs} and {cfg.smape_epochs}"
        )
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    trainer = TextTrainer(
        cfg,
        accelerator,
        model_dir,
        train_texts,
        y_log,
        folds,
        train_ids,
        progress,
        backbone=backbone,
    )
    y = trainer.y
    outcomes: list[ModelOutcome] = []
    for k in fold_ids:
        held = np.flatnonzero(folds == k)
        outcome = trainer.fit_or_resume(
            f"fold_{k}", np.flatnonzero(folds != k), held, weights=not cfg.refit
        )
        outcomes.append(outcome)
        if on_model_done is not None:
            on_model_done(outcome.name)
    serving = [o.path for o in outcomes]
    if cfg.refit:
        refit = trainer.fit_or_resume(ckpt.REFIT, np.arange(len(y)), np.zeros(0, np.int64), True)
        outcomes.append(refit)
        serving = [refit.path]
        if on_model_done is not None:
            on_model_done(refit.name)
    oof = np.full(len(y), np.nan)
    dim = next((o.pooled.shape[1] for o in outcomes if o.pooled is not None), 0)
    oof_pooled = np.zeros((len(y), dim), np.float32) if dim else None
    fold_smape: dict[int, float] = {}
    for outcome in outcomes[: len(fold_ids)]:
        oof[outcome.rows] = outcome.pred
        if oof_pooled is not None and outcome.pooled is not None:
            oof_pooled[outcome.rows] = outcome.pooled
        k = int(outcome.name.removeprefix("fold_"))
        fold_smape[k] = smape_from_log(y[outcome.rows], outcome.pred)
    test, test_pooled = trainer.predict_with(serving, test_texts, pooled=cfg.export_embeddings)
    if accelerator.is_main_process:
        keep = set(serving) | {o.path for o in outcomes}
        ckpt.remove_stale(model_dir, keep)
        if cfg.refit:
            for outcome in outcomes[: len(fold_ids)]:
                ckpt.slim(outcome.path)
    accelerator.wait_for_everyone()
    return TextFit(
        oof=oof,
        oof_pooled=oof_pooled if cfg.export_embeddings else None,
        test=test,
        test_pooled=test_pooled,
        folds=folds,
        fold_smape=fold_smape,
        smape_oof=smape_from_log(y, oof),
        histories={o.name: o.history for o in outcomes},
        serving_files=serving,
        resumed=[o.name for o in outcomes if o.resumed],
        seconds=time.perf_counter() - started,
        precision=trainer.precision.label,
        backbone=trainer.backbone,
    )


@dataclass
class FoldTiming:
    """What `time_fold` measured: one fold model trained from an already loaded backbone."""

    name: str
    precision: str  # fp32 | bf16 | fp16+scaler
    device: str
    load_seconds: float  # loading the backbone (once per process)
    train_seconds: float  # training + validating + checkpointing the fold
    optimizer_steps: int
    rows_seen: int  # training rows x epochs
    history: dict[str, list[float]]
    pred: np.ndarray  # log1p predictions on the fold's held-out rows

    @property
    def rows_per_second(self) -> float:
        return self.rows_seen / max(self.train_seconds, 1e-9)


def time_fold(
    cfg: TextConfig,
    train_texts: Sequence[str],
    y_log: np.ndarray,
    folds: np.ndarray,
    model_dir: Path,
    accelerator: Any,
    fold: int = 0,
    *,
    backbone: TextBackbone | None = None,
) -> FoldTiming:
    """Train fold `fold` once, timed (for benchmarks, e.g. a GPU check with a tiny config): the
    same code path as `train_text_kfold`, without resuming and without the other folds."""
    started = time.perf_counter()
    ids = pd.Series(np.arange(len(train_texts)))
    trainer = TextTrainer(
        cfg, accelerator, model_dir, train_texts, y_log, folds, ids, backbone=backbone
    )
    _synchronize(accelerator)
    loaded = time.perf_counter()
    folds = trainer.folds
    fit_rows, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    outcome = trainer.train_model(f"fold_{fold}", fit_rows, held)
    _synchronize(accelerator)
    done = time.perf_counter()
    return FoldTiming(
        name=outcome.name,
        precision=trainer.precision.label,
        device=str(accelerator.device),
        load_seconds=loaded - started,
        train_seconds=done - loaded,
        optimizer_steps=trainer.optimizer_steps,
        rows_seen=len(fit_rows) * cfg.epochs,
        history=outcome.history,
        pred=outcome.pred,
    )


def _synchronize(accelerator: Any) -> None:
    if getattr(accelerator.device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(accelerator.device)
