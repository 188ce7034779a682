"""Keeping the best-scored part of a dataset (the paper keeps the top 10%...100% by an SAE-V score).

The result is the same `datasets.Dataset`, its rows in their original order and all columns kept (score columns
included), ready for TRL's `DPOTrainer` / `SFTTrainer`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import DataArguments
from ..runtime.folders import OutputArguments, mark_output_complete

logger = logging.getLogger(__name__)


@dataclass
class FilterArguments:
    """Which rows to keep: a top fraction by a score column, or everything above a threshold."""

    column: str = field(default="saev_cosine_score", metadata={"help": "Score column to rank by (higher is better)."})
    fraction: float | None = field(
        default=None, metadata={"help": "Keep this top fraction of rows, in (0, 1], e.g. 0.5 for the best half."}
    )
    threshold: float | None = field(default=None, metadata={"help": "Keep rows whose score is >= this value."})
    exclude_above: float | None = field(
        default=None,
        metadata={"help": "First leave out rows whose score is above this value, then rank the rest (Li et al.'s IFD "
                  "filter leaves out IFD > 1: --column ifd --exclude_above 1). Counted and logged."},
    )
    null_scores: str = field(
        default="raise",
        metadata={"help": "Rows whose score is null (unscorable with on_error='null'): 'raise' or 'drop'."},
    )

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.threshold is None):
            raise ValueError("Give exactly one of fraction (keep the top part) and threshold (keep scores >= it).")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1], e.g. 0.5 to keep the best half.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold={self.threshold} must be a finite number.")
        if self.exclude_above is not None and not math.isfinite(self.exclude_above):
            raise ValueError(f"exclude_above={self.exclude_above} must be a finite number.")
        if self.null_scores not in ("raise", "drop"):
            raise ValueError(f"null_scores={self.null_scores!r} must be 'raise' or 'drop'.")


FILTER_RECORD = "saev_filter.json"
"""File that `saev filter` writes beside the kept rows: the rule, so that `saev push --dataset` can state it."""


def kept_indices(scores: list[Any], args: FilterArguments) -> list[int]:
    """
    Indices of the rows to keep, in ascending order.

    With `fraction`, rows are ranked by score (highest first), ties broken by row index (earlier first), and the first
    `round(fraction * n)` (at least 1) of the n scored rows are kept: a global quantile, deterministic. A column whose
    values all tie is refused (ranking it would keep rows by index).
    """
    values = np.array([np.nan if s is None else float(s) for s in scores], dtype=np.float64)
    null = np.isnan(values)
    if null.any() and args.null_scores == "raise":
        raise ValueError(
            f"{int(null.sum())} rows have a null {args.column!r} (first: row {int(np.flatnonzero(null)[0])}): they "
            f"could not be scored. Drop them explicitly with null_scores='drop', or fix those rows and score again."
        )
    scored = np.flatnonzero(~null)
    if args.exclude_above is not None:
        above = values[scored] > args.exclude_above
        if above.any():
            logger.warning("%d of %d scored rows have %s above %g and are left out before ranking (exclude_above).",
                           int(above.sum()), len(scored), args.column, args.exclude_above)
        scored = scored[~above]
    if args.threshold is not None:
        return scored[values[scored] >= args.threshold].tolist()
    count = max(1, int(round(args.fraction * len(scored)))) if len(scored) else 0
    if 0 < count < len(scored) and np.all(values[scored] == values[scored[0]]):
        raise ValueError(
            f"All {len(scored)} scored rows have the same {args.column!r} ({values[scored[0]]:g}), so the top "
            f"fraction={args.fraction} cannot be chosen by score: it would be the first {count} rows by index. The "
            f"scores carry no information; for SAE-V scores all 0 usually means that no feature co-occurred (delta "
            f"too high for this SAE-V: set --cooccurrence_threshold, or calibrate it with saev weights "
            f"--threshold_quantile, and score again). Rank by another column, or keep every row (fraction=1)."
        )
    order = scored[np.lexsort((scored, -values[scored]))]  # by score descending, then by index ascending
    return sorted(order[:count].tolist())


def filter_by_score(dataset, args: FilterArguments | None = None, **kwargs: Any):
    """
    The rows of `dataset` that `args` keeps (see [`FilterArguments`]; keyword arguments build one), as a Dataset.

    Example: `filter_by_score(scored, column="saev_cooccur_l0", fraction=0.5)` keeps the best half.
    """
    if args is not None and kwargs:
        raise TypeError(
            f"filter_by_score got both args= and keyword arguments {sorted(kwargs)}; the keywords would be ignored. "
            f"Put them in the FilterArguments (e.g. dataclasses.replace(args, {next(iter(kwargs))}=...)) or pass only "
            f"keywords."
        )
    args = args or FilterArguments(**kwargs)
    if args.column not in dataset.column_names:
        raise KeyError(
            f"Column {args.column!r} not found; the dataset has columns {dataset.column_names}. Score it first "
            f"(ds.map(SAEVScorer(...), batched=True)) or pass column= naming a score column."
        )
    return dataset.select(kept_indices(dataset[args.column], args))


def run_filter(data_args: DataArguments, args: FilterArguments, output: OutputArguments):
    """
    `saev filter`: load the scored dataset `data_args` names, keep the rows `args` keeps, save them to
    `output.output_dir` with the rule beside them ([`FILTER_RECORD`], for `saev push --dataset`). Returns
    `(kept rows, rows before)`.
    """
    output.prepare("saev filter")
    dataset = data_args.load()
    kept = filter_by_score(dataset, args)
    kept.save_to_disk(output.output_dir)
    (Path(output.output_dir) / FILTER_RECORD).write_text(json.dumps(asdict(args), indent=2))
    mark_output_complete(output.output_dir)
    return kept, len(dataset)
