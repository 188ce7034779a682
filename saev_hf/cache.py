"""An activation cache: decoder layer L of an MLLM, read once over a dataset and kept on disk in shards.

The MLLM's forward is the dominant cost of training an SAE-V. [`cache_activations`] runs it once, up to layer L (with
[`LayerReader`], the same forward batches the [`ActivationBuffer`] reads), and writes the activations of the
positions training uses (every real position, or text and image ones without special tokens, as
`include_special_tokens` says) with each token's [`Modality`], dataset row and position, in shards of at most
`shard_size_tokens` tokens:

```
cache_dir/
  cache_manifest.json           model, layer, d_in, storage dtype, the arguments, finished shards, the next row
  shard-00000.safetensors       activations (n, d_in) in the storage dtype; modality (n,) int8; row (n,) int64;
  shard-00001.safetensors       position (n,) int32
  saev_output.json              (which command wrote the folder, see saev_hf.outputs)
```

A shard is written under a temporary name and renamed once complete, then recorded in the manifest with the next
row to read: a run that is interrupted and started again with the same arguments continues after the last finished
shard and gives the cache an uninterrupted run gives. A row never spans two shards.

[`ActivationCache`] reads it back: in stream order (dataset order), or shuffled (seeded: shards in a random order,
tokens shuffled within windows of `window_shards` shards, so memory is bounded by the window, not the cache), and,
for training, as a [`CacheReader`] that hands the [`ActivationBuffer`] the rows it asks for: `saev train
--activation_cache DIR` then trains on exactly the batches it would have read from the MLLM.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .activations import LayerActivations, LayerReader, Modality, check_same_device, image_token_id_of
from .loading import check_model_dtype, choose_device, load_dataset_split, load_model_and_processor, model_dtype_field
from .outputs import OUTPUT_RECORD, prepare_output_dir
from .batching import is_indexable
from .pipeline import PreparedBatch, check_workers, prepared_batches, preprocessing_workers_field
from .prompts import PromptFormat, undecoded_images

MANIFEST_NAME = "cache_manifest.json"
FORMAT = "saev-hf activation cache"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Options that change where or how a run goes, not what it writes: a resumed run may change them.
RUN_ONLY_FIELDS = frozenset({"output_dir", "overwrite_output_dir", "device", "disable_tqdm", "preprocessing_workers"})


@dataclass
class CacheArguments:
    """What `saev cache` reads (the MLLM, the dataset, the layer), which positions it keeps, and how it stores them."""

    output_dir: str = field(metadata={"help": "Folder of the cache (shards and cache_manifest.json)."})
    layer: int = field(metadata={"help": "0-based index of the decoder layer whose output (residual stream) is read."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub repo id or local folder of the MLLM (or text-only causal LM). Not needed when a model "
                  "is passed to the Python API."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, or a folder written by Dataset.save_to_disk. Not needed when a dataset "
                  "is passed to the Python API."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset (datasets' streaming mode) instead of downloading it whole: rows are "
                  "read in order, and an interrupted run skips the rows already cached when it resumes."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the MLLM on the Hub."})
    model_dtype: str = model_dtype_field()
    include_special_tokens: bool = field(
        default=True,
        metadata={"help": "Keep special/template tokens (BOS, role markers, image start/end), as training does by "
                  "default. Without them the cache cannot serve a training run that includes them."},
    )
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
    read_batch_size: int = field(
        default=8,
        metadata={"help": "Dataset rows per forward pass of the MLLM. Use the read_batch_size of the training run "
                  "the cache stands in for to get bit-identical activations."},
    )
    max_rows: int | None = field(default=None, metadata={"help": "Cache only the first this many rows."})
    device: str = field(default="auto", metadata={"help": "Where the MLLM runs: 'auto', 'cpu', 'cuda:0'..."})
    preprocessing_workers: int = preprocessing_workers_field()
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that `saev cache` did not write, or a cache "
                  "made with other arguments (it is deleted and started again)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self) -> None:
        check_model_dtype(self.model_dtype)
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


SHARD_TENSORS = ("activations", "modality", "row", "position")
"""The tensors of every shard, each with one entry per cached token."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _identity(args: CacheArguments, prompt_format: PromptFormat, model: Any, dataset: Any) -> dict[str, Any]:
    """What makes a cache what it is: every argument but the run-only ones, the prompt columns, and the model and
    dataset names (of the objects passed, when no names are given)."""
    record = {name: value for name, value in asdict(args).items() if name not in RUN_ONLY_FIELDS}
    record["prompt_format"] = {f.name: getattr(prompt_format, f.name) for f in fields(PromptFormat)}
    if record["model_name_or_path"] is None:
        record["model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if record["dataset_name"] is None:
        record["dataset_name"] = getattr(getattr(dataset, "info", None), "dataset_name", None) or None
    record["num_dataset_rows"] = len(dataset) if is_indexable(dataset) else None  # a stream has no length
    return record


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{name}: {saved.get(name)!r} (cache) vs {current.get(name)!r} (now)"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


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
        model, processor (*optional*): the MLLM and its processor; loaded from `args.model_name_or_path` otherwise.
        dataset (*optional*): a `datasets.Dataset` or a list of rows (read by index), or a stream (a
            `datasets.IterableDataset` or any re-iterable of rows, read in order); loaded from `args.dataset_name`
            otherwise (streamed with `args.streaming`). A resumed stream is read again from its start, skipping the
            rows already cached.

    Returns:
        `Path`: the cache folder.

    Raises:
        FileExistsError: `output_dir` holds something `saev cache` did not write (and `overwrite_output_dir` is off).
        ValueError: `output_dir` holds a cache made with other arguments (naming the differences), or a row has more
            tokens than `shard_size_tokens`.
    """
    from tqdm.auto import tqdm

    prompt_format = prompt_format if prompt_format is not None else PromptFormat()
    output = prepare_output_dir(args.output_dir, "cache", args.overwrite_output_dir)
    manifest_path = output / MANIFEST_NAME
    if model is None:
        if args.model_name_or_path is None:
            raise ValueError("No MLLM: pass model= and processor=, or set model_name_or_path.")
        model, processor = load_model_and_processor(args.model_name_or_path, args.model_revision, args.model_dtype,
                                                    choose_device(args.device))
    elif processor is None:
        raise ValueError("A model was passed without its processor (or tokenizer): pass processor= too.")
    model.eval()
    if dataset is None:
        if args.dataset_name is None:
            raise ValueError("No dataset: pass dataset=, or set dataset_name.")
        dataset = load_dataset_split(args.dataset_name, args.dataset_config, args.dataset_split, args.streaming)
        # read image bytes ourselves, so that a corrupt image is an error naming its row (as training does)
        dataset, _ = undecoded_images(dataset, prompt_format.image_column)
    if image_token_id_of(model, processor) is None and prompt_format.image_column is not None:
        prompt_format = replace(prompt_format, image_column=None)  # a text-only LM reads text only, as in training
    reader = LayerReader(model, processor, args.layer, prompt_format=prompt_format)
    identity = _identity(args, reader.prompt_format, model, dataset)
    manifest = _start_manifest(output, manifest_path, identity, reader, args, dataset)

    stream = not is_indexable(dataset)
    num_rows = None if stream else len(dataset)
    if args.max_rows is not None:
        num_rows = args.max_rows if num_rows is None else min(args.max_rows, num_rows)
    next_row = manifest["next_row"]
    # Resume at the start of the forward batch holding `next_row`, so that every row is read in the same forward
    # batch (the same padding) as in an uninterrupted run; rows before `next_row` are in finished shards already.
    batch_start = next_row - next_row % args.read_batch_size
    storage = STORAGE_DTYPES[args.storage_dtype]
    pending: list[dict[str, torch.Tensor]] = []
    pending_tokens, pending_first_row = 0, next_row
    if manifest["complete"]:
        batches: Iterator[Any] = iter(())  # a finished cache: nothing to read
    elif stream:  # read in order from the start of the batch holding next_row, up to max_rows
        batches = prepared_batches(reader, _StreamRows(dataset, batch_start, num_rows), args.read_batch_size,
                                   row_ids=range(batch_start, sys.maxsize), workers=args.preprocessing_workers)
    else:
        batches = prepared_batches(reader, dataset, args.read_batch_size, range(batch_start, num_rows),
                                   workers=args.preprocessing_workers)
    end_row = next_row
    with tqdm(total=num_rows, initial=next_row, desc="Caching activations", unit="row",
              disable=args.disable_tqdm) as bar:
        for prepared in batches:
            rows = prepared.rows  # dataset indices (a resumed stream's count from the stream's start)
            acts = reader.read_inputs(prepared.check())
            mask = acts.scored_mask(args.include_special_tokens).cpu()
            for j, row in enumerate(rows):
                if row < next_row:
                    continue
                keep = mask[j]
                count = int(keep.sum())
                if count > args.shard_size_tokens:
                    raise ValueError(
                        f"Row {row} has {count} tokens to cache, more than shard_size_tokens={args.shard_size_tokens} "
                        f"(a row never spans two shards). Raise shard_size_tokens to at least {count}."
                    )
                if pending_tokens + count > args.shard_size_tokens and pending:
                    _write_shard(output, manifest, manifest_path, pending, pending_first_row, row)
                    pending, pending_tokens, pending_first_row = [], 0, row
                hidden = acts.hidden_states[j][keep.to(acts.hidden_states.device)].float().cpu()
                if not torch.isfinite(hidden).all():
                    raise ValueError(
                        f"Layer {args.layer} of {type(model).__name__} produced NaN or inf activations in row {row}. "
                        f"Load the model in float32 (or bfloat16 rather than float16), or check this row."
                    )
                pending.append({
                    "activations": hidden.to(storage),
                    "modality": acts.modality[j][keep.to(acts.modality.device)].cpu().to(torch.int8),
                    "row": torch.full((count,), row, dtype=torch.int64),
                    "position": keep.nonzero().flatten().to(torch.int32),
                })
                pending_tokens += count
            end_row = max(end_row, rows[-1] + 1)
            bar.update(sum(1 for row in rows if row >= next_row))
    if manifest["complete"] or stream:
        num_rows = end_row  # a stream ends where it ends (or at max_rows)
    if pending:
        _write_shard(output, manifest, manifest_path, pending, pending_first_row, num_rows)
    elif manifest["shards"]:  # trailing rows without a token to keep belong to the last shard
        last = manifest["shards"][-1]
        last["num_rows"] = max(last["num_rows"], num_rows - last["first_row"])
    manifest["next_row"], manifest["complete"] = num_rows, True
    _write_json(manifest_path, manifest)
    return output


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
    _write_json(manifest_path, manifest)
    return manifest


def _write_shard(output: Path, manifest: dict[str, Any], manifest_path: Path, parts: list[dict[str, torch.Tensor]],
                 first_row: int, end_row: int) -> None:
    """Write rows `first_row..end_row-1` (`parts`, one per row with tokens) as the next shard: under a temporary
    name, renamed once complete, then recorded in the manifest with `end_row` as the next row to read."""
    name = _shard_name(len(manifest["shards"]))
    tensors = {key: torch.cat([part[key] for part in parts]) for key in SHARD_TENSORS}
    temporary = output / (name + ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary),
              metadata={"format": FORMAT, "first_row": str(first_row), "end_row": str(end_row)})
    os.replace(temporary, output / name)
    num_tokens = len(tensors["row"])
    manifest["shards"].append({"file": name, "num_tokens": num_tokens, "first_row": first_row,
                               "num_rows": end_row - first_row})
    manifest["num_tokens"] += num_tokens
    manifest["next_row"] = end_row
    _write_json(manifest_path, manifest)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(temporary, path)


class ActivationCache:
    """
    A cache written by [`cache_activations`], read back.

    Example:

    ```python
    cache = ActivationCache("cache")
    cache.d_in, cache.layer, cache.num_tokens
    for batch in cache.batches(4096, shuffle=True, seed=0, window_shards=4):
        ...  # (<= 4096, d_in) float32
    ```

    Args:
        path (`str` or `os.PathLike`): the cache folder, or a Hub dataset repo it was pushed to
            ([`saev_hf.hub.push_activation_cache`]; downloaded with `snapshot_download`).
        revision (`str`, *optional*): the revision of a Hub repo.
        allow_incomplete (`bool`, *optional*, defaults to `False`): read the finished shards of a cache whose run
            has not finished.

    Raises:
        ValueError: the folder holds no cache, or an unfinished one (without `allow_incomplete`).
    """

    def __init__(self, path: str | os.PathLike, revision: str | None = None, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            from huggingface_hub import snapshot_download

            try:
                self.path = Path(snapshot_download(str(path), repo_type="dataset", revision=revision))
            except Exception as error:  # not on the Hub either: say both places were looked at
                raise ValueError(f"{str(path)!r} is neither a folder nor a Hub dataset repo that could be downloaded "
                                 f"({type(error).__name__}: {error}). Give the folder of an activation cache, or the "
                                 f"Hub repo it was pushed to.") from error
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.exists():
            raise ValueError(f"{str(self.path)!r} is not an activation cache (no {MANIFEST_NAME}). Make one with "
                             f"`saev cache` or saev_hf.cache.cache_activations.")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a saev-hf activation cache manifest.")
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"The activation cache in {str(self.path)!r} is unfinished (rows read: {self.manifest['next_row']}). "
                f"Run `saev cache` again with the same arguments to finish it, or pass allow_incomplete=True."
            )
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._first_rows = [shard["first_row"] for shard in self.shards]
        self._row_offsets: dict[int, torch.Tensor] = {}

    @property
    def d_in(self) -> int:
        """Width of the activations."""
        return int(self.manifest["d_in"])

    @property
    def layer(self) -> int:
        """The decoder layer read."""
        return int(self.manifest["layer"])

    @property
    def num_tokens(self) -> int:
        """Tokens in the (finished shards of the) cache."""
        return int(self.manifest["num_tokens"])

    @property
    def num_rows(self) -> int:
        """Dataset rows read into the (finished shards of the) cache."""
        return int(self.manifest["next_row"])

    def load_shard(self, index: int, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Shard `index`: `activations` (`(n, d_in)`, in `dtype`, or the storage dtype with None), `modality`,
        `row` and `position` (`(n,)` each)."""
        entry = self.shards[index]
        tensors = load_file(str(self._shard_path(entry)))
        _check_layout(entry, {key: tuple(value.shape) for key, value in tensors.items()}, self.d_in)
        _check_finite(tensors["activations"], entry["file"])
        if dtype is not None:
            tensors["activations"] = tensors["activations"].to(dtype)
        return tensors

    def _shard_path(self, entry: dict[str, Any]) -> Path:
        """The file of shard `entry`; refused when it is missing."""
        path = self.path / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"Shard {entry['file']} of the activation cache {self.path} is missing: the cache "
                                    "is incomplete. Write it again with `saev cache` (it resumes) or download it again.")
        return path

    def iter_shards(self, dtype: torch.dtype | None = torch.float32) -> Iterator[dict[str, torch.Tensor]]:
        """Every shard, in stream (dataset) order, one at a time (see [`load_shard`])."""
        for index in range(len(self.shards)):
            yield self.load_shard(index, dtype)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, window_shards: int = 4,
                drop_last: bool = False, with_metadata: bool = False) -> Iterator[Any]:
        """
        One pass over the cache in batches of `batch_size` tokens (the last one smaller unless `drop_last`).

        In stream order, tokens come in dataset order (rows, then positions). With `shuffle`, shards are taken in a
        random order (seeded by `seed`), `window_shards` at a time, and the tokens of each window (with the few left
        over from the previous window) are shuffled: memory holds at most `window_shards` shards and one batch.

        Yields `(tokens, d_in)` float32 tensors, or with `with_metadata` dicts with `activations`, `modality`, `row`
        and `position`.
        """
        if batch_size <= 0 or window_shards <= 0:
            raise ValueError(f"batch_size={batch_size} and window_shards={window_shards} must be positive.")
        order = list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(seed)
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(order)).tolist()
        window = 1 if not shuffle else window_shards
        left: dict[str, torch.Tensor] | None = None
        for start in range(0, len(order), window):
            if shuffle:  # each batch gathers its tokens straight from the window's shards (in the storage dtype)
                parts = [self.load_shard(index, dtype=None) for index in order[start : start + window]]
                parts = ([left] if left is not None else []) + parts
                window_tokens = _WindowTokens(parts)
                taken = torch.randperm(window_tokens.num_tokens, generator=generator)
                whole = len(taken) - len(taken) % batch_size
                for begin in range(0, whole, batch_size):
                    batch = window_tokens.gather(taken[begin : begin + batch_size])
                    yield batch if with_metadata else batch["activations"]
                left = window_tokens.gather(taken[whole:], dtype=None)
                del parts, window_tokens
                continue
            pool = self.load_shard(order[start])  # stream order: batches are slices of the shard,
            if left is not None:  # but the first, which takes what the previous shard left over
                head = batch_size - len(left["row"])
                first = {key: torch.cat([left[key], value[:head]]) for key, value in pool.items()}
                if len(first["row"]) < batch_size:  # the shard is smaller than what the batch lacks
                    left = first
                    continue
                yield first if with_metadata else first["activations"]
                pool = {key: value[head:] for key, value in pool.items()}
            whole = len(pool["row"]) - len(pool["row"]) % batch_size
            for begin in range(0, whole, batch_size):
                batch = {key: value[begin : begin + batch_size] for key, value in pool.items()}
                yield batch if with_metadata else batch["activations"]
            left = {key: value[whole:].clone() for key, value in pool.items()}  # not a view holding the shard
            del pool
        if left is not None and len(left["row"]) and not drop_last:
            left["activations"] = left["activations"].float()
            yield left if with_metadata else left["activations"]

    def rows(self, indices: Sequence[int], dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
        """The cached tokens of dataset rows `indices` (each a dict like a shard's, empty for a row without tokens
        kept), read from their shards without loading them whole."""
        found = []
        for row in indices:
            shard = bisect_right(self._first_rows, row) - 1
            if shard < 0 or row >= self.num_rows:
                raise IndexError(f"Row {row} is not in the activation cache {str(self.path)!r} (rows 0.."
                                 f"{self.num_rows - 1}).")
            offsets = self._offsets(shard)
            local = row - self.shards[shard]["first_row"]
            begin, end = int(offsets[local]), int(offsets[local + 1])
            with safe_open(str(self.path / self.shards[shard]["file"]), framework="pt") as handle:
                part = {key: handle.get_slice(key)[begin:end] for key in SHARD_TENSORS}
            _check_finite(part["activations"], self.shards[shard]["file"])
            part["activations"] = part["activations"].to(dtype)
            found.append(part)
        return found

    def _offsets(self, shard: int) -> torch.Tensor:
        """Where each row of `shard` starts among its tokens (one more entry than rows)."""
        if shard not in self._row_offsets:
            entry = self.shards[shard]
            with safe_open(str(self._shard_path(entry)), framework="pt") as handle:
                _check_layout(entry, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()},
                              self.d_in)
                rows = handle.get_tensor("row")
            first, count = self.shards[shard]["first_row"], self.shards[shard]["num_rows"]
            boundaries = torch.arange(first, first + count + 1, dtype=torch.int64)
            self._row_offsets[shard] = torch.searchsorted(rows, boundaries)
        return self._row_offsets[shard]


