"""A shuffling buffer of residual-stream activations of real tokens, read from a dataset with a [`LayerReader`].

Training an SAE-V needs a stream of token activations in random order: consecutive tokens of one document are highly
correlated, so they are mixed across many documents first. [`ActivationBuffer`] does what SAELens' activation store and
sparsify's trainer do, without the released SAE-V code's two artefacts:

- only real positions enter the buffer (`LayerActivations.token_mask`): padding rows are never trained on;
- every token read enters the buffer exactly once (no copies of documents).

The buffer reads batches of dataset rows with the reader (rows in a fresh random order on each pass over the data when
`shuffle_dataset=True`), flattens the real positions into a pool of at least `buffer_size_tokens` tokens, shuffles the
pool, and hands out batches of `batch_size_tokens` until it is half empty; then it reads more rows, mixes them with
what is left and shuffles again. When the data runs out it starts another pass (with a warning: the SAE then sees
tokens again). Each read is checked for NaN/inf before it can reach the buffer.

Its whole state (unread tokens, shuffle generator, position in the data) is a `state_dict`, so a training run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import numpy as np
import torch
from datasets import IterableDataset

from ..activations.reader import LayerReader
from ..data.batching import row_batches
from ..data.errors import RowError
from ..runtime.progress import progress_bar

logger = logging.getLogger(__name__)


def _is_iterable_dataset(dataset: Any) -> bool:

    return isinstance(dataset, IterableDataset)


class ActivationBuffer:
    """
    An endless iterator over shuffled batches `(batch_size_tokens, d_in)` of layer-L activations of real tokens.

    Example:

    ```python
    reader = LayerReader(model, processor, layer=16)
    buffer = ActivationBuffer(reader, dataset, batch_size_tokens=4096, buffer_size_tokens=262144)
    batch = next(buffer)  # float32, on `device`
    ```

    Args:
        reader ([`LayerReader`]): reads layer L of the base model for a batch of rows.
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the rows, in the reader's prompt format. In a
            distributed run, pass this process's shard.
        batch_size_tokens (`int`): tokens per batch handed out.
        buffer_size_tokens (`int`): tokens the buffer holds after a refill; it refills when fewer than half remain.
            At least `2 * batch_size_tokens`. Larger buffers mix more documents into each batch.
        read_batch_size (`int`, *optional*, defaults to 8): rows per forward pass of the base model.
        include_special_tokens (`bool`, *optional*, defaults to `True`): whether special/template tokens (BOS, role
            markers, image start/end markers) are trained on. They are residual stream like any other position.
        shuffle_dataset (`bool`, *optional*, defaults to `True`): read the rows in a new random order on each pass.
        seed (`int`, *optional*, defaults to 42): seeds the row order and the token shuffle.
        device (`torch.device` or `str`, *optional*): where the buffer and the batches live (default: CPU).
        iterable_shuffle_buffer_size (`int`, *optional*, defaults to 1000): shuffle-buffer size (in rows) used for a
            streamed `IterableDataset`, which cannot be permuted as a whole.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar of the tokens read while the buffer
            fills (the first fill of a large buffer takes a while before any batch comes out).
    """

    def __init__(
        self,
        reader: LayerReader,
        dataset: Any,
        batch_size_tokens: int,
        buffer_size_tokens: int,
        read_batch_size: int = 8,
        include_special_tokens: bool = True,
        shuffle_dataset: bool = True,
        seed: int = 42,
        device: torch.device | str | None = None,
        iterable_shuffle_buffer_size: int = 1000,
        progress: bool = False,
    ) -> None:
        if batch_size_tokens <= 0 or read_batch_size <= 0:
            raise ValueError(
                f"batch_size_tokens={batch_size_tokens} and read_batch_size={read_batch_size} must be positive."
            )
        if buffer_size_tokens < 2 * batch_size_tokens:
            raise ValueError(
                f"buffer_size_tokens={buffer_size_tokens} must be at least twice batch_size_tokens="
                f"{batch_size_tokens} (the buffer refills when half empty). Raise buffer_size_tokens to at least "
                f"{2 * batch_size_tokens}."
            )
        self.reader = reader
        self.dataset = dataset
        self.batch_size_tokens = batch_size_tokens
        self.buffer_size_tokens = buffer_size_tokens
        self.read_batch_size = read_batch_size
        self.include_special_tokens = include_special_tokens
        self.shuffle_dataset = shuffle_dataset
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.iterable_shuffle_buffer_size = iterable_shuffle_buffer_size
        self.progress = progress
        self.generator = torch.Generator().manual_seed(seed)
        self._tokens = torch.empty(0, reader.hidden_size, device=self.device)
        # Position in the data: the pass over the dataset and the number of rows of that pass already read.
        self.data_pass = 0
        self.rows_into_pass = 0
        self.tokens_in_pass = 0
        self.rows_read = 0
        self.tokens_read = 0
        self._rows: Iterator[tuple[list[int] | None, dict[str, list[Any]]]] | None = None
        self.warn_on_new_pass = True

    # ------------------------------------------------------------------------------------------------------------
    # Reading rows
    # ------------------------------------------------------------------------------------------------------------

    def _row_batches(self) -> Iterator[tuple[list[int] | None, dict[str, list[Any]]]]:
        """Batches of rows of the current pass from the current position: (row indices or None, columns)."""
        if _is_iterable_dataset(self.dataset):
            data = self.dataset
            if self.shuffle_dataset:
                data = data.shuffle(seed=self.seed + self.data_pass, buffer_size=self.iterable_shuffle_buffer_size)
            if self.rows_into_pass:
                data = data.skip(self.rows_into_pass)
            for batch in data.iter(batch_size=self.read_batch_size):
                yield None, batch
            return
        num_rows = len(self.dataset)
        if self.shuffle_dataset:
            # Independent of the token-shuffle generator, and the same order whatever the position we resume at.
            order = np.random.default_rng([self.seed, self.data_pass]).permutation(num_rows).tolist()
        else:
            order = list(range(num_rows))
        yield from row_batches(self.dataset, self.read_batch_size, order[self.rows_into_pass :])

    def read_tokens(self) -> torch.Tensor:
        """
        Read the next batch of rows and return the activations of their real tokens, `(n, d_in)` float32.

        Moves on to the next pass over the data when this one is over. Raises `ValueError` when a whole pass yields
        no token, or when the activations contain NaN or inf.
        """
        while True:
            if self._rows is None:
                self._rows = self._row_batches()
            try:
                indices, rows = next(self._rows)
            except StopIteration:
                self._end_pass()
                continue
            return self._read(indices, rows)

    def _end_pass(self) -> None:
        if self.tokens_in_pass == 0:
            what = (
                "has no rows" if self.rows_into_pass == 0 else f"gave no usable token in its {self.rows_into_pass} rows"
            )
            raise ValueError(
                f"The training data {what} (this process's shard, pass {self.data_pass}). Check that the dataset split "
                f"is not empty, that the prompt/image columns hold data"
                + ("" if self.include_special_tokens else ", and that rows hold more than special tokens (or set "
                   "include_special_tokens=True)")
                + ". In a distributed run every process needs rows: use at least as many rows as processes."
            )
        self.data_pass += 1
        self.rows_into_pass = 0
        self.tokens_in_pass = 0
        self._rows = None
        if self.warn_on_new_pass:
            # Once per run is enough to tell the user; later passes are logged quietly.
            (logger.warning if self.data_pass == 1 else logger.info)(
                "The training data is exhausted after %d tokens; starting pass %d over it (the SAE-V sees its tokens "
                "again). Use more data or fewer training tokens to train on each token once.",
                self.tokens_read,
                self.data_pass,
            )

    def _read(self, indices: list[int] | None, rows: dict[str, list[Any]]) -> torch.Tensor:
        num_rows = len(next(iter(rows.values()))) if rows else 0
        where = (
            f"rows {indices} of the data this process reads" if indices is not None else
            f"rows {self.rows_into_pass}..{self.rows_into_pass + num_rows - 1} of pass {self.data_pass} of the stream"
        )
        try:
            acts = self.reader.read(rows, first_row=self.rows_into_pass)
        except RowError as error:
            if indices is None:  # a stream: its rows are numbered in reading order
                raise RowError(
                    f"{error} (Reading {where}; row numbers in the message count rows in reading order.)"
                ) from error
            # shuffled rows: read them one by one, so that the error names the row's index in the data, not its
            # position in the shuffled reading order
            for j, index in enumerate(indices):
                try:
                    self.reader.read({name: [values[j]] for name, values in rows.items()}, first_row=index)
                except RowError as row_error:
                    raise RowError(
                        f"{row_error} (Row numbers are indices in the data this process reads: the dataset in a "
                        f"one-process run, this process's shard in a distributed one.)"
                    ) from error
            raise
        mask = acts.scored_mask(self.include_special_tokens)
        tokens = acts.hidden_states[mask].to(self.device, torch.float32)
        if not torch.isfinite(tokens).all():
            bad = int((~torch.isfinite(tokens)).any(dim=-1).sum())
            raise ValueError(
                f"Layer {self.reader.layer} of {type(self.reader.model).__name__} produced NaN or inf activations at "
                f"{bad} of {len(tokens)} tokens when reading {where}. Training stopped before using them. Load the "
                f"model in float32 (or bfloat16 rather than float16), check these rows, or check the model weights."
            )
        self.rows_into_pass += num_rows
        self.rows_read += num_rows
        self.tokens_in_pass += len(tokens)
        self.tokens_read += len(tokens)
        return tokens

    # ------------------------------------------------------------------------------------------------------------
    # The buffer
    # ------------------------------------------------------------------------------------------------------------

    def __iter__(self) -> ActivationBuffer:
        return self

    def __next__(self) -> torch.Tensor:
        if len(self._tokens) < max(self.buffer_size_tokens // 2, self.batch_size_tokens):
            self._refill()
        batch, self._tokens = self._tokens[: self.batch_size_tokens], self._tokens[self.batch_size_tokens :]
        return batch

    def _refill(self) -> None:
        parts, count = [self._tokens], len(self._tokens)
        # A bar for the first fill only (the wait before the first step): a bar per refill would add a line to a log
        # at every refill, and the training bar already shows the progress.
        first_fill = count == 0 and self.tokens_read == 0
        with progress_bar(total=self.buffer_size_tokens, initial=count, desc="Filling the activation buffer",
                          unit="token", leave=False, disable=not (self.progress and first_fill)) as bar:
            while count < self.buffer_size_tokens:
                tokens = self.read_tokens()
                parts.append(tokens)
                count += len(tokens)
                bar.update(len(tokens))
        pool = torch.cat(parts)
        self._tokens = pool[torch.randperm(len(pool), generator=self.generator).to(pool.device)]

    def __len__(self) -> int:
        """Number of tokens currently in the buffer (read but not yet handed out)."""
        return len(self._tokens)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self, include_tokens: bool = True) -> dict[str, Any]:
        """
        The buffer's state: position in the data, counters, shuffle generator and (optionally) the unread tokens.

        Without the tokens (`include_tokens=False`, a much smaller checkpoint), a resumed buffer starts empty at the
        same position in the data: the tokens that were in the buffer are skipped and the batches differ from an
        uninterrupted run's.
        """
        return {
            "tokens": self._tokens.detach().contiguous().cpu() if include_tokens else None,
            "generator": self.generator.get_state(),
            "data_pass": self.data_pass,
            "rows_into_pass": self.rows_into_pass,
            "tokens_in_pass": self.tokens_in_pass,
            "rows_read": self.rows_read,
            "tokens_read": self.tokens_read,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from [`state_dict`]."""
        tokens = state.get("tokens")
        if tokens is not None and tokens.shape[-1] != self.reader.hidden_size:
            raise ValueError(
                f"The saved buffer holds activations of width {tokens.shape[-1]}, but the model's hidden size is "
                f"{self.reader.hidden_size}. Resume with the model the checkpoint was trained on."
            )
        self._tokens = (
            tokens.to(self.device, torch.float32) if tokens is not None
            else torch.empty(0, self.reader.hidden_size, device=self.device)
        )
        self.generator.set_state(state["generator"])
        for name in ("data_pass", "rows_into_pass", "tokens_in_pass", "rows_read", "tokens_read"):
            setattr(self, name, int(state[name]))
        self._rows = None


