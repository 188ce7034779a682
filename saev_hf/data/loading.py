"""Loading one split of a dataset: a folder written by `save_to_disk`, or anything `datasets.load_dataset` reads.
[`saev_hf.arguments.DataArguments`] names what to load; this is its loader."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..runtime.folders import check_local_path, check_output_complete


def load_dataset_split(name_or_path: str, config: str | None = None, split: str = "train", streaming: bool = False):
    """
    One split of a dataset: a folder written by `save_to_disk` (a `Dataset` or a `DatasetDict`), or anything
    `datasets.load_dataset` reads (a Hub name, a folder of data files, ...).

    A folder holding one `Dataset` has no splits to choose from: it is read whole with the default `split="train"`
    (or the split it was saved from); any other split is refused rather than ignored.
    """

    check_local_path(name_or_path, "dataset")
    path = Path(name_or_path)
    if path.is_dir():
        check_output_complete(path, "dataset")
    if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"Split {split!r} not found in {name_or_path}; it has splits {sorted(data)}.")
            data = data[split]
        elif split not in ("train", str(data.split) if data.split is not None else "train"):
            saved = f"the {str(data.split)!r} split" if data.split is not None else "no split name"
            raise ValueError(
                f"{name_or_path} holds a single Dataset ({saved}, {len(data)} rows), not a DatasetDict, so split "
                f"{split!r} cannot be chosen from it. Drop the split option to use its rows, or save the splits as a "
                f"DatasetDict (DatasetDict({{{split!r}: ...}}).save_to_disk(...))."
            )
        return data.to_iterable_dataset() if streaming else data
    return datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)