class _WindowTokens:
    """The tokens of a window of shards (`parts`, dicts of shard tensors), read as one sequence without copying them
    into one: [`gather`] copies the tokens at given indices straight from their shards."""

    def __init__(self, parts: list[dict[str, torch.Tensor]]) -> None:
        self.parts = parts
        sizes = torch.tensor([len(part["row"]) for part in parts], dtype=torch.long)
        self.ends = torch.cumsum(sizes, 0)
        self.starts = self.ends - sizes
        self.num_tokens = int(self.ends[-1]) if len(parts) else 0

    def gather(self, indices: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The tokens at `indices` of the window, grouped by shard (each group in the order of `indices`: a batch of
        shuffled indices is a shuffled batch), with the activations in `dtype` (None: the storage dtype). One copy
        from each shard into the batch."""
        part_of = torch.bucketize(indices, self.ends, right=True)
        order = torch.argsort(part_of, stable=True)
        indices, part_of = indices[order], part_of[order]
        counts = torch.bincount(part_of, minlength=len(self.parts)).tolist()
        batch = {key: torch.empty((len(indices), *value.shape[1:]), dtype=value.dtype)
                 for key, value in self.parts[0].items()}
        begin = 0
        for part, (start, count) in enumerate(zip(self.starts.tolist(), counts)):
            if count:
                local = indices[begin : begin + count] - start
                for key, value in self.parts[part].items():
                    torch.index_select(value, 0, local, out=batch[key][begin : begin + count])
                begin += count
        if dtype is not None:
            batch["activations"] = batch["activations"].to(dtype)
        return batch


class CacheReader:
    """
    Stands in for a [`LayerReader`] wherever activations of dataset rows are read: in an [`ActivationBuffer`]
    (training), in [`compute_feature_weights`] and in [`evaluate_saev`], over the cache's [`cached_rows`]. Reading a
    batch of row indices gives the cached activations of those rows as a right-padded [`LayerActivations`] (positions
    not cached are PAD), so each of them computes what it computes reading the MLLM: bit-identical with a float32
    cache whose `read_batch_size` is the forward batch size of the run it stands in for (the same padding).

    Args:
        cache ([`ActivationCache`]): the cache.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the activations are put (the SAE-V's device).
    """

    def __init__(self, cache: ActivationCache, device: str | torch.device = "cpu") -> None:
        self.cache = cache
        self.layer = cache.layer
        self.device = torch.device(device)
        self.model = None
        self.prompt_format = PromptFormat(**cache.manifest["arguments"]["prompt_format"])

    @property
    def hidden_size(self) -> int:
        """Width of the cached activations."""
        return self.cache.d_in

    @property
    def include_special_tokens(self) -> bool:
        """Whether the cache holds the special/template tokens."""
        return bool(self.cache.manifest["include_special_tokens"])

    def check_sae(self, sae: Any) -> None:
        """Refuse an SAE-V not made for the cached layer's width and index, or not on this reader's device."""
        where = f"the activation cache {str(self.cache.path)!r}"
        if sae.config.d_in != self.hidden_size:
            raise ValueError(f"The SAE-V reads d_in={sae.config.d_in} but {where} holds activations of width "
                             f"{self.hidden_size} ({self.cache.manifest['model_name_or_path']}). Use an SAE-V trained "
                             f"on that model, or a cache of its model.")
        if sae.config.hook_layer is not None and sae.config.hook_layer != self.layer:
            raise ValueError(f"The SAE-V was trained on layer {sae.config.hook_layer} but {where} holds layer "
                             f"{self.layer}. Cache layer {sae.config.hook_layer} (`saev cache --layer "
                             f"{sae.config.hook_layer}`).")
        check_same_device(sae, self.device, f"{where}'s reader (CacheReader(cache, device=...))")

    def check_rows(self, dataset: Any) -> None:
        """Refuse a dataset whose rows are not the cache's: it must have the cache's number of rows (its
        [`cached_rows`], or the dataset the cache was made from)."""
        if not is_indexable(dataset) or len(dataset) != self.cache.num_rows:
            size = f"{len(dataset)} rows" if is_indexable(dataset) else f"a stream ({type(dataset).__name__})"
            raise ValueError(f"Reading from the activation cache {str(self.cache.path)!r} ({self.cache.num_rows} "
                             f"rows), the dataset must be its rows, but it is {size}. Pass cached_rows(cache).")

    def prepared_batches(self, dataset: Any, batch_size: int,
                         indices: Sequence[int] | None = None) -> Iterator[PreparedBatch]:
        """The rows at `indices` (positions of `dataset`, which are cache rows: see [`check_rows`]) in batches of
        `batch_size`, as [`prepared_batches`] hands them to a [`LayerReader`]: each batch's inputs are its row
        indices, which [`read_inputs`] reads (nothing to prepare, so no workers)."""
        self.check_rows(dataset)
        order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield PreparedBatch(positions=rows, rows=rows, inputs={"row": rows})

    def read_inputs(self, inputs: dict[str, Sequence[int]]) -> LayerActivations:
        """The cached activations of a prepared batch (see [`prepared_batches`])."""
        return self.read(inputs)

    def read(self, rows: dict[str, Sequence[int]], first_row: int | Sequence[int] = 0) -> LayerActivations:
        """The cached tokens of rows `rows["row"]` (dataset indices, a batch of [`cached_rows`]), right-padded, on
        `device`; positions not cached are PAD."""
        parts = self.cache.rows([int(row) for row in rows["row"]])
        length = max([int(part["position"].max()) + 1 for part in parts if len(part["position"])], default=1)
        hidden = torch.zeros(len(parts), length, self.cache.d_in)
        modality = torch.full((len(parts), length), int(Modality.PAD), dtype=torch.int8)
        for j, part in enumerate(parts):
            positions = part["position"].long()
            hidden[j, positions] = part["activations"]
            modality[j, positions] = part["modality"]
        return LayerActivations(hidden_states=hidden.to(self.device), modality=modality,
                                input_ids=torch.zeros(len(parts), length, dtype=torch.long), layer=self.layer)


def cached_rows(cache: ActivationCache):
    """The cache's rows as the dataset an [`ActivationBuffer`] reads with a [`CacheReader`]: a `datasets.Dataset`
    with one column, ``row`` (the dataset indices), so that batching and `split_dataset_by_node` work as on any
    dataset."""
    import datasets

    return datasets.Dataset.from_dict({"row": list(range(cache.num_rows))})


def _check_layout(entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], d_in: int) -> None:
    """Refuse a shard (`shapes`: its tensors' shapes) that lacks a tensor or disagrees with its manifest `entry` (a
    cache may come from the Hub: nothing in it is trusted)."""
    name, count = entry["file"], entry["num_tokens"]
    missing = sorted(set(SHARD_TENSORS) - set(shapes))
    if missing:
        raise ValueError(f"Shard {name} lacks the tensors {missing}: it was not written by `saev cache`, or it is "
                         "damaged. Write the cache again.")
    if shapes["activations"] != (count, d_in) or any(shapes[key][:1] != (count,) for key in SHARD_TENSORS[1:]):
        raise ValueError(f"Shard {name} holds activations of shape {shapes['activations']} where the manifest says "
                         f"({count}, {d_in}): the shard and cache_manifest.json disagree. Write the cache again.")


def _check_finite(activations: torch.Tensor, name: str) -> None:
    """Refuse non-finite cached activations: the shard is damaged. (The smallest and largest value are NaN when any
    value is, and infinite when one is: one read-only pass, 20-40x faster than an elementwise `isfinite`.)"""
    if activations.numel() and not all(torch.isfinite(bound) for bound in torch.aminmax(activations)):
        raise ValueError(f"Shard {name} holds non-finite activations: it is damaged. Write the cache again.")
