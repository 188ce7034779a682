"""The defect map's rows (saev_hf/demo/defects.py): each defect is what its name says, built without any score."""

import numpy as np
import pytest

from saev_hf.demo.defects import (
    DEFECTS,
    PROMPT_DEFECTS,
    RESPONSE_DEFECTS,
    composition,
    composition_matched,
    defect_row,
    defect_rows,
    stratum,
)
from saev_hf.demo.scenes import ANSWERS, SCENE_PREFIX, SCENE_SIZE, DigitScans


@pytest.fixture(scope="module")
def scans():
    return DigitScans(held_out_fraction=0.3, seed=0)


def faithful(row):
    """The faithful answer to the row's question about the scene the row shows (None where no scene is shown)."""
    concepts = set(row["scene_concepts"])
    if row["kind"] == "count":
        return None
    named = row["prompt"].split()[-2]  # "... the 3 ?", "which digit is red ?", "is there a 3 ?"
    if named not in concepts:
        return "no" if row["kind"] == "exists" else "none"
    return "yes" if row["kind"] == "exists" else "present"


def test_every_kind_is_what_its_name_says(scans):
    rng = np.random.default_rng(3)
    for _ in range(60):
        for quality in DEFECTS:
            row = defect_row(quality, scans, "train", rng, absent_share=0.5)
            assert row["quality"] == quality and row["defect"] == ("prompt" if quality in PROMPT_DEFECTS else "response")
            assert row["chosen"] != row["rejected"] and row["chosen"] in ANSWERS[row["kind"]]
            pixels = np.asarray(row["images"][0])
            assert pixels.shape == (SCENE_SIZE, SCENE_SIZE, 3)
            if quality == "blank":
                assert pixels.max() == 0
            if quality == "noise":
                assert pixels.std() > 50  # uniform random pixels, not a scene on black
            if quality == "swap" and row["kind"] != "count":
                assert row["concept"] not in row["scene_concepts"] and row["present"]  # asked about the other scene
            if quality == "text_answerable":
                assert row["prompt"].startswith(SCENE_PREFIX) and faithful(row) in ("present", "yes", None)
            if quality == "borrowed_hallucination":
                assert faithful(row) in ("none", "no") and row["rejected"] in ("none", "no")
                assert row["chosen"] not in ("none", "no")
            if quality == "false_refusal":
                assert faithful(row) in ("present", "yes") and row["chosen"] in ("none", "no")
            if quality == "wrong_answer":
                assert row["present"] and row["chosen"] not in ("none", "no")
        clean = defect_row("clean", scans, "train", rng, absent_share=0.5)
        if clean["clean_kind"] == "absent":
            assert clean["chosen"] in ("none", "no") and faithful(clean) == clean["chosen"]
        elif clean["clean_kind"] == "present":
            assert faithful(clean) in ("present", "yes")


def test_defect_rows_compose_as_asked_and_absent_share_moves_only_clean_rows(scans):
    rows = defect_rows(scans, 200, "train", np.random.default_rng(0), RESPONSE_DEFECTS, defect_fraction=0.4,
                       absent_share=0.0)
    counts = composition(rows)
    assert sum(counts[kind] for kind in RESPONSE_DEFECTS) == 80 and {counts[k] for k in RESPONSE_DEFECTS} == {20}
    assert "clean_absent" not in counts and counts["clean_present"] + counts["clean_count"] == 120
    half = composition(defect_rows(scans, 400, "train", np.random.default_rng(1), [], absent_share=0.5))
    assert 0.4 < half["clean_absent"] / 400 < 0.6 and sum(half.values()) == 400
    with pytest.raises(ValueError, match=r"Unknown defect kinds \['typo'\]"):
        defect_rows(scans, 10, "train", np.random.default_rng(0), ["typo"])
    with pytest.raises(ValueError, match="absent_share=1.5 must be in"):
        defect_rows(scans, 10, "train", np.random.default_rng(0), [], absent_share=1.5)


def test_rows_are_reproducible_from_their_seed(scans):
    a = defect_rows(scans, 30, "train", np.random.default_rng(7), DEFECTS, defect_fraction=0.5)
    b = defect_rows(scans, 30, "train", np.random.default_rng(7), DEFECTS, defect_fraction=0.5)
    assert [(r["prompt"], r["chosen"], r["quality"]) for r in a] == [(r["prompt"], r["chosen"], r["quality"]) for r in b]
    assert all(np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0])) for x, y in zip(a, b))


def test_composition_matched_subset_copies_the_strata_not_the_rows(scans):
    rows = defect_rows(scans, 300, "train", np.random.default_rng(2), PROMPT_DEFECTS, defect_fraction=0.4)
    kept = [i for i, row in enumerate(rows) if row["quality"] in ("clean", "swap")][:90]
    matched = composition_matched(rows, kept, np.random.default_rng(5))
    assert sorted(map(stratum, (rows[i] for i in matched))) == sorted(map(stratum, (rows[i] for i in kept)))
    assert len(set(matched)) == 90 and set(matched) != set(kept)
    again = composition_matched(rows, kept, np.random.default_rng(6))
    assert set(again) != set(matched)  # random within each stratum


def test_brief_map_names_what_each_kind_gets_and_never_calls_a_miss_caught():
    from saev_hf.demo.defects import BASELINE_SCORES, BEYOND_PAPER_SCORES, PAPER_SCORES, brief_map

    kinds = ["swap", "noise", "text_answerable", "false_refusal"]
    table = {name: {kind: 0.5 for kind in kinds} for name in (*PAPER_SCORES, *BEYOND_PAPER_SCORES,
                                                                *BASELINE_SCORES, "oracle")}
    table["saev_cooccur_l0"]["swap"] = 0.9          # a paper score catches swaps
    table["saev_cooccur_jaccard"]["noise"] = 0.8    # only a score beyond the paper catches noise
    for name in (*PAPER_SCORES, *BEYOND_PAPER_SCORES):
        table[name]["text_answerable"] = 0.1        # every SAE-V score keeps it first
    table["answer_log_likelihood"]["false_refusal"] = 0.99
    brief = brief_map(table)
    assert brief["catches"] == ["swap"] and brief["catches_beyond_paper"] == ["noise"]
    assert brief["misses"] == ["text_answerable", "false_refusal"]
    assert brief["kinds"]["text_answerable"]["verdict"] == "inverted"
    assert brief["kinds"]["false_refusal"]["verdict"] == "misses"
    assert brief["sentence"] == (
        "SAE-V's filter (the paper's scores, AUROC >= 0.75) catches: swap (saev_cooccur_l0 0.90); the scores beyond "
        "the paper add: noise (saev_cooccur_jaccard 0.80). It cannot catch: text answerable, false refusal; of these, "
        "a baseline catches false refusal (answer_log_likelihood 0.99).")
