"""Keeping the best-scored rows: a deterministic global quantile or a threshold; nothing dropped silently."""

import datasets
import pytest

from saev_hf.alignment import FilterArguments, filter_by_score, kept_indices


def scored(scores):
    n = len(scores)
    return datasets.Dataset.from_dict({
        "prompt": [f"q{i}" for i in range(n)], "chosen": ["a"] * n, "rejected": ["b"] * n,
        "saev_cosine_score": scores,
    })


def test_top_fraction_is_a_global_quantile_with_ties_broken_by_row():
    ds = scored([0.1, 0.9, 0.5, 0.9, 0.3, 0.5, 0.7, 0.2])
    assert filter_by_score(ds, fraction=0.5)["prompt"] == ["q1", "q2", "q3", "q6"]  # 0.9, 0.9, 0.7, then first 0.5
    assert filter_by_score(ds, fraction=0.25)["saev_cosine_score"] == [0.9, 0.9]
    assert len(filter_by_score(ds, fraction=1.0)) == 8 and len(filter_by_score(ds, fraction=0.01)) == 1


def test_threshold_keeps_scores_at_or_above_it_in_order():
    ds = scored([0.1, 0.9, 0.5, 0.9, 0.3])
    assert filter_by_score(ds, threshold=0.5)["prompt"] == ["q1", "q2", "q3"]


def test_result_keeps_every_column_in_trl_preference_shape():
    ds = scored([0.3, 0.1, 0.2])
    kept = filter_by_score(ds, column="saev_cosine_score", fraction=0.67)
    assert kept.column_names == ds.column_names and kept["prompt"] == ["q0", "q2"]


def test_matches_a_plain_sort_on_random_scores():
    import random

    rng = random.Random(0)
    scores = [round(rng.random(), 2) for _ in range(200)]  # rounding makes many ties
    expected = sorted(sorted(range(200), key=lambda i: (-scores[i], i))[:60])
    assert kept_indices(scores, FilterArguments(fraction=0.3)) == expected


def test_null_scores_are_refused_or_dropped_explicitly():
    ds = scored([0.4, None, 0.9])
    with pytest.raises(ValueError, match=r"1 rows have a null 'saev_cosine_score' \(first: row 1\)"):
        filter_by_score(ds, fraction=0.5)
    assert filter_by_score(ds, fraction=0.5, null_scores="drop")["prompt"] == ["q2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "Give exactly one of fraction"),
        ({"fraction": 0.5, "threshold": 1.0}, "Give exactly one of fraction"),
        ({"fraction": 0.0}, r"fraction=0.0 must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1.5 must be in \(0, 1\]"),
        ({"threshold": float("nan")}, "threshold=nan must be a finite number"),
        ({"fraction": 0.5, "null_scores": "keep"}, "null_scores='keep' must be 'raise' or 'drop'"),
    ],
)
def test_invalid_filter_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FilterArguments(**kwargs)


def test_missing_score_column_says_to_score_first():
    with pytest.raises(KeyError, match=r"Column 'saev_l0' not found.*Score it first"):
        filter_by_score(scored([0.1]), column="saev_l0", fraction=0.5)


def test_exclude_above_leaves_rows_out_before_ranking_and_logs_how_many(caplog):
    import logging

    ds = datasets.Dataset.from_dict({"ifd": [0.2, 1.5, 0.9, 0.7, 3.0, 0.4]})
    with caplog.at_level(logging.WARNING, logger="saev_hf.alignment.filtering"):
        kept = filter_by_score(ds, FilterArguments(column="ifd", fraction=0.5, exclude_above=1.0))
    assert kept["ifd"] == [0.9, 0.7]  # the best half of the four rows at or below 1, in their order
    assert "2 of 6 scored rows have ifd above 1 and are left out before ranking" in caplog.text
    with pytest.raises(ValueError, match="exclude_above=inf must be a finite number"):
        FilterArguments(column="ifd", fraction=0.5, exclude_above=float("inf"))
