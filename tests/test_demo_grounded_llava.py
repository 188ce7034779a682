"""The grounded tiny LLaVA's recipe (saev_hf/demo/grounded_llava.py), on sizes that train in seconds."""

import copy
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from saev_hf.demo import grounded_llava as gl
from saev_hf.demo.scenes import ANSWERS, GRID, DigitScans, question_rows

SMALL = dict(imperfect_steps=0, hidden_size=32, num_heads=2, vision_hidden_size=16, batch_size=4, language_steps=3, alignment_steps=3,
             instruction_steps=3)


@pytest.fixture(scope="module")
def scans():
    return DigitScans(seed=0)


def _state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_one_image_token_per_cell_and_targets_are_the_summed_embeddings_of_the_cell_words(scans):
    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    rows = question_rows(scans, 3, "train", np.random.default_rng(0))
    inputs = processor(images=[r["images"][0] for r in rows], text=["<image> is there a 3 ?"] * 3, return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum(1).tolist() == [GRID * GRID] * 3
    scenes = [r["scene"] for r in rows]
    summed, mean = (gl.image_token_targets(model, processor, scenes, reduction) for reduction in ("sum", "mean"))
    embedding = model.get_input_embeddings().weight
    for r, row in enumerate(rows):
        for cell, words in enumerate(row["scene"].cell_words()):
            vectors = embedding[processor.tokenizer.convert_tokens_to_ids(list(words))]
            assert torch.allclose(summed[r, cell], vectors.sum(0), atol=1e-5)
            assert torch.allclose(mean[r, cell], vectors.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        gl.image_token_targets(model, processor, scenes, "max")
    assert embedding.std().item() == pytest.approx(gl.GroundedLlavaArguments().embedding_std, rel=0.1)  # identity stays large


def test_alignment_trains_only_the_vision_tower_and_projector_and_lowers_the_dense_loss(scans):
    args = gl.GroundedLlavaArguments(**{**SMALL, "alignment_steps": 40})
    model, processor = gl.build_grounded_llava(args)
    rows = question_rows(scans, 16, "train", np.random.default_rng(5))
    scenes = [r["scene"] for r in rows]

    def loss():
        with torch.no_grad():
            projected = gl._image_features(model, processor, [r["images"][0] for r in rows])
            return float(gl.dense_loss(projected, gl.image_token_targets(model, processor, scenes)))

    before, state = loss(), _state(model)
    gl._train_stage(model, processor, scans, np.random.default_rng(0), "alignment",
                    gl._part(model, "vision") + gl._part(model, "projector"), 40, 3e-3, args, progress=False)
    after = _state(model)
    changed = {name for name in state if not torch.equal(state[name], after[name])}
    assert changed and all("vision_tower" in n or "multi_modal_projector" in n for n in changed)
    assert any("vision_tower" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert loss() < 0.7 * before


def test_the_recipe_is_deterministic_per_seed(scans):
    first = gl.train_grounded_llava(gl.GroundedLlavaArguments(**SMALL), scans, eval_rows=6, progress=False)
    again = gl.train_grounded_llava(gl.GroundedLlavaArguments(**SMALL), scans, eval_rows=6, progress=False)
    other = gl.train_grounded_llava(gl.GroundedLlavaArguments(**SMALL, seed=1), scans, eval_rows=6, progress=False)
    a, b, c = (_state(run[0]) for run in (first, again, other))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    summary = first[2]
    assert set(summary["stages"]) == set(gl.RECIPE_STAGES) and summary["stages"]["imperfect_instruction"] == {}
    unevaluated = gl.train_grounded_llava(gl.GroundedLlavaArguments(**SMALL), scans, eval_rows=0, progress=False)
    assert "held_out" not in unevaluated[2] and all(torch.equal(a[n], v) for n, v in unevaluated[0].state_dict().items())
    assert summary["held_out"]["rows"] == 6 and 0 <= summary["held_out"]["accuracy"] <= 1


def test_answer_accuracy_counts_answers_and_hallucinations(monkeypatch, scans):
    rows = [{"kind": "colour", "present": True, "response": "red"},
            {"kind": "colour", "present": False, "response": "none"},
            {"kind": "exists", "present": False, "response": "no"},
            {"kind": "which", "present": False, "response": "none"}]
    monkeypatch.setattr(gl, "predict_answers", lambda model, processor, rows, batch_size: ["red", "blue", "no", "3"])
    summary = gl.answer_accuracy(None, None, rows)
    assert summary["accuracy"] == 0.5 and summary["hallucination_rate"] == pytest.approx(2 / 3)
    assert summary["by_kind"] == {"colour": 1.0, "colour_absent": 0.0, "exists_absent": 1.0, "which_absent": 0.0}


def test_predictions_are_answers_of_the_question_kind(scans):
    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    rows = question_rows(scans, 12, "held_out", np.random.default_rng(2), absent_fraction=0.3)
    predicted = gl.predict_answers(model, processor, rows, batch_size=5)
    assert len(predicted) == 12 and all(p in ANSWERS[r["kind"]] for p, r in zip(predicted, rows))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        gl.GroundedLlavaArguments(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="instruction_absent_fraction"):
        gl.GroundedLlavaArguments(instruction_absent_fraction=1.5)
    with pytest.raises(ValueError, match="instruction_hallucination_fraction"):
        gl.GroundedLlavaArguments(instruction_hallucination_fraction=-0.5)


def test_the_scene_saev_is_trained_weighted_with_a_calibrated_delta_and_saved(scans, tmp_path):
    from saev_hf import SAEV
    from saev_hf.demo.scene_saev import SceneSAEVArguments, train_scene_saev

    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    args = SceneSAEVArguments(layer=1, expansion_factor=2, steps=6, training_rows=24, weighting_rows=16,
                              delta_quantile=0.5)
    sae = train_scene_saev(model, processor, scans, args, tmp_path / "saev", progress=False)
    info = sae.config.cooccurrence_threshold_info
    assert info["quantile"] == 0.5 and sae.config.cooccurrence_threshold > 0
    assert sae.config.hook_layer == 1 and sae.config.d_sae == 2 * 32
    assert sae.config.feature_weights_info["num_examples"] == 16
    reloaded = SAEV.from_pretrained(tmp_path / "saev")
    assert reloaded.config.cooccurrence_threshold == sae.config.cooccurrence_threshold
    assert torch.equal(reloaded.feature_weights.isnan(), sae.feature_weights.isnan())


def test_dpo_and_evaluate_trains_a_copy_and_reports_accuracy_and_hallucinations(scans, tmp_path):
    from saev_hf.demo.preference import SceneDPOArguments, dpo_and_evaluate
    from saev_hf.demo.scenes import preference_rows

    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    before = _state(model)
    rows = preference_rows(scans, 8, "train", np.random.default_rng(0), low_quality_fraction=0.5)
    eval_rows = question_rows(scans, 6, "held_out", np.random.default_rng(1), absent_fraction=0.5)
    result = dpo_and_evaluate(model, processor, rows, eval_rows, SceneDPOArguments(steps=2, batch_size=4,
                                                                                  sft_weight=1.0), tmp_path)
    assert all(torch.equal(before[n], value) for n, value in model.state_dict().items())  # the model is untouched
    assert result["train_rows"] == 8 and result["rows"] == 6 and result["final_loss"] is not None
    untrained = gl.answer_accuracy(model, processor, eval_rows)
    assert (result["accuracy"], result["hallucination_rate"]) != (None, None)
    assert set(result["by_kind"]) == set(untrained["by_kind"])


def test_layer_alignment_targets_are_the_states_of_the_cell_words_in_the_description(scans):
    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    rows = question_rows(scans, 3, "train", np.random.default_rng(4))
    scenes = [r["scene"] for r in rows]
    targets, occupied = gl.word_state_targets(model, processor, scenes, layer=1)
    tokenizer = processor.tokenizer
    for i, scene in enumerate(scenes):
        ids = tokenizer(f"scene : {scene.describe()}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        tokens = tokenizer.convert_ids_to_tokens(ids[0])
        assert occupied[i].sum() == len(scene.objects)
        for obj in scene.objects:
            expected = states[[tokens.index(obj.colour), tokens.index(str(obj.digit))]].mean(0)
            assert torch.allclose(targets[i, obj.cell], expected, atol=1e-5)


def test_alignment_at_a_layer_still_trains_only_the_image_side(scans):
    args = gl.GroundedLlavaArguments(**{**SMALL, "align_layer": 0})
    model, processor = gl.build_grounded_llava(args)
    state = _state(model)
    losses = gl._train_stage(model, processor, scans, np.random.default_rng(0), "alignment",
                             gl._part(model, "vision") + gl._part(model, "projector"), 5, 3e-3, args, progress=False)
    changed = {n for n, v in model.state_dict().items() if not torch.equal(state[n], v)}
    assert changed and all("vision_tower" in n or "multi_modal_projector" in n for n in changed)
    assert losses["dense_loss"] > 0 and losses["answer_loss"] == 0


def test_predictions_can_leave_out_an_answer_per_row(scans):
    model, processor = gl.build_grounded_llava(gl.GroundedLlavaArguments(**SMALL))
    rows = question_rows(scans, 6, "held_out", np.random.default_rng(2))
    best = gl.predict_answers(model, processor, rows)
    second = gl.predict_answers(model, processor, rows, batch_size=4, exclude=best)
    assert all(b != s and s in ANSWERS[r["kind"]] for b, s, r in zip(best, second, rows))


def test_only_instruction_tuning_sees_hallucinated_answers(scans, monkeypatch):
    drawn = []

    def recording(*args, **kwargs):
        rows = question_rows(*args, **kwargs)
        drawn.append((kwargs.get("as_text", False), kwargs.get("hallucination_fraction", 0.0), rows))
        return rows

    monkeypatch.setattr(gl, "question_rows", recording)
    args = gl.GroundedLlavaArguments(**{**SMALL, "instruction_steps": 6, "instruction_absent_fraction": 1.0,
                                        "instruction_hallucination_fraction": 1.0})
    model, processor = gl.build_grounded_llava(args)
    for offset in range(3):
        gl.train_stage(model, processor, scans, args, offset, progress=False)
    language = [f for text, f, _ in drawn if text]
    instruction = [rows for text, f, rows in drawn[-6:]]
    assert language and set(language) == {0.0}  # the language model learns faithful answers
    assert all(f == 1.0 for _, f, _ in drawn[-6:])
    answered = [r for rows in instruction for r in rows if not r["present"]]
    assert answered and all(r["hallucinated"] and r["response"] not in ("none", "no") for r in answered)


def test_stage_four_continues_stage_three_on_hallucinated_answers_in_the_language_model_and_projector(scans,
                                                                                                  monkeypatch):
    args = gl.GroundedLlavaArguments(**{**SMALL, "imperfect_steps": 4, "imperfect_absent_fraction": 1.0,
                                        "imperfect_hallucination_fraction": 1.0})
    after_three, _, _ = gl.train_grounded_llava(replace(args, imperfect_steps=0), scans, eval_rows=0, progress=False)
    after_four, processor, summary = gl.train_grounded_llava(args, scans, eval_rows=0, progress=False)
    assert summary["stages"]["imperfect_instruction"]["answer_loss"] > 0
    three, four = _state(after_three), _state(after_four)
    changed = {name for name in three if not torch.equal(three[name], four[name])}
    assert changed and not any("vision_tower" in n for n in changed)
    assert any("language_model" in n for n in changed) and any("multi_modal_projector" in n for n in changed)

    drawn = []
    monkeypatch.setattr(gl, "question_rows", lambda *a, **k: drawn.append(k) or question_rows(*a, **k))
    continued = copy.deepcopy(after_three)
    gl.train_stage(continued, processor, scans, args, gl.RECIPE_STAGES.index("imperfect_instruction"),
                   progress=False)
    assert all(torch.equal(v, four[n]) for n, v in _state(continued).items())  # stage 4 from a saved stage-3 model
    assert len(drawn) == 4 and all(k["absent_fraction"] == 1.0 and k["hallucination_fraction"] == 1.0 for k in drawn)


def test_a_recipe_saved_before_stage_four_loads_without_it(tmp_path):
    from saev_hf.demo.run import load_recipe

    arguments = asdict(gl.GroundedLlavaArguments(**SMALL))
    del arguments["imperfect_steps"]
    (tmp_path / "recipe.json").write_text(json.dumps({"arguments": arguments}))
    assert load_recipe(tmp_path).imperfect_steps == 0
    assert gl.GroundedLlavaArguments().imperfect_steps > 0  # the embedded model's recipe has it
