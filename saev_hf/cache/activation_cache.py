"""An activation cache on disk, read back: [`ActivationCache`] reads the shards that [`saev_hf.cache.cache_activations`]
writes, in stream (dataset) order or shuffled in bounded memory, and checks that every shard matches its manifest.

```
cache_dir/
  cache_manifest.json           model, layer, d_in, storage dtype, the arguments, finished shards, the next row
  shard-00000.safetensors       activations (n, d_in) in the storage dtype; modality (n,) int8; row (n,) int64;
  shard-00001.safetensors       position (n,) int32
  saev_output.json              (which command wrote the folder, see saev_hf.runtime.folders)
```
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

MANIFEST_NAME = "cache_manifest.json"


FORMAT = "saev-hf activation cache"


FORMAT_VERSION = 1


STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

SHARD_TENSORS = ("activations", "modality", "row", "position")
"""The tensors of every shard, each with one entry per cached token."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


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
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except ValueError as error:  # a truncated or damaged file
            raise ValueError(f"{manifest_path} is damaged ({error}): it is not the JSON `saev cache` writes. Write the "
                             f"cache again, or download it again.") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a saev-hf activation cache manifest.")
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"The activation cache in {str(self.path)!r} is unfinished (rows read: {self.manifest['next_row']}). "
                f"Run `saev cache` again with the same arguments to finish it, or pass allow_incomplete=True."
            )
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._first_rows = [shard["first_row"] for shard in self.shards]
        self._row_offsets: dict[int, torch.Tensor] = {}
        self._verified: set[int] = set()  # shards whose bytes matched their SHA-256 (checked once each)

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
        data = self._shard_path(entry).read_bytes()
        self._verify(index, data)
        try:
            tensors = load(data)
        except SafetensorError as error:
            raise ValueError(f"Shard {entry['file']} of the activation cache {self.path} is damaged (a broken header "
                             f"or a truncated file: {error}). Write the cache again, or download it again.") from None
        _check_layout(entry, {key: tuple(value.shape) for key, value in tensors.items()}, self.d_in)
        self._check_contents(entry, tensors)
        _check_finite(tensors["activations"], entry["file"])
        if dtype is not None:
            tensors["activations"] = tensors["activations"].to(dtype)
        return tensors

    def _verify(self, index: int, data: bytes | None = None) -> None:
        """Refuse a shard whose bytes are not those the manifest recorded (changed, or another shard's under its
        name); checked once per shard. A cache written before checksums were recorded is checked by its contents."""
        entry = self.shards[index]
        expected = entry.get("sha256")
        if expected is None or index in self._verified:
            return
        if data is None:
            data = self._shard_path(entry).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"Shard {entry['file']} of the activation cache {self.path} is not the file `saev cache` "
                             f"wrote (its SHA-256 differs from the manifest's: changed bytes, or another shard under "
                             f"its name). Write the cache again, or download it again.")
        self._verified.add(index)

    def _check_contents(self, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Refuse a shard whose rows are not the manifest's (a shard under another's name) or whose activations are
        not in the manifest's storage dtype."""
        rows = tensors["row"]
        first, count = entry["first_row"], entry["num_rows"]
        unordered = bool((rows[1:] < rows[:-1]).any())
        if len(rows) and (int(rows.min()) < first or int(rows.max()) >= first + count or unordered):
            raise ValueError(f"Shard {entry['file']} of the activation cache {self.path} holds rows "
                             f"{int(rows.min())}..{int(rows.max())}, where the manifest says {first}.."
                             f"{first + count - 1} in order: the shards were renamed or mixed. Write the cache again.")
        stored = STORAGE_DTYPES.get(self.manifest.get("storage_dtype", "float32"))
        if tensors["activations"].dtype != stored:
            raise ValueError(f"Shard {entry['file']} of the activation cache {self.path} stores "
                             f"{tensors['activations'].dtype} activations, where the manifest says "
                             f"{self.manifest.get('storage_dtype')}: they disagree. Write the cache again.")

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
            self._verify(shard)
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
            try:
                with safe_open(str(self._shard_path(entry)), framework="pt") as handle:
                    _check_layout(entry, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()},
                                  self.d_in)
                    rows = handle.get_tensor("row")
                    dtype = handle.get_slice("activations").get_dtype()
            except SafetensorError as error:
                raise ValueError(f"Shard {entry['file']} of the activation cache {self.path} is damaged ({error}). "
                                 f"Write the cache again, or download it again.") from None
            self._check_contents(entry, {"row": rows, "activations": torch.empty(0, dtype=_SAFETENSORS_DTYPES.get(
                dtype, torch.float32))})
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