def activation_norm_statistics(buffer: ActivationBuffer, num_tokens: int) -> tuple[float, int]:
    """
    Sum of the L2 norms of the first `num_tokens` tokens the buffer's data yields, and how many were read.

    Reads with [`ActivationBuffer.read_tokens`] (so use a fresh buffer, not the training one), with a progress bar
    when the buffer has `progress=True`. Fewer tokens are counted only when a whole pass over the data holds fewer
    than `num_tokens`.
    """
    total, count = 0.0, 0
    buffer.warn_on_new_pass = False
    with progress_bar(total=num_tokens, desc="Estimating the input scale", unit="token", leave=False,
                      disable=not buffer.progress) as bar:
        while count < num_tokens:
            tokens = buffer.read_tokens()
            if buffer.data_pass > 0:  # the first pass is over: these tokens would be counted twice
                break
            tokens = tokens[: num_tokens - count]
            total += float(tokens.double().norm(dim=-1).sum())
            count += len(tokens)
            bar.update(len(tokens))
    return total, count


def input_scale_from_norms(d_in: int, norm_sum: float, count: int) -> float:
    """The paper's input scale `sqrt(d_in) / E||x||` from the sum of norms of `count` tokens."""
    if count == 0 or norm_sum <= 0:
        raise ValueError(
            f"Cannot estimate the input scale from {count} tokens with norm sum {norm_sum}: the data gave no "
            f"non-zero activation. Check the data, or pass input_scale= explicitly."
        )
    return math.sqrt(d_in) / (norm_sum / count)
