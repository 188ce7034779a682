"""The baselines SAE-V's filter is compared with (`saev_hf.scoring.baselines`) behave as they should on a model that
grounds its words in the image: the embedded grounded LLaVA of `saev demo`."""

import datasets
import numpy as np
import pytest
import torch

from saev_hf.data import RowError
from saev_hf.demo.gate import auroc
from saev_hf.demo.run import load_grounded_llava
from saev_hf.scoring import SAEVScorer, ScorerArguments
from saev_hf.demo.grounded_llava import predict_answers
from saev_hf.demo.scenes import DigitScans, question_rows, random_scene


@pytest.fixture(scope="module")
def grounded():
    return load_grounded_llava()


@pytest.fixture(scope="module")
def scans():
    return DigitScans(seed=0)


def baseline(model, processor, score):
    """A scorer of one baseline, without an SAE-V."""
    return SAEVScorer(None, model, processor, args=ScorerArguments(scores=[score]))


def _batch(rows, chosen):
    return {"images": [r["images"] for r in rows], "prompt": [r["prompt"] for r in rows], "chosen": chosen}


def test_chosen_log_likelihood_ranks_the_models_own_answer_first(grounded, scans):
    model, processor = grounded
    rows = question_rows(scans, 12, "held_out", np.random.default_rng(3))
    answers = predict_answers(model, processor, rows)
    others = predict_answers(model, processor, rows, exclude=answers)
    score = baseline(model, processor, "answer_log_likelihood").score_rows
    own = score(_batch(rows, answers))["answer_log_likelihood"]
    second = score(_batch(rows, others))["answer_log_likelihood"]
    assert all(a > b for a, b in zip(own, second))  # the predicted answer is the likeliest candidate
    assert all(v < 0 for v in own)


def test_image_text_similarity_is_higher_when_the_image_shows_what_the_question_names(grounded, scans):
    model, processor = grounded
    rng = np.random.default_rng(4)
    rows = [r for r in question_rows(scans, 80, "held_out", rng, absent_fraction=0.0) if r["concept"] is not None]
    shown = [{"images": r["images"], "prompt": r["prompt"]} for r in rows]
    lacking = [{"images": [random_scene(rng, scans, "held_out", avoid={r["concept"]}).image(scans)],
                "prompt": r["prompt"]} for r in rows]
    score = baseline(model, processor, "image_text_similarity").score_rows
    consistent = score({"images": [r["images"] for r in shown], "prompt": [r["prompt"] for r in shown]})
    inconsistent = score({"images": [r["images"] for r in lacking], "prompt": [r["prompt"] for r in lacking]})
    values = np.array(consistent["image_text_similarity"] + inconsistent["image_text_similarity"])
    assert auroc(np.r_[np.ones(len(rows)), np.zeros(len(rows))].astype(bool), values) > 0.7


def test_image_text_similarity_works_in_a_datasets_map_and_refuses_rows_without_an_image(grounded, scans):
    model, processor = grounded
    rows = question_rows(scans, 6, "held_out", np.random.default_rng(5))
    dataset = datasets.Dataset.from_list([{"images": r["images"], "prompt": r["prompt"]} for r in rows])
    scorer = baseline(model, processor, "image_text_similarity")
    mapped = dataset.map(scorer, batched=True, batch_size=4)
    direct = scorer.score_rows({"images": [r["images"] for r in rows], "prompt": [r["prompt"] for r in rows]})
    torch.testing.assert_close(torch.tensor(mapped["image_text_similarity"]),
                               torch.tensor(direct["image_text_similarity"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(RowError, match="Row 1 has no image"):
        scorer.score_rows({"images": [rows[0]["images"], []], "prompt": ["is there a 3 ?"] * 2})
