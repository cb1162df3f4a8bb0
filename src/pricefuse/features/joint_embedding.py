"""The joint embedding of a row: one vector from a CLIP/SigLIP model's text and image vectors.

Why (SPAM_LLMs, Amazon ML Challenge 2025, third tower): a contrastive joint model puts a
product's caption and photo in one space, so their normalised sum is a single description of
the product that agrees with both; a head gets it beside the separate text and image vectors.
A row without an image keeps its normalised text vector: the same fallback as every other
branch (a missing image never contributes), and still a point of the joint space.
"""

from __future__ import annotations

import numpy as np

# Below this norm a vector is treated as zero (a left-out modality): its direction is noise.
EPS = 1e-12


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero."""
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norm, EPS)


def check_joint_dims(text_dim: int, image_dim: int) -> None:
    """ValueError unless text and image vectors can share one space (checked when a fold's
    inputs are fit, before any training)."""
    if text_dim != image_dim:
        raise ValueError(
            f"fusion.joint_tower needs text and image embeddings from the same joint model, got "
            f"text dim {text_dim} and image dim {image_dim}: set embed.text_model and "
            "embed.image_model to the same CLIP/SigLIP reference"
        )


def joint_embedding(text: np.ndarray, image: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
    """`l2norm(l2norm(text) + l2norm(image))` where the row has an image, `l2norm(text)` where
    not; float32 (n, dim). A masked row's image vector is never read (it may hold NaN)."""
    check_joint_dims(text.shape[1], image.shape[1])
    mask = np.asarray(image_mask, dtype=bool)
    text_unit = l2_normalise(np.asarray(text, dtype=np.float64))
    image_rows = np.where(mask[:, None], np.asarray(image, dtype=np.float64), 0.0)
    fused = text_unit + l2_normalise(image_rows)
    return l2_normalise(fused).astype(np.float32)
