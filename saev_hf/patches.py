"""Image patches: where an MLLM's image tokens lie on the image, SAE-V patch scores and patch filters (Algorithms 4-7).

An image reaches the language model as a run of image tokens. For the architectures whose image tokens come from a
grid of patches, [`PatchLocator`] lays each image's tokens out as that grid over the original image, as the model's
own processor and packing code do it (no per-checkpoint numbers):

| model type | views (base first) | covered part of the image |
|---|---|---|
| `llava`, `vipllava` | one square grid (CLIP patches; the CLS token of the `full` strategy has no patch) | the centre crop |
| `llava_next` | the base grid, then the high-resolution grid (its tiles joined, padding cut, newline tokens skipped) | all |
| `paligemma` | one square grid (SigLIP patches) | all (resized) |
| `qwen2_vl`, `qwen2_5_vl` | one grid of merged patches (`image_grid_thw` / merge size) | all (resized) |
| `idefics3`, `smolvlm` | the global image's grid, then the tiles joined | all (resized) |
| `chameleon` | one square grid of VQ codes | the centre crop |

[`PatchFilter`] scores every patch from the SAE-V activations z of the image tokens that cover it (the method page,
section 4): `l0` = number of features with z != 0, `l1` = sum |z|, `cooccur_l0` = number of active features in the
example's co-occurring set C(x) (z > delta at some text and some image position), `cosine` = sum of the cross-modal
weights w_f of the active weighted features. With several views (LLaVA-NeXT, Idefics3), a patch of the base grid gets
the mean of its base token's score and the mean score of the high-resolution tokens whose centres fall inside it.
[`mask_patches`] keeps the top p% of patches (threshold = percentile(scores, 100 - p), the paper's rule) and blacks
out the rest; [`PatchFilter`] does it to a whole dataset with `ds.map`, cached like [`SAEVScorer`].

```python
patch_filter = PatchFilter(sae, model, processor, args=PatchFilterArguments(score="cosine", keep_fraction=0.5))
masked = ds.map(patch_filter, batched=True, batch_size=8)   # the image column now holds the masked images
```
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .activations import image_token_id_of, text_and_image
from .prompts import PromptFormat, RowError, _column, row_images, rows_to_columns
from .scoring import SAEVScorer

PATCH_SCORES = ("l0", "l1", "cooccur_l0", "cosine")
"""The patch scores of Algorithms 4-7."""

Box = tuple[float, float, float, float]
FULL_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass
class GridView:
    """
    One view of an image as the model sees it: a grid of image tokens over a part of the original image.

    Args:
        tokens (`torch.LongTensor` of shape `(rows, cols)`): for each cell, the index of its token within the image's
            run of image tokens.
        box (`tuple`): `(left, top, right, bottom)` of the original image that the grid covers, as fractions.
    """

    tokens: torch.Tensor
    box: Box = FULL_IMAGE

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def cell_centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres `(x, y)` of the cells as fractions of the original image, each `(rows, cols)`."""
        rows, cols = self.shape
        left, top, right, bottom = self.box
        ys = top + (bottom - top) * (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
        xs = left + (right - left) * (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
        return xs.expand(rows, cols), ys[:, None].expand(rows, cols)

    def cell_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Pixel boxes `(left, top, right, bottom)` of the cells, row by row, on a `width x height` original image."""
        rows, cols = self.shape
        left, top, right, bottom = self.box
        xs = [round(width * (left + (right - left) * j / cols)) for j in range(cols + 1)]
        ys = [round(height * (top + (bottom - top) * i / rows)) for i in range(rows + 1)]
        return [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(rows) for j in range(cols)]


@dataclass
class PatchGrid:
    """
    Where one image's tokens lie on it: its views (the base grid first) and its place among the example's image tokens.

    Args:
        views (`list[GridView]`): the base view, then any higher-resolution view.
        num_tokens (`int`): image tokens this image takes, including tokens without a patch (newlines, CLS).
        offset (`int`): index of its first token among the example's image tokens (in order of appearance).
        image (`int`): which image of the example it is.
    """

    views: list[GridView]
    num_tokens: int
    offset: int = 0
    image: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the base grid: the patches that are scored and masked."""
        return self.views[0].shape

    @property
    def box(self) -> Box:
        """`(left, top, right, bottom)` of the original image covered by the base grid, as fractions."""
        return self.views[0].box

    def values(self, token_values: torch.Tensor) -> torch.Tensor:
        """
        Per-patch values `(rows, cols)` on the base grid from per-token values.

        Args:
            token_values (`torch.Tensor` of shape `(n,)`): one value per image token of the whole example, in order of
                appearance (`hidden[modality == Modality.IMAGE]` order); this image's run is picked out.

        A base patch gets the mean of its base token's value and, when the image has higher-resolution views, the mean
        of their tokens whose centres fall inside the patch.
        """
        token_values = torch.as_tensor(token_values).detach().reshape(-1).double().cpu()
        if token_values.numel() < self.offset + self.num_tokens:
            raise ValueError(
                f"Got {token_values.numel()} image-token values, but image {self.image} of this example takes tokens "
                f"{self.offset}..{self.offset + self.num_tokens - 1}: pass one value per image token of the example."
            )
        own = token_values[self.offset : self.offset + self.num_tokens]
        base = own[self.views[0].tokens]
        if len(self.views) == 1:
            return base
        rows, cols = self.shape
        left, top, right, bottom = self.box
        sums = torch.zeros(rows * cols, dtype=torch.float64)
        counts = torch.zeros(rows * cols, dtype=torch.float64)
        for view in self.views[1:]:
            xs, ys = view.cell_centres()
            r = ((ys - top) / (bottom - top) * rows).floor().long().clamp(0, rows - 1)
            c = ((xs - left) / (right - left) * cols).floor().long().clamp(0, cols - 1)
            sums.index_add_(0, (r * cols + c).reshape(-1), own[view.tokens].reshape(-1))
            counts.index_add_(0, (r * cols + c).reshape(-1), torch.ones(view.tokens.numel(), dtype=torch.float64))
        high = (sums / counts.clamp_min(1)).view(rows, cols)
        return torch.where(counts.view(rows, cols) > 0, (base + high) / 2, base)

    def cell_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Pixel boxes `(left, top, right, bottom)` of the base patches, row by row, on a `width x height` image."""
        return self.views[0].cell_boxes(width, height)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts: one function per architecture family, from the processor's own output for an image of the given size
# ---------------------------------------------------------------------------------------------------------------------


def _setting(settings: Any, key: str) -> Any:
    if settings is None:
        return None
    if isinstance(settings, Mapping):
        return settings.get(key)
    return getattr(settings, key, None)


def _crop_box(image_processor: Any, width: int, height: int) -> Box:
    """Part of a `width x height` image left by a resize of the shortest edge followed by a centre crop."""
    if not getattr(image_processor, "do_center_crop", False):
        return FULL_IMAGE
    crop = getattr(image_processor, "crop_size", None)
    crop_w, crop_h = _setting(crop, "width"), _setting(crop, "height")
    shortest = _setting(getattr(image_processor, "size", None), "shortest_edge")
    if crop_w is None or crop_h is None:
        return FULL_IMAGE
    scale = shortest / min(width, height) if shortest else 1.0
    resized_w, resized_h = width * scale, height * scale
    fx = min(1.0, crop_w / resized_w)
    fy = min(1.0, crop_h / resized_h)
    return ((1 - fx) / 2, (1 - fy) / 2, (1 + fx) / 2, (1 + fy) / 2)


def _square(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise NotImplementedError(f"{what}: {count} image tokens do not form a square grid.")
    return side


def _grid(rows: int, cols: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + rows * cols).view(rows, cols)


def _blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (127, 127, 127))


def _llava_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    config = locator.model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    extra = 1 if strategy == "full" else 0  # CLS comes first and has no patch
    box = _crop_box(locator.processor.image_processor, width, height)
    return PatchGrid([GridView(_grid(side, side, extra), box)], num_tokens=side * side + extra)


def _llava_next_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    config = locator.model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise NotImplementedError("LLaVA-NeXT patch layout with vision_feature_select_strategy='full'.")
    processed = locator.processor.image_processor(_blank(width, height), return_tensors="pt")
    num_views = int(processed["pixel_values"].shape[1])
    # Run the model's own packing code on probe features carrying (view, row, col): what comes out is, token by token,
    # where each image token of this image comes from (newline tokens carry the -1 probe).
    probe = torch.zeros(num_views, side * side, 3)
    local = _grid(side, side)
    ys, xs = (local // side).reshape(-1).float(), (local % side).reshape(-1).float()
    probe[0, :, 1], probe[0, :, 2] = ys, xs
    tiles = num_views - 1
    if tiles:
        tile_rows, tile_cols = _anyres_shape(config, height, width)
        for t in range(tiles):
            i, j = divmod(t, tile_cols)
            probe[t + 1, :, 0] = 1
            probe[t + 1, :, 1], probe[t + 1, :, 2] = ys + i * side, xs + j * side
    packed, _ = _pack(locator.model)([probe], processed["image_sizes"], vision_feature_select_strategy="default",
                                     image_newline=torch.full((3,), -1.0))
    where = packed[0].long()
    base_positions = (where[:, 0] == 0).nonzero().flatten()
    base = torch.full((side, side), -1, dtype=torch.long)
    base[where[base_positions, 1], where[base_positions, 2]] = base_positions
    views = [GridView(base)]
    high_positions = (where[:, 0] == 1).nonzero().flatten()
    if len(high_positions):
        ys_hi, xs_hi = where[high_positions, 1], where[high_positions, 2]
        ys_hi, xs_hi = ys_hi - ys_hi.min(), xs_hi - xs_hi.min()
        high = torch.full((int(ys_hi.max()) + 1, int(xs_hi.max()) + 1), -1, dtype=torch.long)
        high[ys_hi, xs_hi] = high_positions
        views.append(GridView(high))  # the unpadded high-resolution grid covers the whole image
    if any((view.tokens < 0).any() for view in views):
        raise NotImplementedError("LLaVA-NeXT packing left holes in the patch grid.")
    return PatchGrid(views, num_tokens=len(where))


def _anyres_shape(config: Any, height: int, width: int) -> tuple[int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, config.vision_config.image_size)


def _pack(model: Any) -> Callable:
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "pack_image_features"):
            return candidate.pack_image_features
    raise NotImplementedError(f"{type(model).__name__} has no pack_image_features.")


def _paligemma_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    count = locator.processor.image_seq_length
    side = _square(count, "PaliGemma")
    return PatchGrid([GridView(_grid(side, side))], num_tokens=count)


def _qwen2_vl_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    image_processor = locator.processor.image_processor
    processed = image_processor(images=[_blank(width, height)], return_tensors="pt")
    t, h, w = (int(v) for v in processed["image_grid_thw"][0])
    merge = getattr(image_processor, "merge_size", None) or locator.model.config.vision_config.spatial_merge_size
    if t != 1:
        raise NotImplementedError(f"Qwen2-VL patch layout for an image with {t} temporal patches.")
    rows, cols = h // merge, w // merge
    return PatchGrid([GridView(_grid(rows, cols))], num_tokens=rows * cols)


def _idefics3_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    processor = locator.processor
    processed = processor.image_processor([[_blank(width, height)]], return_row_col_info=True, return_tensors="pt")
    tile_rows, tile_cols = int(processed["rows"][0][0]), int(processed["cols"][0][0])
    per_tile = processor.image_seq_len
    side = _square(per_tile, "Idefics3 tile")
    tiles = tile_rows * tile_cols
    global_view = GridView(_grid(side, side, tiles * per_tile))  # the global image comes after the tiles
    views = [global_view]
    if tiles:
        high = torch.empty(tile_rows * side, tile_cols * side, dtype=torch.long)
        for t in range(tiles):
            i, j = divmod(t, tile_cols)
            high[i * side : (i + 1) * side, j * side : (j + 1) * side] = _grid(side, side, t * per_tile)
        views.append(GridView(high))
    return PatchGrid(views, num_tokens=(tiles + 1) * per_tile)


def _chameleon_layout(locator: "PatchLocator", width: int, height: int) -> PatchGrid:
    count = locator.processor.image_seq_length
    side = _square(count, "Chameleon")
    box = _crop_box(locator.processor.image_processor, width, height)
    return PatchGrid([GridView(_grid(side, side), box)], num_tokens=count)


PATCH_LAYOUTS: dict[str, Callable[["PatchLocator", int, int], PatchGrid]] = {
    "llava": _llava_layout,
    "vipllava": _llava_layout,
    "llava_next": _llava_next_layout,
    "paligemma": _paligemma_layout,
    "qwen2_vl": _qwen2_vl_layout,
    "qwen2_5_vl": _qwen2_vl_layout,
    "idefics3": _idefics3_layout,
    "smolvlm": _idefics3_layout,
    "chameleon": _chameleon_layout,
}
"""Patch layout of each supported `config.model_type`; add an entry to support another architecture."""


class PatchLocator:
    """
    Lays an MLLM's image tokens out as patch grids over the original images.

    Example:

    ```python
    locator = PatchLocator(model, processor)
    inputs = reader.prepare(rows)
    grids = locator.grids(inputs, example=0, image_sizes=[image.size for image in rows["images"][0]])
    heat = grids[0].values(feature_acts_on_image_tokens)   # (rows, cols) on the base grid
    ```

    Raises:
        NotImplementedError: for a model type without a patch layout (see `PATCH_LAYOUTS`).
    """

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        if self.model_type not in PATCH_LAYOUTS:
            raise NotImplementedError(
                f"No patch layout for model type {self.model_type!r} ({type(model).__name__}): its image tokens are "
                f"not known to form a patch grid. Supported: {', '.join(sorted(PATCH_LAYOUTS))}. Add a layout "
                f"function to saev_hf.patches.PATCH_LAYOUTS to support it."
            )
        self._layout = functools.lru_cache(maxsize=256)(self._image_grid)

    def _image_grid(self, width: int, height: int) -> PatchGrid:
        return PATCH_LAYOUTS[self.model_type](self, width, height)

    def image_grid(self, size: tuple[int, int]) -> PatchGrid:
        """The grid of one image of `size = (width, height)` (as `PIL.Image.size`), at offset 0."""
        width, height = (int(v) for v in size)
        return self._layout(width, height)

    def grids(self, inputs: Mapping[str, Any] | None = None, example: int = 0,
              image_sizes: Sequence[tuple[int, int]] = ()) -> list[PatchGrid]:
        """
        The grids of every image of one example, in order, each with its offset among the example's image tokens.

        Args:
            inputs (*optional*): the prepared batch (`reader.prepare(rows)`); when given, the grids' token count is
                checked against the example's image tokens.
            example (`int`): the example's index in the batch.
            image_sizes: `(width, height)` of each original image of the example.
        """
        grids, offset = [], 0
        for index, size in enumerate(image_sizes):
            grid = self.image_grid(size)
            grids.append(PatchGrid(grid.views, grid.num_tokens, offset=offset, image=index))
            offset += grid.num_tokens
        if inputs is not None:
            image_token_id = image_token_id_of(self.model, self.processor)
            ids = inputs["input_ids"][example]
            mask = inputs.get("attention_mask")
            real = ids[mask[example].bool()] if mask is not None else ids
            count = int((real == image_token_id).sum())
            if count != offset:
                raise ValueError(
                    f"The {self.model_type} patch layout gives {offset} image tokens for images of sizes "
                    f"{list(image_sizes)}, but example {example} has {count}: the processor's settings differ from "
                    f"what the layout assumes, or the image sizes given are not the example's."
                )
        return grids


# ---------------------------------------------------------------------------------------------------------------------
# Patch scores and masks
# ---------------------------------------------------------------------------------------------------------------------


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


@dataclass
class PatchFilterArguments:
    """Which patch score ranks the patches, how many are kept, and what replaces the others."""

    score: str = field(
        default="cosine",
        metadata={"help": f"Patch score: one of {', '.join(PATCH_SCORES)} (Algorithms 4-7), or 'random' (baseline)."},
    )
    keep_fraction: float = field(default=0.5, metadata={"help": "Fraction of each image's patches kept (0, 1]."})
    fill: str = field(default="0,0,0", metadata={"help": "RGB colour of the masked patches, as 'r,g,b'."})
    exact_fraction: bool = field(
        default=False,
        metadata={"help": "Keep exactly round(keep_fraction * patches), ties broken at random. Default: the paper's "
                  "rule, every patch scoring at least the percentile threshold is kept (ties keep more)."},
    )
    scores_column: str | None = field(
        default="saev_patch_scores",
        metadata={"help": "Column for the per-image patch score grids (nested lists); empty or None: not added."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' baseline (mixed with each image's pixels)."})
    special_as_text: bool = field(
        default=True, metadata={"help": "Count special/template tokens as text positions for C(x) (as the scorer)."}
    )
    on_error: str = field(
        default="raise",
        metadata={"help": "'raise': a row that cannot be scored stops the map with a clear error. 'null': its images "
                  "become null and the reason goes in `error_column`."},
    )
    error_column: str = field(default="saev_error", metadata={"help": "Reason column used with on_error='null'."})

    def __post_init__(self) -> None:
        if self.score not in (*PATCH_SCORES, "random"):
            raise ValueError(f"score={self.score!r} must be one of {[*PATCH_SCORES, 'random']}.")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction={self.keep_fraction} must be in (0, 1].")
        try:
            parts = tuple(int(v) for v in self.fill.split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or not all(0 <= v <= 255 for v in parts):
            raise ValueError(f"fill={self.fill!r} must be three integers 0-255 separated by commas, e.g. '0,0,0'.")
        if self.scores_column == "":
            self.scores_column = None
        if self.on_error not in ("raise", "null"):
            raise ValueError(f"on_error={self.on_error!r} must be 'raise' or 'null'.")

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.fill.split(","))  # type: ignore[return-value]

    @property
    def scores(self) -> list[str]:
        """SAE-V scores this filter needs (what [`SAEVScorer`]'s checks read)."""
        return [] if self.score == "random" else [self.score]


class PatchFilter(SAEVScorer):
    """
    SAE-V patch scores of image-text rows (Algorithms 4-7), and, called by `ds.map(batched=True)`, the patch filter.

    Args:
        sae, model, processor, prompt_format, layers: as for [`SAEVScorer`] (the prompt gives the text side of C(x)).
        args ([`PatchFilterArguments`], *optional*): the score that ranks patches and the fraction kept by the filter.

    `score_rows(rows)` gives, per row and image, every patch score on the base grid ([`ImagePatchScores`]).
    As a map function it replaces each image of the image column by its masked copy (top `keep_fraction` of the
    patches by `args.score`, the rest filled) and adds the score grids; like the scorer it pickles to its identity,
    so `datasets` caches the result.
    """

    def __init__(self, sae: Any, model: Any, processor: Any = None, prompt_format: PromptFormat | None = None,
                 args: PatchFilterArguments | None = None, layers: Any = None) -> None:
        super().__init__(sae, model, processor, prompt_format=prompt_format,
                         args=args or PatchFilterArguments(), layers=layers)
        self._locator: PatchLocator | None = None

    @property
    def locator(self) -> PatchLocator:
        if self._locator is None:
            self._validate()
            self._locator = PatchLocator(self._model, self._processor)
        return self._locator

    def _score_columns(self) -> list[str]:
        image_column = self._reader_prompt_format().image_column
        return [image_column, self.args.scores_column] if self.args.scores_column else [image_column]

    def _column_types(self) -> dict[str, Any]:
        # the image column keeps the input's feature (datasets tries it first); the grids are per image, rows x cols
        grids = {self.args.scores_column: pa.list_(pa.list_(pa.list_(pa.float64())))} if self.args.scores_column else {}
        return {**grids, self.args.error_column: pa.string()}

    @torch.no_grad()
    def score_patches(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                      first_row: int = 0) -> list[list[ImagePatchScores]]:
        """Every patch score of every image of `rows`: per row, one [`ImagePatchScores`] per image."""
        self._validate()
        sae, reader = self._sae, self._reader
        columns, images = self._decoded(rows, first_row)
        sizes = [[image.size for image in row] for row in images]
        inputs = reader.prepare(columns, first_row)
        acts = reader.read_inputs(inputs)
        delta = sae.config.cooccurrence_threshold
        weights = sae.feature_weights.float()
        out = []
        for i in range(len(acts)):
            grids = self.locator.grids(inputs, example=i, image_sizes=sizes[i])
            hidden, modality = acts.example(i)
            text, image = text_and_image(modality, self.args.special_as_text)
            if not text.any():
                raise RowError(f"Row {first_row + i}: no text token, so no co-occurring features to score patches by.")
            z = sae.encode(hidden[image | text].to(sae.W_enc.device)).float()
            kept_image = image[image | text].to(z.device)
            z_image = z[kept_image]
            cooccur = (z[~kept_image] > delta).any(0) & (z_image > delta).any(0)
            per_token = token_patch_scores(z_image, cooccur, weights.to(z.device))
            out.append([ImagePatchScores(grid, {name: grid.values(v) for name, v in per_token.items()})
                        for grid in grids])
        return out

    def _decoded(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], first_row: int):
        """`rows` as columns whose image column holds the decoded images (one list per row), and those lists."""
        columns = rows_to_columns(rows)
        image_column = self._reader_prompt_format().image_column
        values = _column(columns, image_column, "image_column")  # the reader's KeyError, naming the columns
        images = [row_images(value, first_row + i, image_column) for i, value in enumerate(values)]
        return {**columns, image_column: images}, images

    def score_rows(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], first_row: int = 0):
        """The map's output for `rows`: masked images in the image column, and the patch score grids."""
        image_column = self._reader_prompt_format().image_column
        raw = rows_to_columns(rows)
        columns, images = self._decoded(raw, first_row)  # decoded once, for the model and for the masks
        # the random baseline needs only each image's grid, not the model's activations
        patch_scores = self.score_patches(columns, first_row) if self.args.score != "random" else None
        images_out, scores_out = [], []
        for i, row in enumerate(images):
            masked, grids_out = [], []
            for j, image in enumerate(row):
                # seeded by the image itself: the same random mask and tie-breaks whatever the batching
                seed = [self.args.seed, zlib.crc32(image.tobytes())]
                if patch_scores is None:
                    grid = self.locator.image_grid(image.size)
                    values = np.random.default_rng(seed).random(grid.shape)
                else:
                    grid = patch_scores[i][j].grid
                    values = patch_scores[i][j].scores[self.args.score].numpy()
                masked.append(mask_patches(image, grid, values, self.args.keep_fraction, self.args.fill_rgb,
                                           exact=self.args.exact_fraction, seed=seed))
                grids_out.append(values.tolist())
            images_out.append(masked if isinstance(raw[image_column][i], (list, tuple)) else masked[0])
            scores_out.append(grids_out)
        out: dict[str, list[Any]] = {image_column: images_out}
        if self.args.scores_column:
            out[self.args.scores_column] = scores_out
        return out


def save_patch_preview(original: Any, masked: Any, path: str | Any, image_column: str = "images", num_rows: int = 8,
                       title: str | None = None) -> Any:
    """A PNG with the first `num_rows` rows' first images: originals on top, their masked copies below."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num_rows, len(original))
    if n == 0:
        raise ValueError("No rows to preview.")

    def first(value: Any, row: int) -> Image.Image:
        return row_images(value, row, image_column)[0].convert("RGB")

    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for ax, source, label in ((axes[0, i], original, "original"), (axes[1, i], masked, "masked")):
            ax.imshow(first(source[i][image_column], i))
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
        axes[0, i].set_title(f"row {i}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "PATCH_LAYOUTS",
    "PATCH_SCORES",
    "GridView",
    "ImagePatchScores",
    "PatchFilterArguments",
    "PatchGrid",
    "PatchLocator",
    "PatchFilter",
    "keep_mask",
    "mask_patches",
    "save_patch_preview",
    "token_patch_scores",
]
