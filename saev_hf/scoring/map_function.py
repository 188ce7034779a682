"""[`SAEVMapFunction`]: the machinery every SAE-V `datasets.map(batched=True)` function shares ([`SAEVScorer`]'s
scores, [`saev_hf.patches.PatchFilter`]'s masked images): it loads and checks the SAE-V and the MLLM lazily, pickles
to their identity ([`saev_hf.scoring.identity`]) so that `datasets` caches the map, moves to a worker's device, and
runs batches with per-row error isolation.

Caching: `datasets` fingerprints a map by pickling its function. A map function pickles to its *identity* (digests of
the SAE-V's weights, of the MLLM's name and a sample of its weights, of the processor, the settings and the code
version), never to the weights themselves, so the fingerprint is cheap, stable across processes, and a second
identical map hits the cache. The identity follows the objects: change the SAE-V or the MLLM in place (new feature
weights, a training step, another delta) and the next map gets a new fingerprint, never the old cached scores. In
`num_proc` workers the function finds its live objects again (fork); a worker that must reload them from their paths
(spawn) checks that it loaded exactly what the parent scores, and otherwise stops with an error that says to save
them first.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch
from transformers import AutoProcessor

from .._version import __version__
from ..activations.mllm import check_model_dtype, check_multimodal_processor, load_model_and_processor
from ..activations.reader import LayerReader, layer_device, special_as_text_field
from ..data.errors import RowError
from ..data.prompts import PromptFormat
from ..model.cooccurrence import check_cooccurrence
from ..model.modeling import SAEV
from ..runtime.devices import allow_tf32_field, choose_device
from .identity import _absolute, _digest, _state_key, model_digest, processor_digest

# Live scorers by identity: a worker forked by `ds.map(num_proc=...)` inherits this table and so finds the model that
# the parent process already holds, instead of loading it again.
_LIVE: "weakref.WeakValueDictionary[str, SAEVMapFunction]" = weakref.WeakValueDictionary()


PIPELINE_FIELDS = ("forward_batch_size", "group_by_length", "preprocessing_workers")
"""Arguments that say how rows reach the model, not what is computed: scores do not depend on them, so they are left
out of a scorer's identity (a map cached with one setting is hit with another)."""


class TypedColumn(list):
    """
    A list of column values that knows its Arrow type (pyarrow's `__arrow_array__` protocol, which `datasets`' writer
    honours): a batch whose values are all None is then written as nulls of that type, not as a column of type null
    that the next batch's values cannot be written to.
    """

    def __init__(self, values: Sequence[Any], arrow_type: "pa.DataType") -> None:
        super().__init__(values)
        self.arrow_type = arrow_type

    def __arrow_array__(self, type: "pa.DataType | None" = None) -> "pa.Array":
        return pa.array(list(self), type=type or self.arrow_type)


@dataclass
class MapFunctionArguments:
    """What every SAE-V map function ([`SAEVScorer`], [`saev_hf.patches.PatchFilter`]) shares: which positions count
    as text, what a row that cannot be processed gets, and the encode's precision."""

    special_as_text: bool = special_as_text_field()
    on_error: str = field(
        default="raise",
        metadata={"help": "'raise': a row that cannot be processed stops the map with a clear error naming it. 'null': "
                  "it gets null values and the reason in `error_column`.", "choices": ("raise", "null")},
    )
    error_column: str = field(default="saev_error", metadata={"help": "Reason column used with on_error='null'."})
    allow_tf32: bool = allow_tf32_field()

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "null"):
            raise ValueError(f"on_error={self.on_error!r} must be 'raise' or 'null'.")


