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

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch

from .activations import LayerReader
from .activity import ExampleActivity, example_activity  # noqa: F401  (their home before saev_hf.activity)
from .loading import allow_tf32_field, check_model_dtype
from .pipeline import check_workers, prepared_batches, preprocessing_workers_field
from .prompts import PromptFormat, RowError, row_indices

SCORES = ("cosine", "l0", "cooccur_l0")

# Live scorers by identity: a worker forked by `ds.map(num_proc=...)` inherits this table and so finds the model that
# the parent process already holds, instead of loading it again.
_LIVE: "weakref.WeakValueDictionary[str, SAEVScorer]" = weakref.WeakValueDictionary()


@dataclass
class ScorerArguments:
    """What the scorer computes and how it names its columns."""

    scores: list[str] = field(
        default_factory=lambda: list(SCORES),
        metadata={"help": "Scores to compute: any of cosine, l0, cooccur_l0 (cosine needs feature weights)."},
    )
    cosine_column: str = field(default="saev_cosine_score", metadata={"help": "Column of the cosine-similarity score."})
    l0_column: str = field(default="saev_l0", metadata={"help": "Column of the L0 score."})
    cooccur_l0_column: str = field(default="saev_cooccur_l0", metadata={"help": "Column of the co-occurring L0."})
    on_error: str = field(
        default="raise",
        metadata={"help": "'raise': an example that cannot be scored stops the map with a clear error. 'null': it "
                  "gets null scores and the reason in `error_column`."},
    )
    error_column: str = field(default="saev_error", metadata={"help": "Reason column used with on_error='null'."})
    special_as_text: bool = field(
        default=True, metadata={"help": "Count special/template tokens as text positions (the authors' code does)."}
    )
    token_chunk: int = field(default=4096, metadata={"help": "Tokens encoded at once by the SAE (bounds memory)."})
    allow_tf32: bool = allow_tf32_field()
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
        unknown = sorted(set(self.scores) - set(SCORES))
        if unknown or not self.scores:
            raise ValueError(f"scores={self.scores} must be a non-empty subset of {list(SCORES)}.")
        if self.on_error not in ("raise", "null"):
            raise ValueError(f"on_error={self.on_error!r} must be 'raise' or 'null'.")
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


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_digest(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Identity of a (possibly huge) model: its name, revision, and a strided sample of every parameter."""
    config = getattr(model, "config", None)
    parts: list[Any] = [type(model).__name__, getattr(config, "_name_or_path", ""), getattr(config, "_commit_hash", "")]
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        parts += [name, flat[::stride][:samples_per_tensor]]
    return _digest(*parts)


def processor_digest(processor: Any) -> str:
    """Identity of a processor or tokenizer: its tokenizer vocabulary, special tokens, chat template and image settings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    return _digest(
        type(processor).__name__,
        sorted(tokenizer.get_vocab().items()),
        getattr(tokenizer, "all_special_tokens", []),
        getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        image_processor.to_dict() if image_processor is not None else None,
        {k: getattr(processor, k) for k in ("patch_size", "vision_feature_select_strategy", "image_seq_length",
                                              "num_additional_image_tokens") if hasattr(processor, k)},
    )


class SAEVMapFunction:
    """
    The machinery every SAE-V `datasets.map(batched=True)` function shares: [`SAEVScorer`] (scores) and
    [`saev_hf.patches.PatchFilter`] (masked images) each say only what they compute from a batch (`score_rows`) and
    which columns it makes; this base class loads, checks and identifies the SAE-V and the MLLM, pickles to that
    identity (so `datasets` caches the map), moves to the worker's device, and runs batches with per-row error
    isolation (`on_error="null"`).

    Args: as for [`SAEVScorer`]; `args` is the subclass's arguments dataclass (it has `scores`, `on_error`,
    `error_column` and `special_as_text`).
    """

    arguments_class: type = ScorerArguments
    """The arguments dataclass (built with its defaults when `args` is not given)."""

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
        if self._sae is not None and self._model is not None:
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
        from . import __version__

        if self._expected_identity is not None and (self._sae is None or self._model is None):
            return self._expected_identity  # a restored worker that has not loaded its objects yet
        sae, model, processor = self._load()
        key = (_state_key(sae), _state_key(model), sae.config.to_json_string(use_diff=False))
        if self._identity is None or key is None or key != self._identity_key:
            self._identity = {
                "saev_hf": __version__,
                "kind": type(self).__name__,
                "sae": _digest(sae.config.to_json_string(use_diff=False), *sae.state_dict().values()),
                "model": model_digest(model),
                "processor": None,
                "layer": sae.config.hook_layer,
                "prompt_format": None,
                "args": None,
                # how a model given by path is loaded: a bfloat16 and a float32 scorer never share cached scores
                "model_dtype": self.model_dtype,
                "device_map": self.device_map,
            }
            self._identity_key = key
        # cheap parts, read every time: the processor's settings, the columns and the scorer's own arguments
        self._identity.update(processor=processor_digest(processor), layer=sae.config.hook_layer,
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
        from transformers import AutoProcessor

        from .activations import layer_device
        from .loading import check_multimodal_processor, load_model_and_processor
        from .model import SAEV

        place_sae = self._sae is None  # an SAE-V built here is placed here: on the device of the layer it reads
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
            from .weighting import check_cooccurrence

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
        from .loading import choose_device

        if self.device_map is not None or getattr(self._model, "hf_device_map", None) is not None:
            return  # placed by device_map while loading: it stays there (and the SAE-V with its layer)
        want = choose_device(rank=rank) if rank is not None else None
        if want is not None and want.type != "cpu" and self._device != want:
            self._model.to(want)
            self._sae.to(want)
            self._device = want

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
    `saev_hf.prompts.undecoded_images(ds, "images")`); the scorer reads the bytes itself. `saev score` and `saev patches`
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


def _without_pipeline(args: Any) -> Any:
    """`args` with the input pipeline's settings ([`PIPELINE_FIELDS`]) at their defaults."""
    defaults = {f.name: f.default for f in fields(args) if f.name in PIPELINE_FIELDS}
    return replace(args, **defaults) if defaults else args


def _absolute(source: str | None) -> str | None:
    """A local folder as an absolute path; a Hub repo id (or nothing) as it is."""
    if source and os.path.exists(source):
        return os.path.abspath(source)
    return source or None


def _state_key(module: torch.nn.Module) -> Any:
    """A cheap key that changes whenever a parameter or buffer of `module` is modified in place or replaced: each
    tensor's storage, version counter (bumped by every in-place op: optimizer steps, copy_, fill_), dtype and shape.
    None when a tensor has no version counter (inference tensors): the caller then recomputes the digests."""
    key = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        try:
            version = tensor._version
        except RuntimeError:
            return None
        key.append((name, tensor.data_ptr(), version, str(tensor.dtype), tuple(tensor.shape), str(tensor.device)))
    return tuple(key)


def _restore(cls: type, fingerprint: str, identity: dict, sources: tuple, prompt_format: PromptFormat | None,
             args: Any, loading: dict | None = None) -> SAEVScorer:
    live = _LIVE.get(fingerprint)
    if live is not None and live.fingerprint == fingerprint:
        return live
    scorer = cls(*sources, prompt_format=prompt_format, args=args, **(loading or {}))
    scorer._expected_identity = identity
    return scorer


SHARDS_FOLDER = "saev-score-shards"
"""Temporary folder (inside the output folder) where the processes of a distributed [`score_dataset`] each save
their scored shard before the main process assembles them."""


def score_dataset(scorer: SAEVMapFunction, dataset: Any, *, batch_size: int = 8, num_proc: int | None = None,
                  with_rank: bool = False, output_dir: str | os.PathLike | None = None,
                  desc: str = "SAE-V scores") -> Any:
    """
    `dataset` (a `datasets.Dataset`) with `scorer`'s columns added to every row by `dataset.map(scorer, batched=True)`
    (cached by `datasets` as any map), saved to `output_dir` when given. The image column is handed to the scorer
    undecoded, so that a corrupt image names its row (or costs one null row with `on_error="null"`), and cast back.

    Under `torchrun` / `accelerate launch` with several processes (call it on every process), each process maps its
    contiguous shard on its own device: a run of whole map batches ([`saev_hf.distributed.batch_share`]), so that
    every row is scored in the same batch as by one process and gets the very same scores. Each saves its shard in a
    temporary folder in `output_dir`, and the main process assembles the shards in their order, so the saved dataset
    has the rows and order of `dataset` and equals one process's; the temporary folder is then removed. Every
    process returns the whole scored dataset, read back from `output_dir` (required then; on several nodes, a folder
    every node sees). A row that cannot be scored (with `on_error="raise"`) stops its process with a [`RowError`]
    naming its row in `dataset`, and the launcher then stops the others: the job fails, nothing is assembled.

    Args:
        scorer ([`SAEVScorer`], or any [`SAEVMapFunction`]): what adds the columns.
        batch_size (`int`): rows per map batch.
        num_proc, with_rank: as `datasets.map` (one worker per GPU, [`saev_hf.sources.map_placement`]); not in a
            distributed run, whose processes are the workers.
        output_dir (*optional*): where to `save_to_disk` the scored dataset.

    Example:

    ```python
    scored = score_dataset(SAEVScorer(sae, model, processor), dataset, output_dir="scored")
    ```
    """
    import datasets

    from .distributed import batch_share, distributed_state
    from .prompts import undecoded_images

    state = distributed_state()
    # the scorer reads the image bytes itself, so that a corrupt image names its row (or costs one null row)
    dataset, image_feature = undecoded_images(dataset, scorer._reader_prompt_format().image_column)

    def scored_part(part: Any, row_offset: int) -> Any:
        scored = part.map(scorer, batched=True, batch_size=batch_size, num_proc=num_proc, with_indices=True,
                          with_rank=with_rank, fn_kwargs={"row_offset": row_offset} if row_offset else None,
                          desc=desc)
        if image_feature is not None:
            scored = scored.cast_column(scorer._reader_prompt_format().image_column, image_feature)
        return scored

    if state is None:
        scored = scored_part(dataset, 0)
        if output_dir is not None:
            scored.save_to_disk(str(output_dir))
        return scored
    if output_dir is None:
        raise ValueError(f"Scoring over {state.num_processes} processes assembles their shards in output_dir: give "
                         f"one (a folder every process sees).")
    if num_proc is not None:
        raise ValueError(f"num_proc={num_proc} starts map workers inside each of the {state.num_processes} launched "
                         f"processes; the launched processes already share the work. Leave num_proc unset.")
    import shutil
    from pathlib import Path

    shards = Path(output_dir, SHARDS_FOLDER)
    world, index = state.num_processes, state.process_index
    rows = batch_share(range(len(dataset)), batch_size, state)
    offset = rows[0] if rows else len(dataset)
    shard = dataset.select(range(offset, offset + len(rows)))  # contiguous: no indices mapping, cached maps still hit
    scored_part(shard, offset).save_to_disk(str(shards / f"process-{index:05d}"))
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [datasets.load_from_disk(str(shards / f"process-{i:05d}")) for i in range(world)]
        parts = [part for part in parts if len(part)] or parts[:1]  # a process without rows added no columns
        datasets.concatenate_datasets(parts).save_to_disk(str(output_dir))
        del parts
        shutil.rmtree(shards)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(output_dir))


