"""Patch scores (Algorithms 4-7) from the SAE-V activations of image tokens, and the masks that keep the top patches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .geometry import PatchGrid

PATCH_SCORES = ("l0", "l1", "cooccur_l0", "cosine")
"""The patch scores of Algorithms 4-7."""


def token_patch_scores(z: torch.Tensor, cooccurring: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Per-token scores of Algorithms 4-7 from the SAE-V activations of image tokens.

    Args:
        z (`torch.Tensor` of shape `(n, d_sae)`): feature activations of the image tokens.
        cooccurring (`torch.BoolTensor` of shape `(d_sae,)`): the example's co-occurring features C(x).
        weights (`torch.Tensor` of shape `(d_sae,)`): cross-modal weights, NaN for features without one.
    """
    active = z > 0
    weighted = ~weights.isnan()
    return {
        "l0": (z != 0).sum(-1).double(),
        "l1": z.abs().double().sum(-1),
        "cooccur_l0": (active & cooccurring).sum(-1).double(),
        "cosine": (active & weighted).double() @ weights.nan_to_num(0.0).double(),
    }


def keep_mask(values: torch.Tensor | np.ndarray, keep_fraction: float, exact: bool = False,
              seed: int | Sequence[int] = 0) -> np.ndarray:
    """
    Boolean mask of the patches kept, same shape as `values`.

    The paper's rule (`exact=False`): keep every patch with score >= percentile(scores, 100 - 100 * keep_fraction), so
    ties at the threshold are all kept (a constant score keeps everything). `exact=True` keeps exactly
    `round(keep_fraction * n)` patches (at least one), breaking ties in a random order drawn from `seed`.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1].")
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("Patch scores contain NaN: they cannot be ranked.")
    if not exact:
        return values >= np.percentile(values, 100 * (1 - keep_fraction))
    flat = values.reshape(-1)
    count = max(1, round(keep_fraction * flat.size))
    tie_break = np.random.default_rng(seed).permutation(flat.size)
    order = np.lexsort((tie_break, -flat))  # highest score first, ties in random order
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(values.shape)


def mask_patches(image: Image.Image, grid: PatchGrid, values: torch.Tensor | np.ndarray, keep_fraction: float,
                 fill: tuple[int, int, int] = (0, 0, 0), exact: bool = False, seed: int | Sequence[int] = 0
                 ) -> Image.Image:
    """
    A copy of `image` with every base patch outside the top `keep_fraction` by `values` filled with `fill` (black).

    `exact` and `seed` choose how ties are treated (see [`keep_mask`]). Parts of the image that the model never sees
    (outside a centre crop) are left as they are.
    """
    keep = keep_mask(values, keep_fraction, exact=exact, seed=seed).reshape(-1)
    out = image.convert("RGB")
    for kept, box in zip(keep, grid.cell_boxes(*out.size)):
        if not kept:
            out.paste(fill, box)
    return out


@dataclass
class ImagePatchScores:
    """Patch scores of one image: its grid and, per score name, a `(rows, cols)` tensor on the base grid."""

    grid: PatchGrid
    scores: dict[str, torch.Tensor]
