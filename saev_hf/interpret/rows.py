"""Re-reading chosen rows of a dataset for a report: [`RowView`] is what a page shows of one row (its tokens, their
modalities, its images and where each image token lies on them), built once per row by [`RowRevisitor`]."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..activations.reader import LayerReader
from ..data.images import row_images
from ..data.pipeline import prepared_batches
from ..data.prompts import rows_to_columns
from ..patches.geometry import PatchLocator
from ..runtime.progress import progress_bar


@dataclass
class RowView:
    """
    What a report shows of one dataset row.

    Args:
        row (`int`): the row's index in the dataset.
        tokens (`list[str]`): its tokens, padding removed.
        modality (`torch.Tensor` of shape `(tokens,)`): the [`Modality`] of each token.
        images (`list[PIL.Image.Image]`): its original images.
        grids (`list`, *optional*): a `PatchGrid` per image (see `saev_hf.patches`), None when the model has no
            known patch layout.
        grid_note (`str`, *optional*): why there are no grids.
    """

    row: int
    tokens: list[str]
    modality: torch.Tensor
    images: list[Any]
    grids: list[Any] | None = None
    grid_note: str | None = None


class RowRevisitor:
    """Re-reads chosen rows (passes 2 and 3), building each row's [`RowView`] once."""

    def __init__(self, reader: LayerReader, dataset: Any, batch_size: int, workers: int = 0) -> None:
        self.reader, self.dataset, self.batch_size, self.workers = reader, dataset, batch_size, workers
        self.views: dict[int, RowView] = {}
        self._locator: Any = None
        self._locator_note: str | None = None
        try:
            self._locator = PatchLocator(reader.model, reader.processor)
        except (NotImplementedError, ValueError) as error:
            self._locator_note = f"No patch heatmap: {error}"

    def revisit(self, rows: list[int], desc: str):
        """Yield `(row, hidden (tokens, d_in), modality (tokens,), view)` for `rows`, in batches. (Not a
        [`LayerReader.read`]: this reads chosen dataset rows again and builds their views.)"""
        tokenizer = getattr(self.reader.processor, "tokenizer", self.reader.processor)
        column = self.reader.prompt_format.image_column
        batches = prepared_batches(self.reader, self.dataset, self.batch_size, rows, workers=self.workers,
                                   keep_rows=True)
        for prepared in progress_bar(batches, desc=desc, total=math.ceil(len(rows) / self.batch_size), unit="batch"):
            chunk, inputs = prepared.rows, prepared.check()
            acts = self.reader.read_inputs(inputs)
            images = rows_to_columns(prepared.batch)[column]
            for i, row in enumerate(chunk):
                hidden, modality = acts.example(i)
                if row not in self.views:
                    ids = acts.input_ids[i][acts.token_mask[i].to(acts.input_ids.device)].tolist()
                    self.views[row] = self._view(row, tokenizer.convert_ids_to_tokens(ids), modality.cpu(),
                                                 row_images(images[i], row, column), inputs, i)
                yield row, hidden, modality, self.views[row]

    def _view(self, row: int, tokens: list[str], modality: torch.Tensor, images: list[Any], inputs: Any,
              index: int) -> RowView:
        view = RowView(row=row, tokens=tokens, modality=modality, images=images, grid_note=self._locator_note)
        if self._locator is not None:
            try:
                view.grids = self._locator.grids(inputs, example=index, image_sizes=[image.size for image in images])
            except (NotImplementedError, ValueError) as error:
                view.grid_note = f"No patch heatmap: {error}"
        return view
