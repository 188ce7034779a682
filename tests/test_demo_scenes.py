"""The grounded scene task (saev_hf/demo/scenes.py): images, questions and faithful answers that need the image."""

import numpy as np
import pytest

from saev_hf.demo.scenes import (
    ANSWERS,
    CELL,
    COLOURS,
    CONCEPTS,
    DIGITS,
    EMPTY,
    POSITIONS,
    QUESTION_KINDS,
    SCENE_SIZE,
    VOCABULARY,
    DigitScans,
    Scene,
    SceneObject,
    ask,
    question_rows,
    random_scene,
)


@pytest.fixture(scope="module")
def scans():
    return DigitScans(held_out_fraction=0.3, seed=0)


def test_held_out_scans_are_never_drawn_for_training_scenes(scans):
    train, held_out = set(scans.splits["train"]), set(scans.splits["held_out"])
    assert not train & held_out and len(train) + len(held_out) == 1797
    assert abs(len(held_out) / 1797 - 0.3) < 0.01
    rng = np.random.default_rng(1)
    drawn = {o.scan for _ in range(300) for o in random_scene(rng, scans, "train").objects}
    assert drawn <= train
    drawn = {o.scan for _ in range(300) for o in random_scene(rng, scans, "held_out").objects}
    assert drawn <= held_out
    assert all(scans.labels[i] == d for d in range(10) for i in scans.scans_of(d, "held_out"))


def test_scenes_hold_one_to_three_objects_with_distinct_digits_colours_and_cells(scans):
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        scene = random_scene(rng, scans, "train")
        sizes.add(len(scene.objects))
        for attribute in ("digit", "colour", "cell"):
            values = [getattr(o, attribute) for o in scene.objects]
            assert len(set(values)) == len(values)
        assert all(scans.labels[o.scan] == o.digit for o in scene.objects)
    assert sizes == {1, 2, 3}
    avoided = [random_scene(rng, scans, "train", avoid={"3", "red"}) for _ in range(100)]
    assert not any({"3", "red"} & s.concepts for s in avoided)


def test_the_image_draws_each_scan_in_its_colour_in_its_cell_on_black(scans):
    scene = Scene((SceneObject(digit=int(scans.labels[5]), colour="blue", cell=4, scan=5),
                   SceneObject(digit=int(scans.labels[9]), colour="red", cell=0, scan=9)))
    pixels = np.asarray(scene.image(scans)).astype(float)
    assert pixels.shape == (SCENE_SIZE, SCENE_SIZE, 3)
    centre = pixels[CELL:2 * CELL, CELL:2 * CELL]
    expected = scans.images[5][..., None] / 16.0 * np.array(COLOURS["blue"])
    assert np.abs(centre - np.round(expected)).max() == 0
    top_left = pixels[:CELL, :CELL]
    assert np.abs(top_left - np.round(scans.images[9][..., None] / 16.0 * np.array(COLOURS["red"]))).max() == 0
    others = np.ones((SCENE_SIZE, SCENE_SIZE), dtype=bool)
    others[CELL:2 * CELL, CELL:2 * CELL] = others[:CELL, :CELL] = False
    assert pixels[others].max() == 0
    assert scene.cell_words()[4] == ("blue", str(scans.labels[5])) and scene.cell_words()[1] == (EMPTY,)
    assert scene.describe() == f"red {scans.labels[9]} top left , blue {scans.labels[5]} centre ."


def test_questions_have_the_faithful_answer_and_absent_ones_name_a_missing_object(scans):
    rng = np.random.default_rng(3)
    for _ in range(100):
        scene = random_scene(rng, scans, "train")
        by_digit = {str(o.digit): o for o in scene.objects}
        by_colour = {o.colour: o for o in scene.objects}
        for kind in QUESTION_KINDS:
            q = ask(scene, kind, rng)
            assert q.present and q.answer in ANSWERS[kind] and q.hallucinations == ()
            if kind == "which":
                assert q.answer == str(by_colour[q.concept].digit)
            elif kind == "colour":
                assert q.answer == by_digit[q.concept].colour
            elif kind == "where":
                assert q.answer == POSITIONS[by_digit[q.concept].cell]
            elif kind == "exists":
                assert q.answer == "yes" and q.concept in by_digit
            else:
                assert q.answer == ("zero", "one", "two", "three")[len(scene.objects)] and q.concept is None
            if kind == "count":
                with pytest.raises(ValueError, match="count question"):
                    ask(scene, kind, rng, absent=True)
                continue
            absent = ask(scene, kind, rng, absent=True)
            assert not absent.present and absent.concept not in scene.concepts
            assert absent.answer == ("no" if kind == "exists" else "none")
            assert absent.hallucinations and "none" not in absent.hallucinations
            assert absent.concept in absent.text.split()
    with pytest.raises(ValueError, match="kind="):
        ask(scene, "size", rng)


def test_question_rows_show_the_scene_or_describe_it_in_words(scans):
    rows = question_rows(scans, 40, "held_out", np.random.default_rng(0), absent_fraction=0.5)
    assert all(len(r["images"]) == 1 and r["images"][0].size == (SCENE_SIZE, SCENE_SIZE) for r in rows)
    assert 5 < sum(not r["present"] for r in rows) < 35
    text_rows = question_rows(scans, 10, "train", np.random.default_rng(0), as_text=True)
    for row in text_rows:
        assert "images" not in row and row["prompt"].startswith("scene : " + row["scene"].describe())
    every_word = {w for r in rows + text_rows for w in (r["prompt"] + " " + r["response"]).split()}
    assert every_word <= set(VOCABULARY)
    assert set(CONCEPTS) == set(DIGITS) | set(COLOURS)


