"""The layouts of the datasets SAE-V is used with, read into the one layout every stage reads: TRL's.

| layout | the source's columns (as its card and its authors' loader read them) | what every stage then reads |
|---|---|---|
| `trl` | `images`, `prompt`, `chosen`, `rejected` (TRL's preference layout), or the columns [`PromptFormat`] names | as given |
| `rlaif_v` | `image` (one image), `question`, `chosen`, `rejected`, and provenance (`ds_name`, `origin_dataset`, `origin_split`, `idx`, `image_path`) | `images` = [image], `prompt` = question, `chosen`, `rejected`; provenance kept |
| `align_anything` | `image`, `question`, `response_1`, `response_2`, `overall_response` (1 or 2: the preferred response), and per-aspect ratings and rationales | `images` = [image], `prompt` = question, `chosen` = the preferred response, `rejected` = the other; every other column kept |
| `obelics` | `images` and `texts`: parallel lists in document order, each position an image URL (or image) or a text, the other None | `images` = the document's images in order, `prompt` = the document as a list of parts (`{"type": "text", "text": ...}`, `{"type": "image"}`), read as it stands (no chat template) |

Align-Anything's preference is read as the authors' loader reads it (`align_anything/configs/format_dataset.py`,
`AA_TI2T`: `int(overall_response)`, a value other than 1 or 2 has no preference). A row without a preference (missing,
a tie, anything but 1 or 2) gets the policy the user chose ([`MISSING_PREFERENCE_POLICIES`]): `drop` leaves it out and
counts it (the count is logged as a warning), `error` stops with an error naming the row. Nothing is dropped silently.

Conversion is a `datasets.map` (cached like any other, and lazy on a stream): the image is carried over as it is, so
the scorer, the DPO conversion and the report read the very same image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import datasets

from .errors import RowError

logger = logging.getLogger(__name__)

LAYOUTS = ("trl", "rlaif_v", "align_anything", "obelics")
"""The dataset layouts saev-hf reads (`--dataset_layout`)."""
MISSING_PREFERENCE_POLICIES = ("error", "drop")
"""What happens to a row whose preference is missing or a tie (`--missing_preference`)."""
PREFERENCE_COLUMNS = ("images", "prompt", "chosen", "rejected")
"""TRL's preference layout, what every stage reads after conversion."""


@dataclass(frozen=True)
class Layout:
    """A dataset layout: the columns a source must have, and how one of its rows becomes TRL's layout."""

    name: str
    required: tuple[str, ...]
    consumed: tuple[str, ...]  # the source columns the conversion replaces (the others are kept)
    convert: Callable[[dict[str, Any], int, str], dict[str, Any] | None]  # row, its index, policy -> row or None
    preference: bool  # whether it holds a preference (chosen and rejected)


def _rlaif_v(row: dict[str, Any], index: int, policy: str) -> dict[str, Any] | None:
    return {"images": [row["image"]], "prompt": row["question"], "chosen": row["chosen"],
            "rejected": row["rejected"]}


def _align_anything(row: dict[str, Any], index: int, policy: str) -> dict[str, Any] | None:
    value = row.get("overall_response")
    try:
        better = int(value)
    except (TypeError, ValueError):
        better = None
    if better not in (1, 2):
        if policy == "error":
            raise RowError(
                f"Row {index}: overall_response={value!r} states no preference between response_1 and response_2 (it "
                f"must be 1 or 2, as the authors' loader reads it). Pass --missing_preference drop to leave such rows "
                f"out (they are counted), or fix the row."
            )
        return None
    worse = 2 if better == 1 else 1
    return {"images": [row["image"]], "prompt": row["question"], "chosen": row[f"response_{better}"],
            "rejected": row[f"response_{worse}"]}


def _obelics(row: dict[str, Any], index: int, policy: str) -> dict[str, Any] | None:
    images, texts = row["images"] or [], row["texts"] or []
    if len(images) != len(texts):
        raise RowError(f"Row {index}: `images` has {len(images)} entries and `texts` {len(texts)}; OBELICS documents "
                       f"hold parallel lists (each position an image or a text, the other None).")
    parts, document_images = [], []
    for position, (image, text) in enumerate(zip(images, texts)):
        if (image is None) == (text is None):
            raise RowError(f"Row {index}: position {position} of the document holds "
                           f"{'both an image and a text' if image is not None else 'neither an image nor a text'}; "
                           f"each position holds exactly one of them.")
        if image is not None:
            parts.append({"type": "image", "text": None})
            document_images.append(image)
        else:
            parts.append({"type": "text", "text": text})
    return {"images": document_images, "prompt": parts}


