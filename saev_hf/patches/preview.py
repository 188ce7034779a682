"""A preview of the patch filter: originals above, masked copies below, in one PNG (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import row_images


def save_patch_preview(original: Any, masked: Any, path: str | Any, image_column: str = "images", num_rows: int = 8,
                       title: str | None = None) -> Any:
    """A PNG with the first `num_rows` rows' first images: originals on top, their masked copies below."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num_rows, len(original))
    if n == 0:
        raise ValueError("No rows to preview.")

    def first(value: Any, row: int) -> Image.Image:
        return row_images(value, row, image_column)[0]  # already RGB, converted as the processor does

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
