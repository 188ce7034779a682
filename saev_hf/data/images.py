"""Images of dataset rows, read as the model's image processor sees them: PIL images, `datasets.Image` values
(decoded or `{"bytes", "path"}`), file paths or raw bytes, one or several per row; any mode and bit depth, converted
to 8-bit RGB the way transformers' processors convert them. A row whose image cannot be read is a [`RowError`] that
names it."""

from __future__ import annotations

import copy
import io
import os
from typing import Any, Mapping

import datasets
import numpy as np
from PIL import Image

from .errors import RowError


def load_image(value: Any, row: int) -> Image.Image:
    """One image as an RGB PIL image, from PIL, a `datasets.Image` dict, a path or bytes; a clear error otherwise."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
            source = value.get("bytes")
            image = Image.open(io.BytesIO(source)) if source is not None else Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value.startswith(("http://", "https://")):
            raise ValueError("it is a URL: images given as URLs are fetched into a local cache first, which the "
                             "saev commands and DataArguments.load do (from Python: saev_hf.data.fetch_images)")
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        return to_rgb(image)
    except Exception as error:  # PIL raises many types: report them all the same way, with the row
        raise RowError(
            f"Row {row}: the image could not be read ({type(error).__name__}: {error}). Images must be PIL images, "
            f"datasets.Image values, readable file paths or encoded image bytes."
        ) from error


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """
    `image` as 8-bit RGB, as the model's image processor sees it: transparency composited onto white, high-bit-depth
    pixels scaled instead of clipped.

    - Transparency (an alpha band: `RGBA`, `LA`, `PA`, ...; or a transparent colour in `image.info`, as palette and
      PNG `tRNS` images carry) is composited onto a white background, as transformers' `convert_to_rgb` does in the
      image processors (`do_convert_rgb`). PIL's `convert("RGB")` would drop the alpha band instead, so a logo on a
      transparent background would be scored on black while the model is trained on it on white.
    - PIL's `convert("RGB")` clips 16-bit and 32-bit pixels to 0-255, so a 16-bit PNG (`I;16`) would keep almost
      nothing of its range. 16-bit values (`I;16*`, and `I` within 0-65535) become round(v * 255 / 65535); float
      images (`F`) within [0, 1] become round(v * 255). Other ranges are refused: no scale would be the right one.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            raise ValueError(f"a float image (mode F) with values in [{low:g}, {high:g}]; only [0, 1] has a known "
                             f"scale: convert it to 8-bit RGB yourself")
        scale = 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"a 32-bit integer image (mode {image.mode}) with values in [{low:g}, {high:g}], "
                             f"outside the 16-bit range 0-65535: convert it to 8-bit RGB yourself")
        scale = 255.0 / 65535.0
    eight_bit = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def undecoded_images(dataset: Any, column: str | None):
    """
    `dataset` with the `datasets.Image` feature(s) of `column` left undecoded (`{"bytes", "path"}` values), and the
    column's original feature to cast the result back to (None when nothing was changed).

    datasets decodes an `Image` column before a map function sees it, so one corrupt image fails inside datasets with
    no row named. Undecoded, the scorer reads each image itself ([`load_image`]): a bad image is a [`RowError`]
    naming its row, or one null row with `on_error="null"`.
    """
    features = getattr(dataset, "features", None)
    if not column or features is None or column not in features:
        return dataset, None
    original = features[column]
    undecoded = copy.deepcopy(original)
    changed = []

    def visit(feature: Any) -> None:
        if isinstance(feature, datasets.Image):
            if feature.decode:
                feature.decode = False
                changed.append(feature)
        elif isinstance(feature, dict):
            for value in feature.values():
                visit(value)
        elif isinstance(feature, (list, tuple)):
            for value in feature:
                visit(value)
        elif hasattr(feature, "feature"):  # List, LargeList, Sequence
            visit(feature.feature)

    visit(undecoded)
    if not changed:
        return dataset, None
    return dataset.cast_column(column, undecoded), original


def row_images(value: Any, row: int, column: str, allow_none: bool = False) -> list[Image.Image]:
    """All images of a row (a single image or a list of them); a row without any is an error, unless `allow_none` (a
    document, whose text is read without images)."""
    values = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    if not values and not allow_none:
        raise RowError(
            f"Row {row} has no image in column {column!r}. SAE-V reads image and text together: drop text-only rows "
            f"(e.g. ds.filter(lambda r: r[{column!r}])) or fix the image column."
        )
    return [load_image(v, row) for v in values]