LAYOUT_CLASSES = {
    "rlaif_v": Layout("rlaif_v", ("image", "question", "chosen", "rejected"), ("image", "question"), _rlaif_v, True),
    "align_anything": Layout("align_anything", ("image", "question", "response_1", "response_2", "overall_response"),
                             ("image", "question"), _align_anything, True),
    "obelics": Layout("obelics", ("images", "texts"), ("images", "texts"), _obelics, False),
}


def check_layout(name: str) -> None:
    """Refuse a layout saev-hf does not read, naming those it does."""
    if name not in LAYOUTS:
        raise ValueError(f"dataset_layout={name!r} is not a layout saev-hf reads; use one of {LAYOUTS}.")


def to_trl_layout(dataset: Any, layout: str, missing_preference: str = "error") -> Any:
    """
    `dataset` (a `datasets.Dataset` or `IterableDataset` in `layout`) in TRL's layout: `images`, `prompt` and, for
    preference data, `chosen` and `rejected` (see the module docstring); the source's other columns are kept.

    Rows without a preference are dropped and counted (`missing_preference="drop"`: the count is logged as a warning,
    for a `Dataset`; a stream's rows are dropped as they are read) or stop the conversion with a [`RowError`] naming
    the row (`"error"`). A `trl` dataset is returned as it is.
    """
    check_layout(layout)
    if missing_preference not in MISSING_PREFERENCE_POLICIES:
        raise ValueError(f"missing_preference={missing_preference!r} must be one of {MISSING_PREFERENCE_POLICIES}.")
    if layout == "trl":
        return dataset
    spec = LAYOUT_CLASSES[layout]
    columns = _column_names(dataset)
    if columns is not None:
        missing = [name for name in spec.required if name not in columns]
        if missing:
            raise KeyError(f"The dataset lacks the columns {missing} of the {layout!r} layout (it has {columns}). "
                           f"Check --dataset_layout, or name the columns with --dataset_layout trl and the "
                           f"--image_column / --prompt_column options.")
        clashing = [name for name in PREFERENCE_COLUMNS if name in columns and name not in spec.consumed
                    and name not in ("chosen", "rejected")]
        if clashing:
            raise ValueError(f"The dataset already has the columns {clashing} that the {layout!r} layout writes; "
                             f"rename them first (dataset.rename_column).")

    def convert(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list[Any]] = {name: [] for name in (PREFERENCE_COLUMNS if spec.preference else ("images", "prompt"))}
        keep = []
        for row, index in zip(rows, indices):
            converted = spec.convert(row, index, missing_preference)
            keep.append(converted is not None)
            for name, value in (converted or {}).items():
                out.setdefault(name, []).append(value)
        kept_rows = [row for row, kept in zip(rows, keep) if kept]
        for name in batch:
            if name not in spec.consumed and name not in out:
                out[name] = [row[name] for row in kept_rows]
        return out

    kwargs = {"desc": f"Reading the {layout} layout"} if hasattr(dataset, "__len__") else {}
    converted = dataset.map(convert, batched=True, with_indices=True, remove_columns=list(spec.consumed),
                            features=_features(dataset, spec), **kwargs)
    if spec.preference and missing_preference == "drop" and hasattr(dataset, "__len__"):
        dropped = len(dataset) - len(converted)
        if dropped:
            logger.warning("%d of %d rows of the %s layout have no preference (overall_response not 1 or 2) and were "
                           "left out (--missing_preference drop).", dropped, len(dataset), layout)
    return converted


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def _features(dataset: Any, spec: Layout) -> datasets.Features | None:
    """The converted dataset's features: the source's image feature carried over as it is (a decoded or undecoded
    `datasets.Image`, or a URL string), the texts as strings, the other columns unchanged."""
    features = getattr(dataset, "features", None)
    if features is None:
        return None
    kept = {name: feature for name, feature in features.items() if name not in spec.consumed}
    if spec.name == "obelics":
        image = features["images"].feature if hasattr(features["images"], "feature") else datasets.Value("string")
        part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
        return datasets.Features({**{k: v for k, v in kept.items()}, "images": datasets.List(image),
                                  "prompt": datasets.List(part)})
    converted = {"images": datasets.List(features["image"]), "prompt": datasets.Value("string"),
                 "chosen": datasets.Value("string"), "rejected": datasets.Value("string")}
    return datasets.Features({**{k: v for k, v in kept.items() if k not in converted}, **converted})