def run_scoring(source: Any, prompt_format: PromptFormat, args: ScorerArguments, map_args: Any):
    """
    `saev score`: load what `source` ([`SourceArguments`]) names, add the scores to every row with `datasets.map`
    (as `map_args` say) and save the scored dataset to `source.output_dir`. Returns `(scored dataset, added columns)`.

    With `map_args.num_proc`, one worker per GPU ([`map_placement`]): the model is loaded on the CPU here and each
    worker moves it to its GPU. `args.forward_batch_size`, `group_by_length` and `preprocessing_workers` set the
    input pipeline inside each map batch (`map_args.batch_size` rows: the length-grouping window).

    Under `torchrun` / `accelerate launch`, each process scores its shard on its own device and the main process
    writes the assembled dataset ([`score_dataset`]); every process returns it.
    """
    from .distributed import distributed_state
    from .sources import load_sources, map_placement

    distributed_state(cpu=source.device == "cpu")  # a launched process joins its group first: "auto" is its device
    placed, with_rank = map_placement(source, map_args)  # with num_proc: no CUDA in the parent before the fork
    sae, model, processor, dataset = load_sources(placed, "saev score")
    scorer = SAEVScorer(sae, model, processor, prompt_format=prompt_format, args=args)
    scored = score_dataset(scorer, dataset, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                           with_rank=with_rank, output_dir=source.output_dir)
    return scored, scorer.columns
