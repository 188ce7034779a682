"""Score histograms for the dataset card: in plain text (in the card) and as a PNG (uploaded next to the data)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .templates import finite, number


def text_histogram(scores: Sequence[float], kept: Sequence[float] | None = None, bins: int = 10,
                   width: int = 30) -> str:
    """
    A histogram of `scores` in plain text, one line per bin: its range, a bar, its rows and (with `kept`) how many
    of them were kept. Fits in a Markdown code block.
    """
    scores = finite(scores)
    if not len(scores):
        return "(no finite scores)"
    counts, edges = np.histogram(scores, bins=bins)
    kept_counts = np.histogram(finite(kept), bins=edges)[0] if kept is not None else None
    labels = [f"[{number(lo)}, {number(hi)}{']' if i == len(counts) - 1 else ')'}"
              for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    label_width = max(len(label) for label in labels)
    header = f"{'score':<{label_width}}  {'':<{width}}  {'rows':>6}" + ("  kept" if kept_counts is not None else "")
    lines = [header]
    for i, label in enumerate(labels):
        bar = "█" * int(round(width * counts[i] / counts.max()))
        line = f"{label:<{label_width}}  {bar:<{width}}  {counts[i]:>6}"
        if kept_counts is not None:
            line += f"  {kept_counts[i]:>4}"
        lines.append(line)
    return "\n".join(lines)


def score_histogram_png(scores: Sequence[float], kept: Sequence[float] | None = None, column: str = "score",
                        bins: int = 30) -> bytes:
    """A PNG histogram of `scores`, the `kept` ones highlighted and the lowest kept score marked (needs matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = finite(scores)
    figure = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(figure)  # a figure of its own, outside pyplot: no global state, any backend
    axes = figure.add_subplot()
    edges = np.histogram_bin_edges(scores, bins=bins) if len(scores) else bins
    axes.hist(scores, bins=edges, color="#b0b0b0", label=f"all ({len(scores)})")
    if kept is not None:
        kept = finite(kept)
        axes.hist(kept, bins=edges, color="#ff9d00", label=f"kept ({len(kept)})")
        if len(kept):
            axes.axvline(kept.min(), color="black", linestyle="--", linewidth=1, label="lowest kept")
    axes.set_xlabel(column)
    axes.set_ylabel("rows")
    axes.legend(frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
