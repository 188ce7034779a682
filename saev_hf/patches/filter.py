"""[`PatchFilter`]: the patch filter as a `datasets.map` function, and `saev patches` ([`run_patch_filter`])."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..activations.reader import Modality, scored_positions
from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..data.images import row_images, undecoded_images
from ..data.prompts import PromptFormat, _column, rows_to_columns
from ..runtime.folders import OutputArguments, mark_output_complete
from ..scoring.activity import batch_activity
from ..scoring.map_function import MapFunctionArguments, SAEVMapFunction
from ..scoring.mapping import MapArguments, map_placement
from .geometry import PatchLocator
from .preview import save_patch_preview
from .scores import PATCH_SCORES, ImagePatchScores, mask_patches, token_patch_scores


@dataclass
class PatchFilterArguments(MapFunctionArguments):
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

    def __post_init__(self) -> None:
        super().__post_init__()
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

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.fill.split(","))  # type: ignore[return-value]

    @property
    def scores(self) -> list[str]:
        """SAE-V scores this filter needs (what [`SAEVScorer`]'s checks read)."""
        return [] if self.score == "random" else [self.score]


class PatchFilter(SAEVMapFunction):
    """
    SAE-V patch scores of image-text rows (Algorithms 4-7), and, called by `ds.map(batched=True)`, the patch filter.

    Args:
        sae, model, processor, prompt_format, layers: as for [`SAEVScorer`] (the prompt gives the text side of C(x)).
        args ([`PatchFilterArguments`], *optional*): the score that ranks patches and the fraction kept by the filter.

    `score_rows(rows)` gives, per row and image, every patch score on the base grid ([`ImagePatchScores`]).
    As a map function it replaces each image of the image column by its masked copy (top `keep_fraction` of the
    patches by `args.score`, the rest filled) and adds the score grids. What it shares with [`SAEVScorer`] (loading,
    checks, identity and caching, devices, per-row errors) comes from their common base [`SAEVMapFunction`]: a
    patch filter is not a scorer, its map output is masked images.
    """

    arguments_class = PatchFilterArguments

    def __init__(self, sae: Any, model: Any, processor: Any = None, prompt_format: PromptFormat | None = None,
                 args: PatchFilterArguments | None = None, layers: Any = None, model_dtype: str = "auto",
                 device_map: str | dict | None = None) -> None:
        super().__init__(sae, model, processor, prompt_format=prompt_format,
                         args=args or PatchFilterArguments(), layers=layers, model_dtype=model_dtype,
                         device_map=device_map)
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
        weights = sae.feature_weights.float()
        out = []
        for i in range(len(acts)):
            grids = self.locator.grids(inputs, example=i, image_sizes=sizes[i])
            hidden, modality = acts.example(i)
            counted = scored_positions(modality, self.args.special_as_text)
            hidden, modality = hidden[counted], modality[counted]
            z_image = []
            image = modality == Modality.IMAGE

            def keep_image_activations(z: torch.Tensor, part: slice) -> None:
                z_image.append(z[image[part].to(z.device)].float())  # the patch scores are per image token

            # C(x) as the scorer computes it, with every position in one chunk (as the patch scores always were)
            activity = batch_activity(sae, hidden, modality, torch.zeros_like(modality, dtype=torch.long),
                                      [first_row + i], self.args.special_as_text, None, on_chunk=keep_image_activations,
                                      allow_tf32=self.args.allow_tf32)
            z_image = torch.cat(z_image)
            per_token = token_patch_scores(z_image, activity.cooccurring[0], weights.to(z_image.device))
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


def run_patch_filter(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
                     prompt_format: PromptFormat, args: PatchFilterArguments, map_args: MapArguments,
                     output: OutputArguments):
    """
    `saev patches`: load what the arguments name, mask every image of the dataset with `datasets.map` (as `map_args`
    say), save the result to `output.output_dir` with `preview.png` (originals above, masked below). Returns
    `(masked dataset, preview path)`.
    """
    data_args.check_source(model_args, "saev patches")
    output.prepare("saev patches", cpu=model_args.device == "cpu")
    placed, with_rank = map_placement(model_args, map_args)  # with num_proc: no CUDA in the parent before the fork
    sae, model, processor, dataset = load_sources(sae_args, placed, data_args,
                                                 fetch_column=prompt_format.image_column)
    patch_filter = PatchFilter(sae, model, processor, prompt_format=prompt_format, args=args)
    # the filter reads the image bytes itself, so that a corrupt image names its row (or costs one null row)
    dataset, image_feature = undecoded_images(dataset, prompt_format.image_column)
    masked = dataset.map(patch_filter, batched=True, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                         with_indices=True, with_rank=with_rank, desc=f"Patch filter ({args.score})")
    if image_feature is not None:
        masked = masked.cast_column(prompt_format.image_column, image_feature)
    masked.save_to_disk(output.output_dir)
    data_args.write_fetch_report(output.output_dir)
    preview = save_patch_preview(dataset, masked, Path(output.output_dir) / "preview.png",
                                 image_column=prompt_format.image_column,
                                 title=f"{args.score}: top {args.keep_fraction:.0%} of patches kept")
    mark_output_complete(output.output_dir)
    return masked, preview
