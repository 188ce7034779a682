"""Writing an activation cache's shards: [`ShardWriter`] gathers the cached tokens of whole rows and writes them as a
shard once the next row would not fit, under a temporary name renamed when complete, then records it in the manifest
with the next row to read. So an interrupted run leaves only finished shards marked done, and a row never spans two
shards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .activation_cache import FORMAT, SHARD_TENSORS, STORAGE_DTYPES, _shard_name


class ShardWriter:
    """
    The shards of one cache run, written in row order.

    Args:
        output (`Path`): the cache folder.
        manifest (`dict`): its manifest (`cache_manifest.json`'s content), updated and rewritten after each shard.
        manifest_path (`Path`): where the manifest is written.
        storage_dtype (`str`): one of `STORAGE_DTYPES`, the dtype the activations are stored in.
        shard_size_tokens (`int`): the most tokens in a shard.
        first_row (`int`): the row the next shard starts at (where a resumed run continues).
    """

    def __init__(self, output: Path, manifest: dict[str, Any], manifest_path: Path, storage_dtype: str,
                 shard_size_tokens: int, first_row: int) -> None:
        self.output, self.manifest, self.manifest_path = output, manifest, manifest_path
        self.storage = STORAGE_DTYPES[storage_dtype]
        self.shard_size_tokens = shard_size_tokens
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_tokens, self.pending_first_row = 0, first_row

    def add(self, row: int, hidden: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor) -> None:
        """Add row `row`'s cached tokens (`hidden` (n, d_in), their modality and positions), first writing the
        pending rows as a shard when this row would not fit in it."""
        count = len(positions)
        if count > self.shard_size_tokens:
            raise ValueError(
                f"Row {row} has {count} tokens to cache, more than shard_size_tokens={self.shard_size_tokens} (a row "
                f"never spans two shards). Raise shard_size_tokens to at least {count}."
            )
        if self.pending_tokens + count > self.shard_size_tokens and self.pending:
            self.write(end_row=row)
        self.pending.append({
            "activations": hidden.to(self.storage),
            "modality": modality.to(torch.int8),
            "row": torch.full((count,), row, dtype=torch.int64),
            "position": positions.to(torch.int32),
        })
        self.pending_tokens += count

    def write(self, end_row: int) -> None:
        """Write the pending rows, `pending_first_row..end_row-1`, as the next shard: under a temporary name, renamed
        once complete, then recorded in the manifest with `end_row` as the next row to read."""
        name = _shard_name(len(self.manifest["shards"]))
        tensors = {key: torch.cat([part[key] for part in self.pending]) for key in SHARD_TENSORS}
        # one metadata key: safetensors writes several in an arbitrary order, and identical runs must give identical
        # bytes (the manifest records each shard's SHA-256, which reading checks)
        metadata = {"saev_hf": json.dumps({"format": FORMAT, "first_row": self.pending_first_row,
                                           "end_row": end_row}, sort_keys=True)}
        data = save({key: value.contiguous() for key, value in tensors.items()}, metadata=metadata)
        temporary = self.output / (name + ".tmp")
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.output / name)
        num_tokens = len(tensors["row"])
        self.manifest["shards"].append({"file": name, "num_tokens": num_tokens, "first_row": self.pending_first_row,
                                        "num_rows": end_row - self.pending_first_row,
                                        "sha256": hashlib.sha256(data).hexdigest()})
        self.manifest["num_tokens"] += num_tokens
        self.manifest["next_row"] = end_row
        write_json(self.manifest_path, self.manifest)
        self.pending, self.pending_tokens, self.pending_first_row = [], 0, end_row

    def finish(self, num_rows: int) -> None:
        """Write what is pending and mark the cache complete with `num_rows` rows (rows at the end without a token to
        keep belong to the last shard)."""
        if self.pending:
            self.write(end_row=num_rows)
        elif self.manifest["shards"]:
            last = self.manifest["shards"][-1]
            last["num_rows"] = max(last["num_rows"], num_rows - last["first_row"])
        self.manifest["next_row"], self.manifest["complete"] = num_rows, True
        write_json(self.manifest_path, self.manifest)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` atomically: under a temporary name, then renamed."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(temporary, path)
