"""Sparse probing (SAEBench's): how well a few SAE-V features, pooled over each example, tell the classes of a label
apart, beside the same probe on the whole residual stream.

`evaluate_saev(..., probe_label_column="digit")` (`saev eval --probe_label_column digit`) keeps, for every evaluated
example, the mean over its positions of the SAE-V's feature activations z and of the residual stream x, separately
over all, text and image positions (the splits of the other metrics: special tokens count as text, padding never
counts): [`PooledActivations`]. [`sparse_probing`] then, per split:

1. holds out a seeded `test_fraction` of each class's examples (stratified: at least one example of every class on
   each side);
2. builds one binary task per class, as SAEBench does: the class against the rest, with as many negatives as
   positives drawn evenly from the other classes, on the training and on the test side alike, so chance is 0.5 (a
   label with two classes gives one task: the second class against the first);
3. for each k, keeps the k features with the largest absolute difference between the positives' and the negatives'
   mean on the task's training examples ([`top_k_features`]), fits a logistic regression on them and measures its
   accuracy on the task's test examples;
4. fits the same logistic regression on the mean-pooled residual stream itself (all d_in values: SAEBench's dense
   "LLM" baseline).

Accuracies are averaged over the tasks. The logistic regression is scikit-learn's (L2, C = 1, up to 1000 iterations,
as SAEBench's k-sparse probes), on features standardised with the training examples' mean and spread: SAE-V features
differ in scale by orders of magnitude, and a residual stream has outlier dimensions, so that without it the fixed
L2 penalty would weigh the probes by their features' units. An example without a position of a split (a text-only
row has no image position) is left out of that split's probes; a task left without a positive or a negative example
on either side has no accuracy there.

scikit-learn is an optional dependency: `pip install "saev-hf[probing]"`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.errors import RowError

DEFAULT_PROBE_K = (1, 2, 5, 10, 20, 50)
"""The numbers of features a sparse probe keeps, by default (each capped at d_sae)."""

PROBE_METRIC = ("accuracy on balanced test sets of each class against the rest (one task for two classes), mean "
                "over the tasks (chance 0.5)")
"""What the accuracies of [`sparse_probing`] are."""


def require_scikit_learn() -> None:
    """
    Refuse sparse probing at once when scikit-learn, which fits its logistic regressions, is missing.

    Raises:
        ImportError: naming the install.
    """
    if importlib.util.find_spec("sklearn") is None:
        raise ImportError('Sparse probing fits scikit-learn\'s logistic regression, which is not installed: pip '
                          'install "saev-hf[probing]" (or leave the probe label column out).')


def check_probe_options(probe_k: Sequence[int], test_fraction: float) -> None:
    """
    Refuse probe sizes and a held-out fraction that cannot make a probe.

    Raises:
        ValueError: naming the option and what it must be.
    """
    if isinstance(probe_k, (int, str)) or not len(probe_k) or any(
            isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in probe_k):
        raise ValueError(f"probe_k={probe_k!r} must be a non-empty list of positive numbers of features, e.g. "
                         f"{list(DEFAULT_PROBE_K)}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"probe_test_fraction={test_fraction!r} must be a fraction in (0, 1): the share of each "
                         f"class's examples held out to test the probes on, e.g. 0.2.")


def check_label_column(dataset: Any, column: str) -> None:
    """Refuse, before anything is read, a dataset whose columns are known and lack `column`."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, (list, tuple)) and column not in names:
        raise _missing_column(column, names)


def _missing_column(column: str, names: Sequence[str]) -> ValueError:
    return ValueError(f"Sparse probing reads each row's class from the column {column!r}, which the dataset does not "
                      f"have (its columns: {list(names)}). Pass --probe_label_column (probe_label_column=) naming a "
                      f"column of class labels, or add one (dataset.add_column). An activation cache holds no labels: "
                      f"from Python, pass dataset= the rows it was made from.")


