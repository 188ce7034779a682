"""`SAEVScorer`: SAE-V's data-quality scores as a `datasets.map` function (Algorithm 1 stage 3, Algorithms 2-3).

For each example x, with the activation bound delta (`SAEVConfig.cooccurrence_threshold`, 1 in the authors' code):

- co-occurring features C(x) = {f : z_f > delta at some text position} & {f : z_f > delta at some image position};
- `saev_cosine_score`: sum of the cross-modal weights w_f over C(x) (features without a weight add 0);
- `saev_l0`: mean over the example's positions of the number of features with z > 0 (Algorithm 2);
- `saev_cooccur_l0`: |C(x)| (Algorithm 3).

Beyond the paper, only when asked for (`scores=[..., "cooccur_jaccard"]`): `saev_cooccur_jaccard`, |C(x)| over the
features the text or the image fires, and `saev_polarity_jaccard`, that score centred on `polarity_threshold` and
flipped for rows whose chosen response is a denial (`denial_pattern`). Both are measured against the paper's on the miniature's defect map
(`benchmarks/defect_map.py`).

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

import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch

from ..activations.mllm import load_model_and_processor
from ..activations.reader import Modality, image_token_id_of, text_and_image
from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..data.errors import RowError
from ..data.images import load_image, row_images
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field
from ..data.prompts import PromptFormat, prepare_inputs, row_indices, rows_to_columns
from ..runtime.devices import token_chunk_field
from ..runtime.distributed import distributed_state
from ..runtime.folders import OutputArguments, mark_output_complete
from .activity import (  # noqa: F401
    BatchActivity,
    ExampleActivity,
    example_activity,
    polarity_scores,
    segmented_activity,
)
from .baselines import (
    BASELINES,
    SAEV_OPTIONAL_SCORES,
    SAEV_SCORES,
    ClipScore,
    answer_alone_inputs,
    ifd_score,
    image_text_similarity,
    prompt_text,
    prompt_word_embeddings,
    response_log_likelihoods,
    response_text,
    response_token_counts,
)
from .identity import model_digest
from .map_function import MapFunctionArguments, SAEVMapFunction
from .mapping import MapArguments, map_placement, score_dataset

SCORES = SAEV_SCORES
"""SAE-V's own scores; [`BASELINES`] are the others the scorer computes."""