def test_preference_rows_mix_a_known_share_of_hallucinated_and_swapped_rows(scans):
    from saev_hf.demo.scenes import preference_rows

    rows = preference_rows(scans, 200, "train", np.random.default_rng(0), low_quality_fraction=0.4)
    assert sum(r["low_quality"] for r in rows) == 80
    assert sum(r["quality"] == "hallucination" for r in rows) == sum(r["quality"] == "swap" for r in rows) == 40
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert {row["chosen"], row["rejected"]} <= set(ANSWERS[row["kind"]])
        if row["quality"] == "hallucination":  # confident answer about an absent object preferred to the faithful one
            assert not row["present"] and row["rejected"] in ("none", "no") and row["chosen"] not in ("none", "no")
        elif row["quality"] == "swap":  # the question names an object the image shown lacks
            assert row["present"] and (row["concept"] is None or row["concept"] not in row["scene_concepts"])
        else:
            assert row["concept"] is None or (row["concept"] in row["scene_concepts"]) == row["present"]
        if row["quality"] == "clean" and not row["present"]:
            assert row["chosen"] in ("none", "no") and row["rejected"] not in ("none", "no")
    assert 10 < sum(r["quality"] == "clean" and not r["present"] for r in rows) < 50
    with pytest.raises(ValueError, match="low_quality_fraction"):
        preference_rows(scans, 10, "train", np.random.default_rng(0), low_quality_fraction=1.5)


def test_clean_rows_reject_none_only_for_absent_objects(scans):
    from saev_hf.demo.scenes import preference_rows

    rows = preference_rows(scans, 300, "train", np.random.default_rng(1), low_quality_fraction=0.4)
    for row in rows:
        if row["quality"] == "clean" and row["present"] and row["kind"] != "exists":
            assert row["rejected"] not in ("none", "no")


def test_refusal_rejected_rows_reject_none_for_present_objects_and_leave_the_rest_as_they_are(scans):
    from saev_hf.demo.scenes import preference_rows

    rows = preference_rows(scans, 300, "train", np.random.default_rng(1), low_quality_fraction=0.4,
                           refusal_rejected_fraction=1.0)
    refusable = [r for r in rows if r["quality"] == "clean" and r["present"] and r["kind"] in ("which", "colour", "where")]
    assert len(refusable) > 30 and all(r["rejected"] == "none" for r in refusable)
    for row in rows:
        if row["quality"] == "hallucination":
            assert row["chosen"] not in ("none", "no") and row["rejected"] in ("none", "no")
        if row["quality"] == "swap" and row["kind"] != "exists":
            assert row["rejected"] != "none"  # low-quality rows keep their construction
    half = preference_rows(scans, 300, "train", np.random.default_rng(1), low_quality_fraction=0.4,
                           refusal_rejected_fraction=0.5)
    share = np.mean([r["rejected"] == "none" for r in half
                     if r["quality"] == "clean" and r["present"] and r["kind"] in ("which", "colour", "where")])
    assert 0.3 < share < 0.7
    with pytest.raises(ValueError, match="refusal_rejected_fraction"):
        preference_rows(scans, 10, "train", np.random.default_rng(0), refusal_rejected_fraction=-0.1)


def test_hallucinated_instruction_rows_borrow_an_answer_from_an_object_in_the_scene(scans):
    faithful = question_rows(scans, 300, "train", np.random.default_rng(3), absent_fraction=0.5)
    assert not any(r["hallucinated"] for r in faithful)
    rows = question_rows(scans, 300, "train", np.random.default_rng(3), absent_fraction=0.5, hallucination_fraction=0.6)
    hallucinated = [r for r in rows if r["hallucinated"]]
    absent = [r for r in rows if not r["present"]]
    assert all(not r["present"] for r in hallucinated)  # only questions about absent objects
    assert 0.45 < len(hallucinated) / len(absent) < 0.75
    for row in hallucinated:
        scene = row["scene"]
        borrowed = {"which": {str(o.digit) for o in scene.objects}, "colour": {o.colour for o in scene.objects},
                    "where": {POSITIONS[o.cell] for o in scene.objects}, "exists": {"yes"}}[row["kind"]]
        assert row["response"] in borrowed  # a confident answer about something the image does show
    for row in absent:
        if not row["hallucinated"]:
            assert row["response"] in ("none", "no")
    # the default draws no extra random numbers: rows without hallucinations are unchanged
    assert [r["prompt"] for r in faithful] == [r["prompt"] for r in question_rows(
        scans, 300, "train", np.random.default_rng(3), absent_fraction=0.5, hallucination_fraction=0.0)]
    with pytest.raises(ValueError, match="hallucination_fraction"):
        question_rows(scans, 5, "train", np.random.default_rng(0), hallucination_fraction=2.0)


def test_a_question_about_a_present_object_cannot_be_given_a_hallucination(scans):
    from saev_hf.demo.scenes import borrowed_hallucination

    scene = random_scene(np.random.default_rng(0), scans, "train")
    with pytest.raises(ValueError, match="absent"):
        borrowed_hallucination(scene, ask(scene, "colour", np.random.default_rng(0)), np.random.default_rng(0))