def batch_labels(rows: Any, column: str, indices: Sequence[int]) -> list[Any]:
    """
    The class labels of a batch of rows (a `datasets` batch, a dict of columns, or a list of row dicts; `indices`
    their dataset rows, for errors).

    Raises:
        ValueError: when the batch has no column `column`.
        RowError: naming the row, when a label is null or not a class (a string, an integer or a boolean).
    """
    if isinstance(rows, Mapping):
        if column not in rows:
            raise _missing_column(column, list(rows))
        values = list(rows[column])
    else:
        values = []
        for row, index in zip(rows, indices):
            if column not in row:
                raise RowError(f"Row {index} has no column {column!r}, which sparse probing reads its class from "
                               f"(the row's keys: {sorted(row)}). Give every row a label, or pass "
                               f"--probe_label_column naming another column.")
            values.append(row[column])
    for value, index in zip(values, indices):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise RowError(f"Row {index}: its label {column!r} is null; sparse probing needs a class for every row. "
                           f"Leave such rows out first (dataset.filter(lambda row: row[{column!r}] is not None)), or "
                           f"fill them in.")
        if not isinstance(value, (str, int, np.integer, bool, np.bool_)):
            raise RowError(f"Row {index}: its label {column!r} is {value!r} ({type(value).__name__}), not a class: "
                           f"sparse probing needs a string, an integer or a boolean per row. Map the column to "
                           f"classes first (e.g. bins of a number).")
    return [value.item() if isinstance(value, (np.integer, np.bool_)) else value for value in values]


class PooledActivations:
    """
    Per evaluated example, the mean over each split's positions (`"all"`, `"text"`, `"image"`) of the SAE-V's
    feature activations and of the residual stream, with the example's class label and dataset row: what
    [`sparse_probing`] fits on. Kept on the CPU in float32 (examples x (d_sae + d_in) values per split).

    Args:
        label_column (`str`): the dataset column the labels come from (for errors and the report).
    """

    def __init__(self, label_column: str) -> None:
        self.label_column = label_column
        self.labels: list[Any] = []
        self.rows: list[int] = []
        self._features: dict[str, list[torch.Tensor]] = {}
        self._residual: dict[str, list[torch.Tensor]] = {}
        self._counts: dict[str, list[torch.Tensor]] = {}

    def add(self, labels: Sequence[Any], rows: Sequence[int], hidden: torch.Tensor, feature_acts: torch.Tensor,
            masks: Mapping[str, torch.Tensor]) -> None:
        """
        Add a batch: its `labels` and dataset `rows`, its residual stream `hidden` `(batch, tokens, d_in)`, feature
        activations `feature_acts` `(batch, tokens, d_sae)` and, per split, the `(batch, tokens)` bool mask of the
        positions that count.
        """
        if len(labels) != hidden.shape[0] or len(rows) != hidden.shape[0]:
            raise ValueError(f"{len(labels)} labels and {len(rows)} rows for a batch of {hidden.shape[0]} examples.")
        self.labels.extend(labels)
        self.rows.extend(int(row) for row in rows)
        for split, mask in masks.items():
            # only the split's positions are read (whatever sits at the others, padding included); none: zeros
            features = torch.stack([feature_acts[i][mask[i]].float().mean(0) if mask[i].any() else
                                    feature_acts.new_zeros(feature_acts.shape[-1], dtype=torch.float32)
                                    for i in range(len(mask))])
            residual = torch.stack([hidden[i][mask[i]].float().mean(0) if mask[i].any() else
                                    hidden.new_zeros(hidden.shape[-1], dtype=torch.float32) for i in range(len(mask))])
            self._features.setdefault(split, []).append(features.cpu())
            self._residual.setdefault(split, []).append(residual.cpu())
            self._counts.setdefault(split, []).append(mask.sum(1).cpu())

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def d_sae(self) -> int:
        """Number of SAE-V features pooled."""
        return next(iter(self._features.values()))[0].shape[1]

    @property
    def splits(self) -> list[str]:
        """The splits pooled over, in the order first added."""
        return list(self._features)

    def features(self, split: str) -> torch.Tensor:
        """`(examples, d_sae)`: each example's mean feature activations over the positions of `split`."""
        return torch.cat(self._features[split])

    def residual(self, split: str) -> torch.Tensor:
        """`(examples, d_in)`: each example's mean residual stream over the positions of `split`."""
        return torch.cat(self._residual[split])

    def has_positions(self, split: str) -> torch.Tensor:
        """`(examples,)` bool: the examples with at least one position of `split` (the others are not probed)."""
        return torch.cat(self._counts[split]) > 0


