"""Where each stage reads and writes, and the column contracts between stages.

Paths derive from `params.data` (dvc.yaml reads the same keys), so moving an output is a one-line
change in params.yaml. Column names are constants so producers and consumers cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pricefuse.core.config import DataConfig

# Small files DVC tracks as plots (git-committable) and stages also log to MLflow under "plots".
PLOTS_DIR = Path("plots")

SPLITS = ("train", "test")

# fetch_images: manifest.csv, one row per distinct link.
MANIFEST_COLUMNS = ("link", "path", "status", "bytes", "attempts", "error")
IMAGE_OK_STATUSES = ("ok", "cached")


def image_manifest(images_dir: Path | str) -> Path:
    """The manifest of an image cache directory: one definition for the cache that writes it and
    the stages that read it through `Layout.manifest`."""
    return Path(images_dir) / "manifest.csv"


# preprocess: parsed table per split (parquet), row order = raw CSV order minus dropped rows.
ID = "sample_id"
TEXT = "text"  # the encoder input: item name + bullets + description
# The item name before the preprocess text options (only present when an option is on).
NAME_AS_WRITTEN = "item_name_as_written"
LOG_PRICE = "log_price"  # log1p(price); train only
PRICE = "price"
FOLD = "fold"  # 0..n_folds-1 on train, -1 on test
IMAGE_PATH = "image_path"  # path of the cached image ("" when none)
HAS_IMAGE = "has_image"

# train_* stages: predictions in log1p space, one column per member.
PRED_COLUMNS_OOF = (ID, FOLD)  # + one column per member
PRED_COLUMNS_TEST = (ID,)  # + one column per member (mean over fold models)


@dataclass(frozen=True)
class Layout:
    data: DataConfig

    # fetch_images
    @property
    def images_dir(self) -> Path:
        return Path(self.data.images_dir)

    @property
    def manifest(self) -> Path:
        return image_manifest(self.images_dir)

    # preprocess
    @property
    def interim_dir(self) -> Path:
        return Path(self.data.interim_dir)

    def parsed(self, split: str) -> Path:
        return self.interim_dir / f"{split}.parquet"

    # embed
    @property
    def features_dir(self) -> Path:
        return Path(self.data.features_dir)

    def text_embeddings(self, split: str) -> Path:
        return self.features_dir / f"{split}_text.npy"

    def image_embeddings(self, split: str) -> Path:
        return self.features_dir / f"{split}_image.npy"

    def image_mask(self, split: str) -> Path:
        return self.features_dir / f"{split}_image_mask.npy"

    def llm_embeddings(self, split: str) -> Path:
        """The opt-in LLM text block (standardised; absent when `embed.llm.model` is empty)."""
        return self.features_dir / f"{split}_llm.npy"

    def llm_block_files(self) -> list[Path]:
        """The LLM block's files beside its arrays: its Standardiser's arrays (stem
        `llm_standardiser`, pricefuse.features.llm) and `llm.json`; the served model logs them."""
        names = ("llm_standardiser_mean.npy", "llm_standardiser_scale.npy", "llm.json")
        return [self.features_dir / name for name in names]

    # Resume state of long stages. Never inside a DVC output: DVC deletes a stage's outputs
    # before running it, which would throw the finished work of a killed run away.
    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.data.checkpoints_dir)

    @property
    def embed_checkpoints(self) -> Path:
        return self.checkpoints_dir / "embed"

    def embed_chunk(self, split: str, index: int) -> Path:
        """embed's finished chunk `index` of `split` (pricefuse.features.embedding)."""
        return self.embed_checkpoints / f"{split}_{index:05d}.npz"

    # neighbours: OOF neighbour features of train rows, all-train-row features of test rows
    def neighbour_features(self, split: str) -> Path:
        return Path(self.data.neighbours_dir) / f"{split}.parquet"

    # models
    def model_dir(self, name: str) -> Path:
        """name: a producer in pricefuse.pipeline.members, or "ensemble"."""
        return Path(self.data.models_dir) / name

    def oof_predictions(self, name: str) -> Path:
        return self.model_dir(name) / "oof.parquet"

    def test_predictions(self, name: str) -> Path:
        return self.model_dir(name) / "test.parquet"

    # train_text (text.export_embeddings): fine-tuned, OOF-safe text vectors, parsed-table order
    @property
    def text_member_embeddings_dir(self) -> Path:
        return Path(self.data.models_dir) / "text_embeddings"

    def text_member_embeddings(self, split: str) -> Path:
        return self.text_member_embeddings_dir / f"{split}.npy"

    # submit
    @property
    def submission(self) -> Path:
        return Path(self.data.submission_csv)
