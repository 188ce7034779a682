"""Preparing model inputs ahead of the forward: the input pipeline of the scorer, the weighting and the inspection.

Turning rows into model inputs (image decoding, chat template, the processor call) costs 15-38 ms per row on one CPU
thread at LLaVA-NeXT's shapes: run in the process that drives the accelerator, it leaves the accelerator idle that
long. [`prepared_batches`] hands the preparation to a `torch.utils.data.DataLoader` with `workers` worker processes,
so that batch k+1 is prepared while the model runs batch k, and can group rows of similar length into the same
forward batch (within a bounded window of batches, as transformers' `group_by_length` does over the whole dataset) to
cut padding. Every batch comes with the dataset index of each of its rows, so that results are put back in the
dataset's order, and a row that cannot be prepared comes back as a [`RowError`] naming that row, raised (or isolated)
by the caller in the main process, whichever worker prepared it.

Workers only prepare inputs (CPU tensors): the model never leaves the main process, and a worker never touches the
accelerator, so forking them from a process that uses CUDA is safe (the usual DataLoader pattern). With `workers=0`
everything runs in the calling process, in order, as before the pipeline existed.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from .batching import is_indexable, row_batches, take_rows
from .errors import RowError
from .prompts import PromptFormat, prepare_inputs


def preprocessing_workers_field() -> Any:
    """The `preprocessing_workers` option, one definition for every arguments dataclass that reads rows."""
    return field(
        default=0,
        metadata={"help": "DataLoader worker processes that prepare the next batches (images, chat template, "
                  "processor) while the model runs the current one. 0 prepares them in the main process, one "
                  "after the other. On a GPU, 2-8 keeps it busy; results do not change."},
    )


def read_batch_size_field() -> Any:
    """The `read_batch_size` option of training and caching: one name, one help."""
    return field(default=8, metadata={
        "help": "Dataset rows per forward pass of the MLLM. A cache made with the read_batch_size of the training run "
                "it stands in for gives bit-identical activations (the same padding)."})


def check_workers(workers: int, option: str = "preprocessing_workers") -> None:
    """Refuse a negative or non-integer number of workers, naming the option."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"{option}={workers!r} must be a number of worker processes, 0 or more (0: no workers).")


@dataclass
class PreparedBatch:
    """
    One forward batch of rows, prepared.

    Args:
        positions (`list[int]`): where the rows are in the data given to [`prepared_batches`] (its indices), in the
            order of `inputs`: results go back to these places.
        rows (`list[int]`): the dataset index of each row, in the same order (what errors name).
        inputs (*optional*): the right-padded model inputs (a `BatchFeature`); None when a row could not be prepared.
        error ([`RowError`], *optional*): why the batch could not be prepared (it names the row).
        batch (*optional*): the rows themselves (a dict of columns or a list of rows), with `keep_rows=True`.
    """

    positions: list[int]
    rows: list[int]
    inputs: Any = None
    error: RowError | None = None
    batch: Any = None

    def check(self) -> Any:
        """The inputs; raises the batch's [`RowError`] when it could not be prepared."""
        if self.error is not None:
            raise self.error
        return self.inputs

    @property
    def padding_fraction(self) -> float:
        """The share of the batch's positions that are padding (0 when it could not be prepared)."""
        if self.inputs is None:
            return 0.0
        mask = self.inputs.get("attention_mask")
        return 0.0 if mask is None else 1.0 - float(mask.sum()) / mask.numel()


def length_estimate(row: Mapping[str, Any], prompt_format: PromptFormat) -> tuple[int, int]:
    """
    A cheap estimate of a row's input length, to group rows of similar length: `(number of images, characters of
    the prompt and response text)`, compared in that order (image tokens dominate a multimodal input). Nothing is
    decoded or tokenized. Images of different sizes can give different numbers of image tokens (LLaVA-NeXT's anyres,
    Qwen2-VL): the estimate does not see that, so grouping then cuts less padding, but results never depend on it.
    """
    images = row.get(prompt_format.image_column) if prompt_format.image_column else None
    num_images = len(images) if isinstance(images, (list, tuple)) else int(images is not None)
    columns = [prompt_format.prompt_column] + ([prompt_format.response_column] if prompt_format.response_column else [])
    return num_images, sum(_text_length(row.get(column)) for column in columns)