def top_k_features(features: np.ndarray, positive: np.ndarray, k: int) -> np.ndarray:
    """
    SAEBench's selection: the `k` features with the largest absolute difference between their mean over the positive
    examples and their mean over the negative ones, largest first (ties: the lower index first).

    Args:
        features (`np.ndarray` of shape `(examples, d_sae)`): pooled feature activations of the training examples.
        positive (`np.ndarray` of shape `(examples,)`, bool): which examples are positive.
        k (`int`): features to keep.
    """
    difference = np.abs(features[positive].mean(0) - features[~positive].mean(0))
    return np.argsort(-difference, kind="stable")[:k]


def _classes(labels: Sequence[Any]) -> list[Any]:
    """The distinct labels, sorted (by their text when they do not compare)."""
    distinct = set(labels)
    try:
        return sorted(distinct)
    except TypeError:
        return sorted(distinct, key=str)


def stratified_split(labels: Sequence[Any], rows: Sequence[int], test_fraction: float, seed: int, column: str
                     ) -> np.ndarray:
    """
    `(examples,)` bool: which examples are held out for testing: a seeded `test_fraction` of each class (rounded, at
    least one, and at least one left to train on).

    Raises:
        ValueError: when the labels hold one class only, or a class has fewer than 2 examples.
    """
    classes = _classes(labels)
    if len(classes) < 2:
        raise ValueError(f"The label column {column!r} holds a single class ({classes[0]!r} in all {len(labels)} "
                         f"evaluated rows): a probe needs at least two. Evaluate more rows (--num_examples), or "
                         f"probe a column with several classes.")
    labels = np.array([classes.index(label) for label in labels])
    held_out = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        members = np.flatnonzero(labels == index)
        if len(members) < 2:
            raise ValueError(f"Class {name!r} of the label column {column!r} has {len(members)} evaluated row (row "
                             f"{rows[members[0]]}): holding out probe_test_fraction={test_fraction} of each class "
                             f"needs at least 2 rows per class, one to train on and one to test on. Evaluate more rows "
                             f"(--num_examples), or leave the rare classes out first (dataset.filter).")
        count = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        held_out[rng.permutation(members)[:count]] = True
    return held_out


