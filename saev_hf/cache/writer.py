"""Writing an activation cache: decoder layer L of an MLLM, read once over a dataset and kept on disk in shards.

The MLLM's forward is the dominant cost of training an SAE-V. [`cache_activations`] runs it once, up to layer L (with
[`LayerReader`], the same forward batches the [`ActivationBuffer`] reads), and writes the activations of the
positions training uses (every real position, or text and image ones without special tokens, as
`include_special_tokens` says) with each token's [`Modality`], dataset row and position, in shards of at most
`shard_size_tokens` tokens (the layout: [`saev_hf.cache.ActivationCache`]).

A shard is written under a temporary name and renamed once complete, then recorded in the manifest with the next
row to read ([`ShardWriter`]): a run that is interrupted and started again with the same arguments continues after
the last finished shard and gives the cache an uninterrupted run gives. A row never spans two shards.

[`ActivationCache`] reads it back (in stream order, or shuffled in bounded memory), and [`CacheReader`] hands the
activation buffer, the weighting and the evaluation the rows they ask for: `saev train --activation_cache DIR` then
trains on exactly the batches it would have read from the MLLM.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from ..activations.reader import LayerReader, Modality, image_token_id_of, include_special_tokens_field, layer_field
from ..arguments import DataArguments, ModelArguments
from ..data.batching import is_indexable
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field, read_batch_size_field
from ..data.prompts import PromptFormat
from ..runtime.folders import OUTPUT_RECORD, OutputArguments
from ..runtime.progress import progress_bar
from .activation_cache import FORMAT, FORMAT_VERSION, MANIFEST_NAME, STORAGE_DTYPES
from .shard_writer import ShardWriter, write_json

# Options that change where or how a run goes, not what it writes: a resumed run may change them.
RUN_ONLY_FIELDS = frozenset({"output_dir", "overwrite_output_dir", "disable_tqdm", "preprocessing_workers"})


@dataclass(kw_only=True)
class CacheArguments(OutputArguments):
    """What `saev cache` keeps of the MLLM's layer (which layer, which positions) and how it stores it; the MLLM and
    the dataset are [`ModelArguments`] and [`DataArguments`]."""

    layer: int = layer_field()
    include_special_tokens: bool = include_special_tokens_field()
    storage_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the stored activations: float32 (exact), bfloat16 or float16 (half the disk).",
                  "choices": tuple(STORAGE_DTYPES)},
    )
    shard_size_tokens: int = field(
        default=65536,
        metadata={"help": "Most tokens in one shard (one safetensors file). A shard holds whole rows: a row with more "
                  "tokens than this is an error."},
    )
    read_batch_size: int = read_batch_size_field()
    max_rows: int | None = field(default=None, metadata={"help": "Cache only the first this many rows."})
    preprocessing_workers: int = preprocessing_workers_field()

    def __post_init__(self) -> None:
        check_workers(self.preprocessing_workers)
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={self.storage_dtype!r} is not supported; use one of "
                             f"{tuple(STORAGE_DTYPES)}.")
        for name in ("shard_size_tokens", "read_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 0):
            raise ValueError(f"max_rows={self.max_rows!r} must be a non-negative integer (or None for every row).")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer: the 0-based decoder layer index.")


def cache_activations(args: CacheArguments, prompt_format: PromptFormat | None = None, model=None, processor=None,
                      dataset=None) -> Path:
    """
    Read decoder layer `args.layer` of the MLLM over the dataset once and write the activations to `args.output_dir`
    (see the module's docstring for the layout). Resumes an interrupted cache made with the same arguments.

    Example:

    ```python
    cache_dir = cache_activations(CacheArguments(output_dir="cache", layer=16), model=model, processor=processor,
                                  dataset=dataset)
    for batch in ActivationCache(cache_dir).batches(4096, shuffle=True, seed=0):
        ...  # (4096, d_in) float32
    ```

    Args:
        args ([`CacheArguments`]): the options.
        prompt_format ([`PromptFormat`], *optional*): the dataset's columns (default: TRL's `images`/`prompt`).
        model, processor: the MLLM and its processor, or the [`ModelArguments`] to load it with.
        dataset: a `datasets.Dataset` or a list of rows (read by index), a stream (a `datasets.IterableDataset` or any
            re-iterable of rows, read in order), or the [`DataArguments`] to load it with (streamed with
            `streaming`). A resumed stream is read again from its start, skipping the rows already cached.

    Returns:
        `Path`: the cache folder.

    Raises:
        FileExistsError: `output_dir` holds something `saev cache` did not write (and `overwrite_output_dir` is off).
        ValueError: `output_dir` holds a cache made with other arguments (naming the differences), or a row has more
            tokens than `shard_size_tokens`.
    """
    prompt_format = prompt_format if prompt_format is not None else PromptFormat()
    output = args.prepare("cache")
    identity = _identity(args, prompt_format, model, dataset)
    model, processor, dataset = _model_and_data(model, processor, dataset, prompt_format)
    if image_token_id_of(model, processor) is None and prompt_format.image_column is not None:
        prompt_format = replace(prompt_format, image_column=None)  # a text-only LM reads text only, as in training
    reader = LayerReader(model, processor, args.layer, prompt_format=prompt_format)
    identity.update(prompt_format=asdict(reader.prompt_format),
                    num_dataset_rows=len(dataset) if is_indexable(dataset) else None)  # a stream has no length
    manifest_path = output / MANIFEST_NAME
    manifest = _start_manifest(output, manifest_path, identity, reader, args, dataset)
    _fill(reader, dataset, args, ShardWriter(output, manifest, manifest_path, args.storage_dtype,
                                             args.shard_size_tokens, first_row=manifest["next_row"]))
    return output


def _model_and_data(model, processor, dataset, prompt_format: PromptFormat):
    """The MLLM (eval mode) with its processor and the rows: those given, or loaded from the arguments given."""
    if isinstance(model, ModelArguments):
        model, processor = model.load()
    elif model is None:
        raise ValueError("No MLLM: pass model= and processor=, or model=ModelArguments(...).")
    elif processor is None:
        raise ValueError("A model was passed without its processor (or tokenizer): pass processor= too.")
    if isinstance(dataset, DataArguments):
        # read image bytes ourselves, so that a corrupt image is an error naming its row (as training does)
        dataset = dataset.load(prompt_format.image_column)
    elif dataset is None:
        raise ValueError("No dataset: pass dataset= (a dataset, or DataArguments(...)).")
    return model.eval(), processor, dataset


def _fill(reader: LayerReader, dataset: Any, args: CacheArguments, shards: ShardWriter) -> None:
    """Read the rows from the manifest's next row on and hand each row's kept tokens to `shards`."""
    manifest = shards.manifest
    stream = not is_indexable(dataset)
    num_rows = None if stream else len(dataset)
    if args.max_rows is not None:
        num_rows = args.max_rows if num_rows is None else min(args.max_rows, num_rows)
    next_row = manifest["next_row"]
    # Resume at the start of the forward batch holding `next_row`, so that every row is read in the same forward
    # batch (the same padding) as in an uninterrupted run; rows before `next_row` are in finished shards already.
    batch_start = next_row - next_row % args.read_batch_size
    if manifest["complete"]:
        batches: Iterator[Any] = iter(())  # a finished cache: nothing to read
    elif stream:  # read in order from the start of the batch holding next_row, up to max_rows
        batches = prepared_batches(reader, _StreamRows(dataset, batch_start, num_rows), args.read_batch_size,
                                   row_ids=range(batch_start, sys.maxsize), workers=args.preprocessing_workers)
    else:
        batches = prepared_batches(reader, dataset, args.read_batch_size, range(batch_start, num_rows),
                                   workers=args.preprocessing_workers)
    end_row = next_row
    with progress_bar(total=num_rows, initial=next_row, desc="Caching activations", unit="row",
                      disable=args.disable_tqdm) as bar:
        for prepared in batches:
            rows = prepared.rows  # dataset indices (a resumed stream's count from the stream's start)
            acts = reader.read_inputs(prepared.check())
            mask = acts.scored_mask(args.include_special_tokens).cpu()
            for j, row in enumerate(rows):
                if row < next_row:
                    continue
                keep = mask[j]
                hidden = acts.hidden_states[j][keep.to(acts.hidden_states.device)].float().cpu()
                if not torch.isfinite(hidden).all():
                    raise ValueError(
                        f"Layer {args.layer} of {type(reader.model).__name__} produced NaN or inf activations in row "
                        f"{row}. Load the model in float32 (or bfloat16 rather than float16), or check this row."
                    )
                shards.add(row, hidden, acts.modality[j][keep.to(acts.modality.device)].cpu(), keep.nonzero().flatten())
            end_row = max(end_row, rows[-1] + 1)
            bar.update(sum(1 for row in rows if row >= next_row))
    if manifest["complete"] or stream:
        num_rows = end_row  # a stream ends where it ends (or at max_rows)
    shards.finish(num_rows)


def _identity(args: CacheArguments, prompt_format: PromptFormat, model: Any, dataset: Any) -> dict[str, Any]:
    """What makes a cache what it is: every argument but the run-only ones, the model and data it reads (their names,
    or those of the objects passed) and the prompt columns (completed once the model is known)."""
    record = {name: value for name, value in asdict(args).items() if name not in RUN_ONLY_FIELDS}
    if isinstance(model, ModelArguments):
        record.update(model_name_or_path=model.model_name_or_path, model_revision=model.model_revision,
                      model_dtype=model.model_dtype)
    else:
        record.update(model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                      model_revision=None, model_dtype=str(getattr(model, "dtype", None)))
    if isinstance(dataset, DataArguments):
        record.update(dataset_name=dataset.dataset_name, dataset_config=dataset.dataset_config,
                      dataset_split=dataset.dataset_split, streaming=dataset.streaming)
    else:
        record.update(dataset_name=getattr(getattr(dataset, "info", None), "dataset_name", None) or None,
                      dataset_config=None, dataset_split=None, streaming=not is_indexable(dataset))
    record["prompt_format"] = asdict(prompt_format)
    return record


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{name}: {saved.get(name)!r} (cache) vs {current.get(name)!r} (now)"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


class _StreamRows:
    """Rows `start..stop-1` of a stream (to its end with `stop` None), read in order: a re-iterable, as
    [`prepared_batches`] reads a stream."""

    def __init__(self, stream: Any, start: int, stop: int | None) -> None:
        self.stream, self.start, self.stop = stream, start, stop

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.stream), self.start, self.stop)


def _start_manifest(output: Path, manifest_path: Path, identity: dict[str, Any], reader: LayerReader,
                    args: CacheArguments, dataset: Any) -> dict[str, Any]:
    """The manifest to continue: the folder's own, when it was made with the same arguments, else a fresh one (an
    existing one with other arguments is refused, or deleted with `overwrite_output_dir`)."""
    if manifest_path.exists():
        saved = json.loads(manifest_path.read_text())
        differences = _differences(saved.get("arguments", {}), identity)
        if not differences:
            return saved
        if not args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {str(output)!r} holds an activation cache made with other arguments "
                f"({'; '.join(differences)}). Choose another output_dir, run with the cache's arguments to resume "
                f"it, or pass overwrite_output_dir=True (--overwrite_output_dir) to delete it and start again."
            )
    if args.overwrite_output_dir:  # start clean: no shard of another cache may remain
        for entry in output.iterdir():
            if entry.name != OUTPUT_RECORD:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name_or_path": identity["model_name_or_path"],
        "dataset_name": identity["dataset_name"],
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "layer": reader.layer,
        "d_in": reader.hidden_size,
        "storage_dtype": args.storage_dtype,
        "include_special_tokens": args.include_special_tokens,
        "modalities": {m.name.lower(): int(m) for m in Modality},
        "arguments": identity,
        "shards": [],
        "num_tokens": 0,
        "next_row": 0,
        "complete": False,
    }
    write_json(manifest_path, manifest)
    return manifest