class SAEVMapFunction:
    """
    The machinery every SAE-V `datasets.map(batched=True)` function shares: [`SAEVScorer`] (scores) and
    [`saev_hf.patches.PatchFilter`] (masked images) each say only what they compute from a batch (`score_rows`) and
    which columns it makes; this base class loads, checks and identifies the SAE-V and the MLLM, pickles to that
    identity (so `datasets` caches the map), moves to the worker's device, and runs batches with per-row error
    isolation (`on_error="null"`).

    Args: as for [`SAEVScorer`]; `args` is the subclass's arguments dataclass, a [`MapFunctionArguments`] (with
    `scores`).
    """

    arguments_class: type
    """The arguments dataclass (built with its defaults when `args` is not given): each subclass names its own."""

    def __init__(self, sae: Any, model: Any, processor: Any = None, prompt_format: PromptFormat | None = None,
                 args: Any = None, layers: Any = None, model_dtype: str = "auto",
                 device_map: str | dict | None = None) -> None:
        check_model_dtype(model_dtype)
        if not isinstance(model, str) and (model_dtype != "auto" or device_map is not None):
            raise ValueError(
                f"model_dtype={model_dtype!r} and device_map={device_map!r} say how to load the MLLM from its path, "
                f"but a loaded {type(model).__name__} was given: load it in that dtype and place it yourself "
                f"(from_pretrained(..., dtype=..., device_map=...)), or pass its path."
            )
        self.args = args or self.arguments_class()
        if sae is None and self.needs_sae:
            raise ValueError(f"{type(self).__name__} was given no SAE-V, but the scores it computes need one.")
        self.prompt_format = prompt_format
        self.layers = layers
        self.model_dtype = model_dtype
        self.device_map = device_map
        # absolute paths: a scorer restored in another working directory (a worker, a later process) finds them again
        self._sae_source = _absolute(sae if isinstance(sae, str) else getattr(sae, "name_or_path", None))
        self._model_source = _absolute(
            model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None))
        self._processor_source = _absolute(processor) if isinstance(processor, str) else self._model_source
        self._sae = None if isinstance(sae, str) else sae
        self._model = None if isinstance(model, str) else model
        self._processor = None if isinstance(processor, str) else processor
        self._reader: LayerReader | None = None
        self._device: torch.device | None = None
        self._identity: dict[str, Any] | None = None
        self._identity_key: Any = None
        self._checked_key: Any = None
        # set by `_restore` in a worker that reloads the objects: the identity the parent scored, checked at first use
        self._expected_identity: dict[str, Any] | None = None
        self._pid = os.getpid()
        if (self._sae is not None or not self.needs_sae) and self._model is not None:
            self._validate()
            _LIVE[self.fingerprint] = self

    # -------------------------------------------------------------------------------------------------------------
    # Identity, pickling and lazy loading
    # -------------------------------------------------------------------------------------------------------------

    @property
    def identity(self) -> dict[str, Any]:
        """What determines this scorer's outputs now; its pickled state and so its `datasets` fingerprint.

        Recomputed whenever a tensor of the SAE-V or the MLLM was changed in place (or replaced) since the last time,
        and whenever a setting changed: the fingerprint always describes what is scored."""

        if self._expected_identity is not None and (self._sae is None or self._model is None):
            return self._expected_identity  # a restored worker that has not loaded its objects yet
        sae, model, processor = self._load()
        sae_config = sae.config.to_json_string(use_diff=False) if sae is not None else None
        key = (_state_key(sae) if sae is not None else "no SAE-V", _state_key(model), sae_config)
        if self._identity is None or None in key[:2] or key != self._identity_key:
            self._identity = {
                "saev_hf": __version__,
                "kind": type(self).__name__,
                "sae": _digest(sae_config, *sae.state_dict().values()) if sae is not None else None,
                "model": model_digest(model),
                "processor": None,
                "layer": None,
                "prompt_format": None,
                "args": None,
                # how a model given by path is loaded: a bfloat16 and a float32 scorer never share cached scores
                "model_dtype": self.model_dtype,
                "device_map": self.device_map,
            }
            self._identity_key = key
        # cheap parts, read every time: the processor's settings, the columns and the scorer's own arguments
        self._identity.update(processor=processor_digest(processor), layer=self._layer(sae),
                              prompt_format=asdict(self._reader_prompt_format()),
                              args={k: v for k, v in asdict(self.args).items() if k not in PIPELINE_FIELDS})
        return dict(self._identity)

    @property
    def fingerprint(self) -> str:
        """A short stable hash of `identity`."""
        return _digest(self.identity)[:32]

    def __reduce__(self):
        sources = (self._sae_source, self._model_source, self._processor_source)
        identity = self.identity
        fingerprint = _digest(identity)[:32]
        if self._sae is not None:
            _LIVE[fingerprint] = self  # a worker forked after this finds exactly these objects
        loading = {"model_dtype": self.model_dtype, "device_map": self.device_map}
        # the input pipeline's settings stay out of the pickle, so that they leave datasets' fingerprint alone: a
        # forked worker finds this scorer (settings included) in _LIVE; one that reloads from the paths (spawn)
        # prepares its rows without workers or grouping, which gives the same scores
        return (_restore, (type(self), fingerprint, identity, sources, self.prompt_format,
                           _without_pipeline(self.args), loading))

    def _check_restored(self) -> None:
        """In a worker that reloaded the SAE-V / MLLM from their paths: refuse to score anything but what the parent
        process scores (it may have changed them in memory after loading or saving)."""
        expected, self._expected_identity = self._expected_identity, None
        actual = self.identity
        differ = [name for name in ("sae", "model", "processor") if expected.get(name) != actual.get(name)]
        if differ:
            what = {"sae": f"SAE-V (reloaded from {self._sae_source!r})",
                    "model": f"MLLM (reloaded from {self._model_source!r})",
                    "processor": f"processor (reloaded from {self._processor_source!r})"}
            raise ValueError(
                f"This worker process reloaded the {' and the '.join(what[name] for name in differ)} from disk, but "
                f"the parent process scores a different one: it was changed in memory after it was loaded or saved "
                f"(e.g. compute_feature_weights, a training step, another cooccurrence_threshold). Save it "
                f"(save_pretrained) and create the scorer from the saved folder, or map without num_proc (or with "
                f"the 'fork' start method, whose workers share the parent's objects)."
            )

    def _load(self):


        place_sae = self._sae is None and self.needs_sae  # an SAE-V built here is placed on its layer's device
        if place_sae:
            self._sae = SAEV.from_pretrained(self._require(self._sae_source, "SAE-V"))
        if self._model is None:
            self._model, loaded_processor = load_model_and_processor(
                self._require(self._model_source, "model"), dtype=self.model_dtype, device_map=self.device_map)
            if self._processor is None and self._processor_source == self._model_source:
                self._processor = loaded_processor
        if place_sae:
            self._sae.to(layer_device(self._model, self._sae.config.hook_layer, self.layers))
        if self._processor is None:
            self._processor = AutoProcessor.from_pretrained(self._require(self._processor_source, "processor"))
            check_multimodal_processor(self._processor, self._processor_source)
        return self._sae, self._model, self._processor

    @staticmethod
    def _require(source: str | None, what: str) -> str:
        if not source:
            raise ValueError(
                f"This scorer was moved to another process, which must load the {what} again, but it was given an "
                f"in-memory {what} with no path. Save it (save_pretrained) and pass its folder, or use the default "
                f"'fork' start method so that workers share the parent's objects."
            )
        return source

    def _reader_prompt_format(self) -> PromptFormat:
        if self.prompt_format is not None:
            return self.prompt_format
        return PromptFormat(image_column="images")

    def _validate(self) -> None:
        sae, model, processor = self._load()
        if self._expected_identity is not None:
            self._check_restored()
        if sae is None:
            if self.needs_sae:
                raise ValueError(f"{type(self).__name__} was given no SAE-V, but the scores it computes need one.")
            if self._reader is None:
                self._reader = LayerReader(model, processor, layer=0, prompt_format=self._reader_prompt_format(),
                                           layers=self.layers)
            return
        if sae.config.hook_layer is None:
            raise ValueError("The SAE-V's config has no hook_layer; set sae.config.hook_layer to the layer it reads.")
        if self._reader is None:
            self._reader = LayerReader(model, processor, layer=sae.config.hook_layer,
                                       prompt_format=self._reader_prompt_format(), layers=self.layers)
        self._reader.check_sae(sae)
        if self._reader.image_token_id is None:
            raise ValueError(f"{type(model).__name__} has no image token: SAE-V scores need an image-text model.")
        state = _state_key(sae)
        key = None if state is None else (state, sae.config.to_json_string(use_diff=False))
        if key is None or key != self._checked_key:  # values checked once per state of the SAE-V, not per batch

            sae.check_finite()
            if {"cosine", "cooccur_l0"} & set(self.args.scores):
                check_cooccurrence(sae, where=f"starting {type(self).__name__}")
            self._checked_key = key
        if "cosine" in self.args.scores and sae.config.feature_weights_info is None:
            raise ValueError(
                "The cosine score needs the SAE-V's cross-modal feature weights, which were never computed for it. "
                "Compute them (saev_hf.weighting.compute_feature_weights or `saev weights`), or ask only for "
                "scores=['l0', 'cooccur_l0']."
            )

    def _to_device(self, rank: int | None) -> None:

        if self.device_map is not None or getattr(self._model, "hf_device_map", None) is not None:
            return  # placed by device_map while loading: it stays there (and the SAE-V with its layer)
        want = choose_device(rank=rank) if rank is not None else None
        if want is not None and want.type != "cpu" and self._device != want:
            self._model.to(want)
            if self._sae is not None:
                self._sae.to(want)
            self._moved_to(want)
            self._device = want

    def _moved_to(self, device: torch.device) -> None:
        """Move what a subclass holds besides the SAE-V and the MLLM to `device` (a worker's GPU)."""

    @property
    def needs_sae(self) -> bool:
        """Whether what this function computes needs an SAE-V (a subclass may compute scores without one)."""
        return True

    @staticmethod
    def _layer(sae: Any) -> int | None:
        return sae.config.hook_layer if sae is not None else None

    # -------------------------------------------------------------------------------------------------------------
    # Scoring
    # -------------------------------------------------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """Names of the columns this scorer adds."""
        return self._score_columns() + ([self.args.error_column] if self.args.on_error == "null" else [])

    def __call__(self, batch: Mapping[str, Sequence[Any]], *extra: Any, row_offset: int = 0) -> dict[str, list[Any]]:
        """Score a `datasets` batch; extra arguments are the `indices` (with_indices) and/or `rank` (with_rank).
        `row_offset` (a map's `fn_kwargs`) is added to the indices, so that a shard's errors name the rows of the
        whole dataset ([`score_dataset`] on several processes).

        Returns `{column: values}`, lists (with `on_error="null"`, [`TypedColumn`] lists that carry their Arrow
        type, so that a batch whose values are all null keeps the column's type)."""
        indices = next((e for e in extra if isinstance(e, (list, range))), None)
        rank = next((e for e in extra if isinstance(e, int) and not isinstance(e, bool)), None)
        if os.getpid() != self._pid:
            # A worker forked by ds.map(num_proc=...): the parent's OpenMP thread pool does not survive fork and
            # hangs the first parallel op (seen in oneDNN convolutions). One thread per worker runs ops inline.
            torch.set_num_threads(1)
            self._pid = os.getpid()
        self._validate()
        self._check_is_batch(batch)
        self._to_device(rank)
        n = len(next(iter(batch.values()))) if batch else 0
        if n == 0:  # an empty batch (e.g. a shard without rows) adds empty columns
            types = self._column_types()
            return {name: TypedColumn([], types[name]) if name in types else [] for name in self.columns}
        rows = list(indices) if indices is not None else list(range(n))
        scores, errors = self._score_batch(batch, [row + row_offset for row in rows])
        if self.args.on_error == "null":
            scores[self.args.error_column] = errors
            # Typed arrays: a batch whose rows all succeed (or all fail) would otherwise give an all-None column that
            # datasets types as null, and the next batch's reasons (or scores) could not be written to it.
            types = self._column_types()
            scores = {name: TypedColumn(values, types[name]) if name in types else values
                      for name, values in scores.items()}
        return scores

    def _score_batch(self, batch: Mapping[str, Sequence[Any]], rows: list[int]):
        """`(columns, errors)` of a map batch whose dataset indices are `rows`: each column's values and each row's
        error (None when it was scored), in the batch's order. With on_error='raise' a `RowError` propagates."""
        try:
            return self.score_rows(batch, rows[0]), [None] * len(rows)
        except RowError:
            if self.args.on_error == "raise":
                raise
            return self._isolate(batch, rows)

    def _isolate(self, batch: Mapping[str, Sequence[Any]], rows: list[int]):
        """Score the rows of a batch that failed one at a time: the others get the values a batch would give them,
        the failing ones None and their reason."""
        scores: dict[str, list[Any]] = {name: [] for name in self._score_columns()}
        errors: list[str | None] = []
        for i, row in enumerate(rows):
            try:
                row_scores = self.score_rows({k: [v[i]] for k, v in batch.items()}, row)
                error = None
            except RowError as exc:
                row_scores, error = {name: [None] for name in scores}, str(exc)
            for name in scores:
                scores[name].append(row_scores[name][0])
            errors.append(error)
        return scores, errors

    def _score_columns(self) -> list[str]:
        """The columns `score_rows` returns (a subclass says)."""
        raise NotImplementedError

    def _column_types(self) -> dict[str, "pa.DataType"]:
        """Arrow type of each added column (a subclass says; with on_error='null', `__call__` returns typed arrays)."""
        raise NotImplementedError

    def score_rows(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], first_row: int = 0):
        """What the map adds for a batch of rows, `{column: [value per row]}`; raises `RowError` for a row that
        cannot be processed (a subclass says)."""
        raise NotImplementedError

    def _check_is_batch(self, batch: Mapping[str, Any]) -> None:
        """Refuse one row passed as a batch (`ds.map(scorer)` without `batched=True`): its lists would be read as
        columns, and its text as a column of characters."""
        prompt = batch.get(self._reader_prompt_format().prompt_column) if isinstance(batch, Mapping) else None
        one_row = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt)
                                              and isinstance(prompt[0], Mapping) and "role" in prompt[0])
        if one_row:
            raise TypeError(
                f"{type(self).__name__} scores batches of rows, but it was given a single row (the prompt column holds "
                f"{type(prompt).__name__}, not a list of prompts). Call ds.map(scorer, batched=True, batch_size=8), "
                f"or scorer.score_rows([row]) for one row."
            )


def _without_pipeline(args: Any) -> Any:
    """`args` with the input pipeline's settings ([`PIPELINE_FIELDS`]) at their defaults."""
    defaults = {f.name: f.default for f in fields(args) if f.name in PIPELINE_FIELDS}
    return replace(args, **defaults) if defaults else args


def _restore(cls: type, fingerprint: str, identity: dict, sources: tuple, prompt_format: PromptFormat | None,
             args: Any, loading: dict | None = None) -> SAEVMapFunction:
    live = _LIVE.get(fingerprint)
    if live is not None and live.fingerprint == fingerprint:
        return live
    scorer = cls(*sources, prompt_format=prompt_format, args=args, **(loading or {}))
    scorer._expected_identity = identity
    return scorer