def balanced_task(label_ids: np.ndarray, candidates: np.ndarray, positive: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """
    SAEBench's one-vs-rest task over the examples `candidates`: the positives (examples of class `positive`) and as
    many negatives, drawn evenly from the other classes (one of each in turn, classes in a random order), both cut to
    the smaller of the two counts. Returns the example indices and whether each is positive.
    """
    positives = rng.permutation(candidates[label_ids[candidates] == positive])
    others = [rng.permutation(candidates[label_ids[candidates] == c]) for c in rng.permutation(np.unique(
        label_ids[candidates])) if c != positive]
    longest = max((len(members) for members in others), default=0)
    negatives = np.array([members[i] for i in range(longest) for members in others if i < len(members)], dtype=int)
    count = min(len(positives), len(negatives))
    chosen = np.concatenate([positives[:count], negatives[:count]])
    return chosen, np.arange(2 * count) < count


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression (L2, C = 1, up to 1000 iterations) fitted on standardised `train_x`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(train_x), train_y)
    return float((probe.predict(scaler.transform(test_x)) == test_y).mean())


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def sparse_probing(pooled: PooledActivations, probe_k: Sequence[int] = DEFAULT_PROBE_K, test_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, Any]:
    """
    Sparse probes on the SAE-V's pooled features and dense probes on the pooled residual stream, per split (see the
    module docstring).

    Args:
        pooled ([`PooledActivations`]): the evaluated examples.
        probe_k (`Sequence[int]`): numbers of features a probe keeps (each capped at d_sae).
        test_fraction (`float`): share of each class's examples held out for testing.
        seed (`int`): seed of the held-out examples and of the negatives drawn for each task.

    Returns:
        `dict` with `label_column`, `classes` (as text), `tasks` (the positive class of each binary task), `k`,
        `test_fraction`, `seed`, `metric`, `train_examples`, `test_examples`, and per split (`"all"`, `"text"`,
        `"image"`) None where no example has a position of it, else a dict with `examples` (those that have one),
        `sae` (`{str(k): mean accuracy}`), `dense` (mean accuracy of the residual-stream probe), `d_in`, and `per_task`
        (`{class: {"train", "test", "sae", "dense", "features"}}`, where `features` are the task's top features,
        best first, for the largest k).

    Raises:
        ImportError: without scikit-learn.
        ValueError: with one class, or a class of fewer than 2 examples.
    """
    require_scikit_learn()
    check_probe_options(probe_k, test_fraction)
    column = pooled.label_column
    if not len(pooled):
        raise ValueError("Sparse probing got no example to probe.")
    held_out = stratified_split(pooled.labels, pooled.rows, test_fraction, seed, column)
    classes = _classes(pooled.labels)
    label_ids = np.array([classes.index(label) for label in pooled.labels])
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    k_values = sorted({min(k, pooled.d_sae) for k in probe_k})
    result: dict[str, Any] = {
        "label_column": column, "classes": [str(name) for name in classes],
        "tasks": [str(classes[p]) for p in positives], "k": k_values, "test_fraction": test_fraction, "seed": seed,
        "metric": PROBE_METRIC, "train_examples": int((~held_out).sum()), "test_examples": int(held_out.sum()),
    }
    for split in pooled.splits:
        available = pooled.has_positions(split).numpy()
        if not available.any():
            result[split] = None
            continue
        features = pooled.features(split).double().numpy()
        residual = pooled.residual(split).double().numpy()
        per_task = {}
        for task, positive in enumerate(positives):
            sides = {}
            for side, part in (("train", 0), ("test", 1)):
                # the same draws in every split whose examples all have positions: comparable splits
                rng = np.random.default_rng([seed, task, part])
                candidates = np.flatnonzero(held_out == bool(part))
                chosen, is_positive = balanced_task(label_ids, candidates, positive, rng)
                keep = available[chosen]
                sides[side] = (chosen[keep], is_positive[keep])
            (train, train_y), (test, test_y) = sides["train"], sides["test"]
            record: dict[str, Any] = {"train": len(train), "test": len(test),
                                      "sae": {str(k): None for k in k_values}, "dense": None, "features": []}
            if all(y.any() and (~y).any() for y in (train_y, test_y)):
                order = top_k_features(features[train], train_y, max(k_values))
                record["features"] = [int(f) for f in order]
                for k in k_values:
                    record["sae"][str(k)] = fit_probe(features[train][:, order[:k]], train_y,
                                                      features[test][:, order[:k]], test_y)
                record["dense"] = fit_probe(residual[train], train_y, residual[test], test_y)
            per_task[str(classes[positive])] = record
        result[split] = {
            "examples": int(available.sum()), "d_in": int(residual.shape[1]),
            "sae": {str(k): _mean([r["sae"][str(k)] for r in per_task.values()]) for k in k_values},
            "dense": _mean([r["dense"] for r in per_task.values()]), "per_task": per_task,
        }
    return result
