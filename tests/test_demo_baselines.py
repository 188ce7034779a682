"""The scores SAE-V's filter is compared with (saev_hf/demo/baselines.py), on the embedded grounded LLaVA."""

import datasets
import numpy as np
import pytest
import torch

from saev_hf.demo.run import load_grounded_llava
from saev_hf.demo.baselines import chosen_log_likelihood, image_text_similarity
from saev_hf.demo.gate import auroc
from saev_hf.demo.grounded_llava import predict_answers
from saev_hf.demo.scenes import DigitScans, question_rows, random_scene


@pytest.fixture(scope="module")
def grounded():
    return load_grounded_llava()


@pytest.fixture(scope="module")
def scans():
    return DigitScans(seed=0)


def _batch(rows, chosen):
    return {"images": [r["images"] for r in rows], "prompt": [r["prompt"] for r in rows], "chosen": chosen}


def test_chosen_log_likelihood_ranks_the_models_own_answer_first(grounded, scans):
    model, processor = grounded
    rows = question_rows(scans, 12, "held_out", np.random.default_rng(3))
    answers = predict_answers(model, processor, rows)
    others = predict_answers(model, processor, rows, exclude=answers)
    score = chosen_log_likelihood(model, processor)
    own = score(_batch(rows, answers))["chosen_log_likelihood"]
    second = score(_batch(rows, others))["chosen_log_likelihood"]
    assert all(a > b for a, b in zip(own, second))  # the predicted answer is the likeliest candidate
    assert all(v < 0 for v in own)


def test_image_text_similarity_is_higher_when_the_image_shows_what_the_question_names(grounded, scans):
    model, processor = grounded
    rng = np.random.default_rng(4)
    rows = [r for r in question_rows(scans, 80, "held_out", rng, absent_fraction=0.0) if r["concept"] is not None]
    shown = [{"images": r["images"], "prompt": r["prompt"]} for r in rows]
    lacking = [{"images": [random_scene(rng, scans, "held_out", avoid={r["concept"]}).image(scans)],
                "prompt": r["prompt"]} for r in rows]
    score = image_text_similarity(model, processor)
    consistent = score({"images": [r["images"] for r in shown], "prompt": [r["prompt"] for r in shown]})
    inconsistent = score({"images": [r["images"] for r in lacking], "prompt": [r["prompt"] for r in lacking]})
    values = np.array(consistent["image_text_similarity"] + inconsistent["image_text_similarity"])
    assert auroc(np.r_[np.ones(len(rows)), np.zeros(len(rows))].astype(bool), values) > 0.7


def test_image_text_similarity_works_in_a_datasets_map_and_refuses_rows_without_one_image(grounded, scans):
    model, processor = grounded
    rows = question_rows(scans, 6, "held_out", np.random.default_rng(5))
    dataset = datasets.Dataset.from_list([{"images": r["images"], "prompt": r["prompt"]} for r in rows])
    mapped = dataset.map(image_text_similarity(model, processor), batched=True, batch_size=4)
    direct = image_text_similarity(model, processor)({"images": [r["images"] for r in rows],
                                                      "prompt": [r["prompt"] for r in rows]})
    torch.testing.assert_close(torch.tensor(mapped["image_text_similarity"]),
                               torch.tensor(direct["image_text_similarity"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Row 1 .* 0 images"):
        image_text_similarity(model, processor)({"images": [rows[0]["images"], []], "prompt": ["is there a 3 ?"] * 2})
