"""Reading a dataset's rows in batches: the one row batcher of the evaluation, the activation buffer and the input
pipeline ([`saev_hf.data.pipeline.prepared_batches`]) that the scorer, the weighting and the inspection read through.

A dataset here is a `datasets.Dataset` (or any sequence of row dicts), read by index, or a stream
(`datasets.IterableDataset`, any re-iterable of row dicts), read in order.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping


def is_indexable(dataset: Any) -> bool:
    """Whether `dataset` can be read by row index (a `Dataset`, a list), rather than only streamed in order."""
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def row_batches(dataset: Any, batch_size: int, indices: Iterable[int] | None = None) -> Iterator[tuple[list[int], Any]]:
    """
    Batches `(row indices, rows)` of `dataset`: every row, or the rows at `indices` in their order.

    An indexable dataset yields `dataset[indices]` (a dict of columns) when it has `select` (a `datasets.Dataset`),
    else a list of rows; a stream is read in order, keeping the wanted rows (`indices` then must be increasing), and
    yields lists of rows. Every batch has `batch_size` rows but the last.
    """
    if not is_indexable(dataset):
        yield from _stream_batches(dataset, batch_size, indices)
        return
    indices = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        yield chunk, take_rows(dataset, chunk)


def take_rows(dataset: Any, positions: list[int]) -> Any:
    """The rows at `positions` of an indexable dataset: a dict of columns from a `datasets.Dataset` (`dataset[
    positions]`) or from a `datasets` batch (a dict of columns itself), else a list of rows."""
    if isinstance(dataset, Mapping):
        return {name: [values[p] for p in positions] for name, values in dataset.items()}
    return dataset[positions] if hasattr(dataset, "select") else [dataset[p] for p in positions]


def _stream_batches(dataset: Any, batch_size: int, indices: Iterable[int] | None) -> Iterator[tuple[list[int], Any]]:
    wanted = None if indices is None else set(indices)
    last = None if wanted is None else max(wanted, default=-1)
    chunk, rows = [], []
    for i, row in enumerate(dataset):
        if last is not None and i > last:
            break  # past the last wanted row: the rest of the stream is never read
        if wanted is None or i in wanted:
            chunk.append(i)
            rows.append(row)
        if len(chunk) == batch_size:
            yield chunk, rows
            chunk, rows = [], []
    if chunk:
        yield chunk, rows