def _text_length(value: Any) -> int:
    """Characters of text in a prompt or response: plain text, or the text parts of messages."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        if "content" in value:
            return _text_length(value["content"])
        return len(value["text"]) if isinstance(value.get("text"), str) else 0
    if isinstance(value, (list, tuple)):
        return sum(_text_length(part) for part in value)
    return 0


def length_grouped_batches(lengths: Sequence[Any], batch_size: int, window: int | None = None) -> list[list[int]]:
    """
    Batches of positions `0..len(lengths)-1` grouped by length: within each window of `window` batches (every
    position at once with None), positions are sorted by `lengths`, longest first (so that a batch too large for
    memory fails at the start, as transformers' `LengthGroupedSampler` arranges), and cut into batches of
    `batch_size`. The sort is stable, so rows of equal length keep their order. Bounding the window keeps the
    dataset's order at a coarse scale (results stream out at a steady pace, and a stream need not be read whole).
    """
    if batch_size <= 0 or (window is not None and window <= 0):
        raise ValueError(f"batch_size={batch_size} and window={window} must be positive (window may be None).")
    span = len(lengths) if window is None else window * batch_size
    batches = []
    for start in range(0, len(lengths), max(span, 1)):
        ordered = sorted(range(start, min(start + span, len(lengths))), key=lambda i: lengths[i], reverse=True)
        batches += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    return batches


class _Rows:
    """Rows of `data` by position: a dict of columns (a `datasets` batch), a `datasets.Dataset` or a list of rows."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        if isinstance(self.data, Mapping):
            return len(next(iter(self.data.values()))) if self.data else 0
        return len(self.data)

    def take(self, positions: list[int]) -> Any:
        return take_rows(self.data, positions)

    def row(self, position: int) -> Mapping[str, Any]:
        return {name: values[position] for name, values in self.data.items()} if isinstance(self.data, Mapping) \
            else self.data[position]


class _Preparation(torch.utils.data.Dataset):
    """Item k: forward batch k of rows, prepared ([`PreparedBatch`]); what the DataLoader's workers compute."""

    def __init__(self, rows: _Rows, batches: list[list[int]], row_ids: Sequence[int] | None, processor: Any,
                 prompt_format: PromptFormat, image_token_id: int | None, keep_rows: bool) -> None:
        self.rows, self.batches, self.row_ids = rows, batches, row_ids
        self.processor, self.prompt_format, self.image_token_id = processor, prompt_format, image_token_id
        self.keep_rows = keep_rows

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> PreparedBatch:
        positions = self.batches[k]
        batch = self.rows.take(positions)
        rows = [self.row_ids[p] for p in positions] if self.row_ids is not None else list(positions)
        return _prepare(self, positions, rows, batch)


class _StreamPreparation(torch.utils.data.IterableDataset):
    """A stream's batches, prepared in order (read by one worker: more would each read the whole stream)."""

    def __init__(self, data: Any, batch_size: int, indices: Any, row_ids: Sequence[int] | None, processor: Any,
                 prompt_format: PromptFormat, image_token_id: int | None, keep_rows: bool) -> None:
        self.data, self.batch_size, self.indices, self.row_ids = data, batch_size, indices, row_ids
        self.processor, self.prompt_format, self.image_token_id = processor, prompt_format, image_token_id
        self.keep_rows = keep_rows

    def __iter__(self) -> Iterator[PreparedBatch]:
        for chunk, batch in row_batches(self.data, self.batch_size, self.indices):
            rows = [self.row_ids[p] for p in chunk] if self.row_ids is not None else list(chunk)
            yield _prepare(self, list(chunk), rows, batch)


def _prepare(preparation: Any, positions: list[int], rows: list[int], batch: Any) -> PreparedBatch:
    try:
        inputs = prepare_inputs(preparation.processor, batch, preparation.prompt_format, preparation.image_token_id,
                                rows)
        error = None
    except RowError as exc:  # returned, not raised: the main process raises it as it is, naming the row
        inputs, error = None, exc
    return PreparedBatch(positions, rows, inputs, error, batch if preparation.keep_rows else None)


def _main_process_handles_ctrl_c(worker_id: int) -> None:
    """Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and a worker that died of it
    first would turn the interrupt into "DataLoader worker exited unexpectedly"; the main process stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _CtrlCMemory:
    """Ctrl-C that lands while this process forks DataLoader workers is raised inside an at-fork hook (logging's lock
    release), where Python prints it as "Exception ignored" and drops it: the command would go on to the end. While
    installed (only over Python's own default handler, in the main thread), it remembers every SIGINT, still raises
    KeyboardInterrupt at once, and `check` raises it again at the next batch if it was lost."""

    def __init__(self) -> None:
        import threading

        self.seen = False
        self.previous = signal.getsignal(signal.SIGINT)
        self.active = (threading.current_thread() is threading.main_thread()
                       and self.previous is signal.default_int_handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_CtrlCMemory":
        if self.active:
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def _as_is(item: PreparedBatch) -> PreparedBatch:
    return item


def prepared_batches(reader: Any, data: Any, batch_size: int, indices: Sequence[int] | None = None, *,
                     row_ids: Sequence[int] | None = None, workers: int = 0, group_by_length: bool = False,
                     length_window: int | None = None, keep_rows: bool = False) -> Iterator[PreparedBatch]:
    """
    The rows of `data`, prepared for `reader`'s model in forward batches of `batch_size` ([`PreparedBatch`]).

    Args:
        reader ([`LayerReader`]): whose processor, columns (`prompt_format`) and image token prepare the inputs.
        data: a `datasets` batch (dict of columns), a `datasets.Dataset` or list of rows (read by index), or a stream
            (`datasets.IterableDataset`, a re-iterable of rows; read in order).
        batch_size (`int`): rows per forward batch.
        indices (*optional*): the positions of `data` to read, in this order (default: all); increasing for a stream.
        row_ids (*optional*): the dataset index of each position of `data`, for errors and `PreparedBatch.rows`
            (default: the position; a `datasets` batch from `ds.map(..., with_indices=True)` passes the map's
            indices; a stream read from its row n on passes `range(n, ...)`).
        workers (`int`): DataLoader worker processes preparing batches ahead (0: in this process, when asked for).
            A stream is prepared by one worker at most.
        group_by_length (`bool`): sort rows by [`length_estimate`] within windows of `length_window` batches (the
            whole of `indices` with None), longest first, to cut padding. Batches then hold rows out of order:
            each says where its rows go (`positions`). Not for streams.
        keep_rows (`bool`): also hand back each batch's rows (`PreparedBatch.batch`).

    Yields [`PreparedBatch`]es, in forward order; a batch with a row that cannot be prepared carries its
    [`RowError`] (`.check()` raises it) instead of inputs.
    """
    check_workers(workers, "workers")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive number of rows per forward batch.")
    processor, prompt_format, image_token_id = reader.processor, reader.prompt_format, reader.image_token_id
    if not is_indexable(data):
        if group_by_length:
            raise ValueError("group_by_length needs rows read by index; a stream is read in order. Pass a "
                             "datasets.Dataset (or leave group_by_length off).")
        source: torch.utils.data.Dataset = _StreamPreparation(data, batch_size, indices, row_ids, processor,
                                                              prompt_format, image_token_id, keep_rows)
        workers = min(workers, 1)
    else:
        rows = _Rows(data)
        order = list(range(len(rows))) if indices is None else list(indices)
        if group_by_length:
            lengths = [length_estimate(rows.row(p), prompt_format) for p in order]
            batches = [[order[i] for i in batch] for batch in length_grouped_batches(lengths, batch_size,
                                                                                       length_window)]
        else:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        source = _Preparation(rows, batches, row_ids, processor, prompt_format, image_token_id, keep_rows)
    if workers == 0:
        yield from (iter(source) if isinstance(source, _StreamPreparation)
                    else (source[k] for k in range(len(source))))
        return
    with _CtrlCMemory() as ctrl_c:
        loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                             worker_init_fn=_main_process_handles_ctrl_c)
        for batch in loader:
            ctrl_c.check()
            yield batch
        ctrl_c.check()
