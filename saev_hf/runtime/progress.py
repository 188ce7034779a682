"""Progress bars: saev-hf's own (tqdm, as datasets and Trainer draw them) and those the libraries it calls draw.

One switch hides them all: [`disable_progress_bars`] (or the environment variable `SAEV_HF_DISABLE_PROGRESS_BARS=1`)
for saev-hf's, and [`progress_bars`] for a block, which also hides the bars `datasets`, `transformers` and
`huggingface_hub` draw (what `--disable_tqdm` turns on). In a terminal a bar redraws in place; when stderr is not a
terminal (a log file, a CI job) every redraw would add a line, so [`progress_bar`] then redraws at most every
`LOG_INTERVAL` seconds, and each long step has one bar (the activation buffer's refills during training add none).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterable

import datasets
import huggingface_hub.utils as hub_utils
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

LOG_INTERVAL = 30.0
"""Seconds between two redraws of a bar written to a log rather than a terminal."""

ENVIRONMENT_VARIABLE = "SAEV_HF_DISABLE_PROGRESS_BARS"
_disabled: bool | None = None  # None: as the environment variable says


def are_progress_bars_disabled() -> bool:
    """Whether saev-hf's progress bars are hidden ([`disable_progress_bars`], [`progress_bars`], or the environment
    variable `SAEV_HF_DISABLE_PROGRESS_BARS` set to 1/true/yes)."""
    if _disabled is not None:
        return _disabled
    return os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def disable_progress_bars() -> None:
    """Hide saev-hf's progress bars (as `datasets.disable_progress_bars()` hides datasets')."""
    global _disabled
    _disabled = True


def enable_progress_bars() -> None:
    """Show saev-hf's progress bars again."""
    global _disabled
    _disabled = False


@contextlib.contextmanager
def progress_bars(disable: bool):
    """Within the block, saev-hf's progress bars and those of `datasets`, `transformers` and `huggingface_hub` are
    hidden (`disable=True`) or saev-hf's shown (`disable=False`); the previous settings come back afterwards."""
    global _disabled
    previous, _disabled = _disabled, disable
    try:
        with library_progress_bars(disable):
            yield
    finally:
        _disabled = previous


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand), hidden when saev-hf's bars are disabled or `disable` (e.g.
    on the processes of a distributed run but the main one); redrawn at most every `LOG_INTERVAL` seconds when stderr
    is not a terminal. `kwargs` are tqdm's (`total`, `unit`, `initial`, `leave`, ...)."""
    if not _is_terminal():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, desc=desc, disable=disable or are_progress_bars_disabled(), **kwargs)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextlib.contextmanager
def library_progress_bars(disable: bool):
    """
    Within the block, the progress bars that `datasets` (map, save_to_disk), `transformers` (loading and saving
    weights) and `huggingface_hub` (uploads, downloads) draw themselves are hidden when `disable`; each library's
    previous setting comes back afterwards. [`progress_bars`] switches saev-hf's own with them.
    """
    if not disable:
        yield
        return
    switches = [  # (was it enabled, disable, enable)
        (not datasets.are_progress_bars_disabled(), datasets.disable_progress_bars, datasets.enable_progress_bars),
        (transformers_logging.is_progress_bar_enabled(), transformers_logging.disable_progress_bar,
         transformers_logging.enable_progress_bar),
        (not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars, hub_utils.enable_progress_bars),
    ]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for was_enabled, _, on in switches:
            if was_enabled:
                on()
