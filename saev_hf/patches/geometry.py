"""Where an MLLM's image tokens lie on the image: [`PatchLocator`] lays each image's run of image tokens out as the
patch grid(s) the model's own processor and packing code make of it (see the table in `saev_hf.patches`)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from ..activations.reader import image_token_id_of

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