@dataclass
class ScorerArguments(MapFunctionArguments):
    """What the scorer computes, how it names its columns, and how rows reach the MLLM."""

    scores: list[str] = field(
        default_factory=lambda: list(SCORES),
        metadata={"help": "Scores to compute: SAE-V's cosine, l0, cooccur_l0 (cosine needs feature weights); beyond "
                  "the paper, cooccur_jaccard and polarity_jaccard (columns saev_<name>; polarity_jaccard needs "
                  "denial_pattern); and the baselines length, answer_log_likelihood, ifd, image_text_similarity, clip_score (columns named "
                  "as the score; see saev_hf.scoring.baselines). Baselines alone need no SAE-V."},
    )
    baseline_response_column: str = field(
        default="chosen",
        metadata={"help": "The response answer_log_likelihood and ifd read, when the prompt format names none "
                  "(response_column)."},
    )
    denial_pattern: str | None = field(
        default=None,
        metadata={"help": "Regular expression (Python re.search, case-insensitive) marking a chosen response as a "
                  "denial ('none', 'no', 'there is no ...'), for polarity_jaccard: e.g. '^(none|no)\\b'. The "
                  "response is the prompt format's response_column, else baseline_response_column."},
    )
    polarity_threshold: float | None = field(
        default=None,
        metadata={"help": "For polarity_jaccard: the cooccur_jaccard above which the image shows what the question "
                  "names (calibrate it on clean rows, e.g. midway between questions about present and about absent "
                  "objects). The score is jaccard - threshold for an affirmative chosen response, threshold - "
                  "jaccard for a denial."},
    )
    clip_model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP or SigLIP checkpoint (folder or Hub repo) for clip_score."})
    ifd_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The MLLM ifd is computed with, e.g. Li et al.'s 'cherry' model (the base model tuned "
                  "briefly on a sample: saev dpo --method sft). Default: the scorer's MLLM, sharing its forward."},
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
        known = [*SCORES, *SAEV_OPTIONAL_SCORES, *BASELINES]
        unknown = sorted(set(self.scores) - set(known))
        if unknown or not self.scores:
            raise ValueError(f"scores={self.scores} must be a non-empty subset of {known}.")
        if "polarity_jaccard" in self.scores:
            if not self.denial_pattern:
                raise ValueError("polarity_jaccard needs denial_pattern, the regular expression that marks a chosen "
                                 "response as a denial (e.g. --denial_pattern '^(none|no)\\b').")
            if self.polarity_threshold is None:
                raise ValueError("polarity_jaccard needs polarity_threshold, the cooccur_jaccard above which the "
                                 "image shows what the question names: score clean rows with cooccur_jaccard and "
                                 "take a level between those about present and about absent objects.")
        if self.denial_pattern is not None:
            try:
                re.compile(self.denial_pattern)
            except re.error as error:
                raise ValueError(f"denial_pattern={self.denial_pattern!r} is not a regular expression: {error}.") \
                    from None
        if "clip_score" in self.scores and not self.clip_model_name_or_path:
            raise ValueError("clip_score needs a CLIP or SigLIP checkpoint: pass clip_model_name_or_path "
                             "(--clip_model_name_or_path openai/clip-vit-large-patch14, or a folder).")
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

    def __init__(self, sae: Any, model: Any, processor: Any = None, prompt_format: PromptFormat | None = None,
                 args: ScorerArguments | None = None, layers: Any = None, model_dtype: str = "auto",
                 device_map: str | dict | None = None, clip_model: Any = None, clip_processor: Any = None,
                 ifd_model: Any = None, ifd_processor: Any = None) -> None:
        self.args = args or ScorerArguments()
        self._clip = ClipScore(clip_model, clip_processor) if clip_model is not None else None
        self._ifd_model, self._ifd_processor = ifd_model, ifd_processor
        self._warned_cooccurrence = False
        super().__init__(sae, model, processor, prompt_format, self.args, layers, model_dtype, device_map)

    # -------------------------------------------------------------------------------------------------------------
    # What is computed
    # -------------------------------------------------------------------------------------------------------------

    @property
    def needs_sae(self) -> bool:
        return bool(set(self.args.scores) & {*SCORES, *SAEV_OPTIONAL_SCORES})

    @property
    def _baselines(self) -> list[str]:
        return [score for score in BASELINES if score in self.args.scores]

    @property
    def _shares_response(self) -> bool:
        """Whether the forward runs on prompt and response (a response-reading score on the scorer's MLLM)."""
        wanted = set(self.args.scores)
        return "answer_log_likelihood" in wanted or ("ifd" in wanted and self.args.ifd_model_name_or_path is None
                                                     and self._ifd_model is None)

    def _response_column(self) -> str:
        return super()._reader_prompt_format().response_column or self.args.baseline_response_column

    def _reader_prompt_format(self) -> PromptFormat:
        """The columns the forward reads: with a response-reading score, the response too and the whole input (SAE-V's
        positions are then the prompt's, cut at max_length as the prompt alone would be)."""
        prompt_format = super()._reader_prompt_format()
        if self._shares_response:
            return replace(prompt_format, response_column=self._response_column(), max_length=None)
        return prompt_format

    def _score_columns(self) -> list[str]:
        return ([getattr(self.args, f"{score}_column") for score in SCORES if score in self.args.scores]
                + [f"saev_{score}" for score in SAEV_OPTIONAL_SCORES if score in self.args.scores] + self._baselines)

    def _column_types(self) -> dict[str, "pa.DataType"]:
        """Arrow type of each added column (with on_error='null', `__call__` returns typed arrays)."""
        kinds = {"cosine": pa.float64(), "l0": pa.float64(), "cooccur_l0": pa.int64(), "length": pa.int64()}
        types = {getattr(self.args, f"{score}_column"): kinds[score] for score in SCORES if score in self.args.scores}
        types.update({f"saev_{score}": pa.float64() for score in SAEV_OPTIONAL_SCORES if score in self.args.scores})
        types.update({name: kinds.get(name, pa.float64()) for name in self._baselines})
        return {**types, self.args.error_column: pa.string()}

    @property
    def identity(self) -> dict[str, Any]:
        identity = super().identity
        if "clip_score" in self.args.scores:
            identity["clip_model"] = model_digest(self._clip_score().model)
        if "ifd" in self.args.scores and not self._shares_response:
            identity["ifd_model"] = model_digest(self._ifd()[0])
        return identity

    def _clip_score(self) -> ClipScore:
        if self._clip is None:
            self._clip = ClipScore(self.args.clip_model_name_or_path)
        return self._clip

    def _ifd(self) -> tuple[Any, Any]:
        """The MLLM and processor IFD is computed with."""
        if self._shares_response or ("ifd" in self.args.scores and self.args.ifd_model_name_or_path is None
                                     and self._ifd_model is None):
            return self._model, self._processor
        if self._ifd_model is None:
            self._ifd_model, processor = load_model_and_processor(self.args.ifd_model_name_or_path,
                                                                  dtype=self.model_dtype)
            self._ifd_processor = self._ifd_processor or processor
        return self._ifd_model, self._ifd_processor or self._processor

    def _moved_to(self, device: torch.device) -> None:
        if self._clip is not None:
            self._clip.model.to(device)
        if self._ifd_model is not None:
            self._ifd_model.to(device)

    # -------------------------------------------------------------------------------------------------------------
    # Scoring
    # -------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_rows(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                   first_row: int | Sequence[int] = 0):
        """Scores of a batch of rows as `{column: [value per row]}`, in one forward; raises `RowError` for a row that
        cannot be scored. `first_row` is the dataset index of the first row, or of every row (for errors)."""
        self._validate()
        columns = rows_to_columns(rows)
        self._check_response_column(columns)
        inputs = self._reader.prepare(columns, first_row)
        return self._score_inputs(inputs, row_indices(first_row, inputs["input_ids"].shape[0]), columns)

    def _score_batch(self, batch: Mapping[str, Sequence[Any]], rows: list[int]):
        """A map batch in forward batches of `forward_batch_size` rows, prepared ahead by `preprocessing_workers`
        and grouped by length with `group_by_length` ([`prepared_batches`]); each forward batch's scores are put
        back at its rows' places, so the map gets them in the dataset's order."""
        self._check_response_column(batch)
        scores: dict[str, list[Any]] = {name: [None] * len(rows) for name in self._score_columns()}
        errors: list[str | None] = [None] * len(rows)
        for prepared in prepared_batches(self._reader, batch, self.args.forward_batch_size or len(rows),
                                         row_ids=rows, workers=self.args.preprocessing_workers,
                                         group_by_length=self.args.group_by_length):
            part = {name: [values[p] for p in prepared.positions] for name, values in batch.items()}
            try:
                out = self._score_inputs(prepared.check(), prepared.rows, part)
            except RowError:
                if self.args.on_error == "raise":
                    raise
                out, part_errors = self._isolate(part, prepared.rows)
                for position, error in zip(prepared.positions, part_errors):
                    errors[position] = error
            for name, values in out.items():
                for position, value in zip(prepared.positions, values):
                    scores[name][position] = value
        return scores, errors

    @torch.no_grad()
    def _score_inputs(self, inputs: Any, rows: list[int], columns: Mapping[str, Sequence[Any]]
                      ) -> dict[str, list[Any]]:
        """Scores of prepared inputs whose examples are dataset rows `rows` (their columns: `columns`), from one
        forward of the MLLM (run to the end only when a score reads the output)."""
        sae, reader, wanted = self._sae, self._reader, set(self.args.scores)
        out: dict[str, list[Any]] = {name: [] for name in self._score_columns()}
        lengths = inputs["attention_mask"].sum(1).tolist()
        counts = (response_token_counts(self._processor, columns, self._reader_prompt_format(),
                                        self._response_column(), rows) if self._shares_response else [0] * len(rows))
        prompt_ends = self._prompt_ends(inputs, lengths, counts, rows)
        if wanted - {"length", "clip_score", "ifd"} or self._shares_response:
            acts = reader.read_inputs(inputs, embeddings="image_text_similarity" in wanted,
                                      logits=self._shares_response)
            modality = acts.modality
        else:  # only scores that need no forward of the MLLM
            acts, modality = None, reader.modality(inputs["input_ids"], inputs["attention_mask"])
        if self._shares_response:
            sums, numbers = response_log_likelihoods(acts.logits, inputs["input_ids"], lengths, counts)
        if sae is not None:
            activity = self._activity(acts, prompt_ends, rows)
            self._warn_if_nothing_cooccurs(activity, rows)
            if "cosine" in wanted:
                out[self.args.cosine_column] = activity.cosine(sae.feature_weights).tolist()
            if "l0" in wanted:
                out[self.args.l0_column] = activity.l0.tolist()
            if "cooccur_l0" in wanted:
                out[self.args.cooccur_l0_column] = [int(count) for count in activity.cooccurring.sum(1)]
            if wanted & {"cooccur_jaccard", "polarity_jaccard"}:
                jaccard = activity.cooccur_jaccard
                if "cooccur_jaccard" in wanted:
                    out["saev_cooccur_jaccard"] = jaccard.tolist()
                if "polarity_jaccard" in wanted:
                    out["saev_polarity_jaccard"] = polarity_scores(jaccard, self._denies(columns, rows),
                                                                    self.args.polarity_threshold).tolist()
        for i, row in enumerate(rows):
            end = prompt_ends[i]
            if "length" in wanted:
                text, _ = text_and_image(modality[i, :end], self.args.special_as_text)
                out["length"].append(int(text.sum()))
            if "answer_log_likelihood" in wanted:
                out["answer_log_likelihood"].append(sums[i])
            if "image_text_similarity" in wanted:
                prompt = columns[super()._reader_prompt_format().prompt_column][i]
                words = prompt_word_embeddings(self._model, self._processor, prompt, row)
                image = (acts.modality[i] == Modality.IMAGE).to(acts.embeddings.device)
                out["image_text_similarity"].append(image_text_similarity(acts.embeddings[i], image, words, row))
        if "ifd" in wanted:
            out["ifd"] = self._ifd_scores(columns, rows, (sums, numbers) if self._shares_response else None)
        if "clip_score" in wanted:
            out["clip_score"] = self._clip_scores(columns, rows)
        return out

    def _activity(self, acts: Any, prompt_ends: list[int], rows: list[int]) -> BatchActivity:
        """SAE-V's activity over the scored positions of every example of the forward batch (each up to its prompt's
        end), encoded at once (`token_chunk` positions at a time) rather than example by example: the positions are
        laid out example by example, text then image ([`segmented_activity`])."""
        parts, bounds, start = [], [], 0
        for i, end in enumerate(prompt_ends):
            example_hidden, example_modality = acts.example(i)
            text, image = text_and_image(example_modality[:end], self.args.special_as_text)
            parts += [example_hidden[:end][text], example_hidden[:end][image]]
            text_end = start + int(text.sum())
            bounds.append((start, text_end, text_end + int(image.sum())))
            start = bounds[-1][2]
        return segmented_activity(self._sae, torch.cat(parts), bounds, rows, self.args.token_chunk,
                                  allow_tf32=self.args.allow_tf32)

    def _warn_if_nothing_cooccurs(self, activity: BatchActivity, rows: list[int]) -> None:
        """For an SAE-V without recorded activation statistics (a converted checkpoint, weights from an older
        version), which [`check_cooccurrence`] cannot check beforehand: warn, once, when no row of a batch has a
        co-occurring feature and none comes near delta (their scores are 0 because of delta, not of the data), with
        the numbers and the fix."""
        info = self._sae.config.feature_weights_info or {}
        wanted = {"cosine", "cooccur_l0"} & set(self.args.scores)
        if self._warned_cooccurrence or not wanted or info.get("cooccurrence_bound_max") is not None:
            return
        if bool(activity.cooccurring.any()):
            return
        bound = float(torch.minimum(activity.max_text, activity.max_image).max())
        delta = self._sae.config.cooccurrence_threshold
        self._warned_cooccurrence = True
        warnings.warn(
            f"No row of rows {rows[0]}..{rows[-1]} has a feature above cooccurrence_threshold (delta) = {delta:.4g} "
            f"on both its text and its image: the largest activation any feature reached on both is {bound:.4g}, so "
            f"their {' and '.join(sorted(wanted))} scores are 0 because of delta. This SAE-V records no activation "
            f"statistics to check delta against beforehand. Set a delta below {bound:.4g} (--cooccurrence_threshold), "
            f"or calibrate it: saev weights --threshold_quantile 0.5 (which also records the statistics).",
            stacklevel=2)

    def _check_response_column(self, columns: Mapping[str, Any]) -> None:
        readers = sorted(set(self.args.scores) & {"answer_log_likelihood", "ifd", "polarity_jaccard"})
        if readers and self._response_column() not in columns:
            raise KeyError(f"Column {self._response_column()!r} (the response {' and '.join(readers)} read) not "
                           f"found; the data has columns {sorted(columns)}. Pass baseline_response_column "
                           f"(--baseline_response_column) naming the response.")

    def _denies(self, columns: Mapping[str, Sequence[Any]], rows: list[int]) -> torch.Tensor:
        """Whether each row's chosen response is a denial (`denial_pattern`); the response must be text."""
        pattern = re.compile(self.args.denial_pattern, re.IGNORECASE)
        denies = []
        for response, row in zip(columns[self._response_column()], rows):
            text = response_text(response, row)
            denies.append(pattern.search(text) is not None)
        return torch.tensor(denies)

    def _prompt_ends(self, inputs: Any, lengths: list[int], counts: list[int], rows: list[int]) -> list[int]:
        """Where each row's prompt ends in the inputs (its response's tokens follow), cut at the prompt format's
        max_length as the prompt alone would be, refusing to cut an image (as [`truncate`] does)."""
        max_length = super()._reader_prompt_format().max_length
        ends = [length - count for length, count in zip(lengths, counts)]
        if not self._shares_response or max_length is None:
            return ends
        image_token = self._reader.image_token_id
        for i, end in enumerate(ends):
            if end > max_length and image_token is not None:
                cut = inputs["input_ids"][i, max_length:end] == image_token
                if cut.any():
                    raise RowError(f"Row {rows[i]}: max_length={max_length} would cut its image tokens (the prompt has "
                                   f"{end} tokens). Raise max_length or shorten the text before the image.")
        return [min(end, max_length) for end in ends]

    def _ifd_scores(self, columns: Mapping[str, Sequence[Any]], rows: list[int],
                    conditional: tuple[list[float], list[int]] | None) -> list[float]:
        """IFD of each row: the conditional log-likelihood from the shared forward (or the IFD model's own), the
        response alone from a text-only forward."""
        model, processor = self._ifd()
        if conditional is None:
            prompt_format = replace(super()._reader_prompt_format(), response_column=self._response_column(),
                                    max_length=None)
            inputs = prepare_inputs(processor, columns, prompt_format, image_token_id_of(model, processor), rows)
            counts = response_token_counts(processor, columns, prompt_format, self._response_column(), rows)
            logits = model(**_on_device(inputs, model), use_cache=False).logits
            conditional = response_log_likelihoods(logits, inputs["input_ids"], inputs["attention_mask"].sum(1).tolist(),
                                                   counts)
        alone, alone_counts = answer_alone_inputs(processor, columns[self._response_column()], rows)
        logits = model(**_on_device(alone, model), use_cache=False).logits
        alone_sums, _ = response_log_likelihoods(logits, alone["input_ids"], alone["attention_mask"].sum(1).tolist(),
                                                 alone_counts)
        return [ifd_score(c, n, a, m) for c, n, a, m in zip(*conditional, alone_sums, alone_counts)]

    def _clip_scores(self, columns: Mapping[str, Sequence[Any]], rows: list[int]) -> list[float]:
        prompt_format = super()._reader_prompt_format()
        images = [[load_image(value, row) for value in row_images(values, row, prompt_format.image_column)]
                  for values, row in zip(columns[prompt_format.image_column], rows)]
        texts = [prompt_text(prompt, row) for prompt, row in zip(columns[prompt_format.prompt_column], rows)]
        return self._clip_score()(images, texts, rows)


def _on_device(inputs: Any, model: Any) -> dict[str, Any]:
    parameter = next(model.parameters())
    return {name: (value.to(parameter.device, parameter.dtype) if value.is_floating_point() else
                   value.to(parameter.device)) if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()}


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
    baselines_alone = not set(args.scores) & {*SCORES, *SAEV_OPTIONAL_SCORES}
    if baselines_alone and sae_args.sae_name_or_path is not None:
        raise ValueError(f"scores={args.scores} are baselines alone, which need no SAE-V, but --sae_name_or_path "
                         f"{sae_args.sae_name_or_path} was given: add SAE-V scores (cosine, l0, cooccur_l0) or leave it "
                         f"out.")
    sae, model, processor, dataset = load_sources(None if baselines_alone else sae_args, placed, data_args,
                                                 fetch_column=prompt_format.image_column)
    scorer = SAEVScorer(sae, model, processor, prompt_format=prompt_format, args=args)
    scored = score_dataset(scorer, dataset, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                           with_rank=with_rank, output_dir=output.output_dir)
    state = distributed_state()
    if state is None or state.is_main_process:
        data_args.write_fetch_report(output.output_dir)
        mark_output_complete(output.output_dir)
    return scored, scorer.columns
