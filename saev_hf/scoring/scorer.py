"""`SAEVScorer`: SAE-V's data-quality scores as a `datasets.map` function (Algorithm 1 stage 3, Algorithms 2-3).

For each example x, with the activation bound delta (`SAEVConfig.cooccurrence_threshold`, 1 in the authors' code):

- co-occurring features C(x) = {f : z_f > delta at some text position} & {f : z_f > delta at some image position};
- `saev_cosine_score`: sum of the cross-modal weights w_f over C(x) (features without a weight add 0);
- `saev_l0`: mean over the example's positions of the number of features with z > 0 (Algorithm 2);
- `saev_cooccur_l0`: |C(x)| (Algorithm 3).

```python
scorer = SAEVScorer(sae, model, processor)
ds = ds.map(scorer, batched=True, batch_size=8)   # cached by datasets like any other map
```

Caching: `datasets` fingerprints a map by pickling its function. A scorer pickles to its *identity* (digests of the
SAE-V's weights, of the MLLM's name and a sample of its weights, of the processor, the settings and the code version),
never to the weights themselves, so the fingerprint is cheap, stable across processes, and a second identical map hits
the cache. The identity follows the objects: change the SAE-V or the MLLM in place (new feature weights, a training
step, another delta) and the next map gets a new fingerprint, never the old cached scores. In `num_proc` workers the
scorer finds its live objects again (fork); a worker that must reload them from their paths (spawn) checks that it
loaded exactly what the parent scores, and otherwise stops with an error that says to save them first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch

from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..data.errors import RowError
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field
from ..data.prompts import PromptFormat, row_indices
from ..runtime.devices import token_chunk_field
from ..runtime.folders import OutputArguments
from .activity import ExampleActivity, example_activity  # noqa: F401  (their home before saev_hf.scoring.activity)
from .map_function import MapFunctionArguments, SAEVMapFunction
from .mapping import MapArguments, map_placement, score_dataset

SCORES = ("cosine", "l0", "cooccur_l0")


@dataclass
class ScorerArguments(MapFunctionArguments):
    """What the scorer computes, how it names its columns, and how rows reach the MLLM."""

    scores: list[str] = field(
        default_factory=lambda: list(SCORES),
        metadata={"help": "Scores to compute: any of cosine, l0, cooccur_l0 (cosine needs feature weights)."},
    )
    cosine_column: str = field(default="saev_cosine_score", metadata={"help": "Column of the cosine-similarity score."})
    l0_column: str = field(default="saev_l0", metadata={"help": "Column of the L0 score."})
    cooccur_l0_column: str = field(default="saev_cooccur_l0", metadata={"help": "Column of the co-occurring L0."})
    token_chunk: int = token_chunk_field()
    forward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per forward of the MLLM. None runs each map batch in one forward (the map's "
                  "batch_size). Set it (e.g. 8) with a map batch_size several times larger (e.g. 128) to prepare "
                  "forward batches ahead (preprocessing_workers) and group them by length (group_by_length)."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Within each map batch, put rows of similar length (number of images, then characters of "
                  "text) into the same forward batch, to cut padding; scores come back in the dataset's order and "
                  "do not change. Needs forward_batch_size; the map batch is the window."},
    )
    preprocessing_workers: int = preprocessing_workers_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.scores) - set(SCORES))
        if unknown or not self.scores:
            raise ValueError(f"scores={self.scores} must be a non-empty subset of {list(SCORES)}.")
        if self.token_chunk <= 0:
            raise ValueError(f"token_chunk={self.token_chunk} must be positive.")
        check_workers(self.preprocessing_workers)
        if self.forward_batch_size is not None and (isinstance(self.forward_batch_size, bool)
                                                    or self.forward_batch_size <= 0):
            raise ValueError(f"forward_batch_size={self.forward_batch_size!r} must be a positive number of rows "
                             f"(or None: one forward per map batch).")
        if self.forward_batch_size is None and (self.group_by_length or self.preprocessing_workers):
            raise ValueError(
                f"group_by_length={self.group_by_length} and preprocessing_workers={self.preprocessing_workers} "
                f"work on the forward batches of a map batch, but forward_batch_size is None (one forward per map "
                f"batch). Set forward_batch_size (e.g. 8) and give the map a larger batch_size (e.g. 128)."
            )


class SAEVScorer(SAEVMapFunction):
    """
    A `datasets.map(batched=True)` function adding SAE-V data-quality scores to an image-text dataset.

    Args:
        sae ([`SAEV`] or `str`): the SAE-V (with feature weights for the cosine score), or its folder / Hub repo.
        model (`PreTrainedModel` or `str`): the MLLM the SAE-V reads, or its folder / Hub repo.
        processor (*optional*): its processor; loaded from `model`'s path when omitted.
        prompt_format ([`PromptFormat`], *optional*): image / prompt / response columns (TRL layout by default; the
            paper scores the prompt and image only).
        args ([`ScorerArguments`], *optional*): scores, column names, error handling.
        layers (*optional*): where the decoder layers are, for models whose structure hides them.
        model_dtype (`str`): with `model` a path, the dtype it is loaded in (one of `MODEL_DTYPES`; 'auto', the
            default, is the checkpoint's own, as transformers' `dtype="auto"`).
        device_map (*optional*): with `model` a path, where it is placed while loading (transformers'
            `device_map`: 'auto', 'cuda:0', ...); None leaves it on the CPU until `with_rank` moves it to a GPU.
            An SAE-V given by path goes on the device of the layer it reads. Both settings are part of the scorer's
            identity, so scores cached for a bfloat16 model are never reused for a float32 one.

    An SAE-V and a model handed in as objects must be on the same device (the layer's): a `ValueError` names both
    devices otherwise; nothing is moved between them batch by batch.

    Scores do not depend on batch size, batch composition or padding. Call with `with_rank=True` and `num_proc` equal
    to the number of GPUs to score on one GPU per process (with the model on the CPU until then: a worker forked
    after CUDA was initialised cannot use it); `with_indices=True` makes errors name dataset rows.

    To keep an accelerator busy, give the map large batches and let the scorer split them ([`ScorerArguments`]):
    `forward_batch_size` rows per forward, `preprocessing_workers` DataLoader workers preparing the next forward
    batches while the model runs, `group_by_length` to group rows of similar length (the map batch is the window).
    Scores come back in the map batch's order and unchanged; these settings are not part of the fingerprint.

    ```python
    args = ScorerArguments(forward_batch_size=8, group_by_length=True, preprocessing_workers=4)
    ds = ds.map(SAEVScorer(sae, model, processor, args=args), batched=True, batch_size=128, with_indices=True)
    ```

    `datasets` decodes an `Image` column before the scorer sees it, and a corrupt image then fails inside `datasets`.
    To have such rows reported by row (or given null scores with `on_error="null"`), keep the column undecoded:
    `ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))` (or
    `saev_hf.data.undecoded_images(ds, "images")`); the scorer reads the bytes itself. `saev score` and `saev patches`
    do this, and cast the column back before saving.
    """

    arguments_class = ScorerArguments

    def _score_columns(self) -> list[str]:
        return [getattr(self.args, f"{score}_column") for score in SCORES if score in self.args.scores]

    def _column_types(self) -> dict[str, "pa.DataType"]:
        """Arrow type of each added column (with on_error='null', `__call__` returns typed arrays)."""
        kinds = {"cosine": pa.float64(), "l0": pa.float64(), "cooccur_l0": pa.int64()}
        types = {getattr(self.args, f"{score}_column"): kinds[score] for score in SCORES if score in self.args.scores}
        return {**types, self.args.error_column: pa.string()}

    @torch.no_grad()
    def score_rows(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                   first_row: int | Sequence[int] = 0):
        """Scores of a batch of rows as `{column: [value per row]}`, in one forward; raises `RowError` for a row that
        cannot be scored. `first_row` is the dataset index of the first row, or of every row (for errors)."""
        self._validate()
        inputs = self._reader.prepare(rows, first_row)
        return self._score_inputs(inputs, row_indices(first_row, inputs["input_ids"].shape[0]))

    def _score_batch(self, batch: Mapping[str, Sequence[Any]], rows: list[int]):
        """A map batch in forward batches of `forward_batch_size` rows, prepared ahead by `preprocessing_workers`
        and grouped by length with `group_by_length` ([`prepared_batches`]); each forward batch's scores are put
        back at its rows' places, so the map gets them in the dataset's order."""
        scores: dict[str, list[Any]] = {name: [None] * len(rows) for name in self._score_columns()}
        errors: list[str | None] = [None] * len(rows)
        for prepared in prepared_batches(self._reader, batch, self.args.forward_batch_size or len(rows),
                                         row_ids=rows, workers=self.args.preprocessing_workers,
                                         group_by_length=self.args.group_by_length):
            try:
                out = self._score_inputs(prepared.check(), prepared.rows)
            except RowError:
                if self.args.on_error == "raise":
                    raise
                part = {name: [values[p] for p in prepared.positions] for name, values in batch.items()}
                out, part_errors = self._isolate(part, prepared.rows)
                for position, error in zip(prepared.positions, part_errors):
                    errors[position] = error
            for name, values in out.items():
                for position, value in zip(prepared.positions, values):
                    scores[name][position] = value
        return scores, errors

    @torch.no_grad()
    def _score_inputs(self, inputs: Any, rows: list[int]) -> dict[str, list[Any]]:
        """Scores of prepared inputs whose examples are dataset rows `rows`."""
        sae, reader = self._sae, self._reader
        acts = reader.read_inputs(inputs)
        out = {name: [] for name in self._score_columns()}
        for i in range(len(acts)):  # one example at a time: a score never depends on the rest of its batch
            hidden, modality = acts.example(i)
            activity = example_activity(sae, hidden, modality, rows[i], self.args.special_as_text,
                                        self.args.token_chunk, allow_tf32=self.args.allow_tf32)
            if "cosine" in self.args.scores:
                out[self.args.cosine_column].append(activity.cosine(sae.feature_weights))
            if "l0" in self.args.scores:
                out[self.args.l0_column].append(activity.l0)
            if "cooccur_l0" in self.args.scores:
                out[self.args.cooccur_l0_column].append(int(activity.cooccurring.sum()))
        return out


def run_scoring(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
                prompt_format: PromptFormat, args: ScorerArguments, map_args: MapArguments, output: OutputArguments):
    """
    `saev score`: load what the arguments name, add the scores to every row with `datasets.map` (as `map_args` say)
    and save the scored dataset to `output.output_dir`. Returns `(scored dataset, added columns)`.

    With `map_args.num_proc`, one worker per GPU ([`map_placement`]): the model is loaded on the CPU here and each
    worker moves it to its GPU. `args.forward_batch_size`, `group_by_length` and `preprocessing_workers` set the
    input pipeline inside each map batch (`map_args.batch_size` rows: the length-grouping window).

    Under `torchrun` / `accelerate launch`, each process scores its shard on its own device and the main process
    writes the assembled dataset ([`score_dataset`]); every process returns it.
    """
    data_args.check_source(model_args, "saev score")
    # under a launcher, each process joins its group here (device "auto" is then its own accelerator)
    output.prepare("saev score", cpu=model_args.device == "cpu")
    placed, with_rank = map_placement(model_args, map_args)  # with num_proc: no CUDA in the parent before the fork
    sae, model, processor, dataset = load_sources(sae_args, placed, data_args)
    scorer = SAEVScorer(sae, model, processor, prompt_format=prompt_format, args=args)
    scored = score_dataset(scorer, dataset, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                           with_rank=with_rank, output_dir=output.output_dir)
    return scored, scorer.columns
