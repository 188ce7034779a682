"""The gate's measurements (saev_hf/demo/gate.py) on hand-made activations whose answers are known."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerActivations, Modality
from saev_hf.demo.gate import GateThresholds, auroc, concept_features, consistency_pairs
from saev_hf.demo.scenes import CONCEPTS, VOCABULARY, DigitScans, Scene, SceneObject
from saev_hf.testing.tiny_processing import build_tiny_tokenizer


def test_auroc_by_pair_counting_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.4
    assert auroc(labels, values) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)


def test_consistency_pairs_put_the_same_question_under_an_image_with_and_without_its_object():
    scans = DigitScans(seed=0)
    rows = consistency_pairs(scans, 50, np.random.default_rng(0))
    assert len(rows) == 100
    for consistent, inconsistent in zip(rows[::2], rows[1::2]):
        assert consistent["consistent"] and not inconsistent["consistent"]
        assert consistent["prompt"] == inconsistent["prompt"] and consistent["concept"] in consistent["prompt"]
        assert consistent["concept"] in consistent["scene_concepts"]
        assert consistent["concept"] not in inconsistent["scene_concepts"]


class _FakeReader:
    """Returns hand-made layer activations: feature 0 fires on the word '3' and on the cells showing a 3, feature 1
    on every image cell, feature 2 on the word '3' only; nothing else fires."""

    def __init__(self, tokenizer, scenes):
        self.processor = SimpleNamespace(tokenizer=tokenizer)
        self.scenes = scenes

    def read(self, rows, first_row=0):
        tok = self.processor.tokenizer
        three, question = tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("?")
        ids, modality, hidden = [], [], []
        for scene in self.scenes[first_row:first_row + len(rows)]:
            row_ids = [tok.bos_token_id] + [0] * 9 + [three, question]
            row_mod = [Modality.SPECIAL] + [Modality.IMAGE] * 9 + [Modality.TEXT] * 2
            h = torch.zeros(len(row_ids), 4)
            for cell, words in enumerate(scene.cell_words()):
                h[1 + cell, 1] = 2.0
                h[1 + cell, 0] = 2.0 if "3" in words else 0.5  # 0.5 is below delta = 1
            h[10, 0] = h[10, 2] = 2.0
            ids.append(row_ids)
            modality.append(row_mod)
            hidden.append(h)
        return LayerActivations(hidden_states=torch.stack(hidden), modality=torch.tensor(modality, dtype=torch.int8),
                                input_ids=torch.tensor(ids), layer=1)


def test_concept_features_find_the_feature_shared_by_a_word_and_its_cells():
    tokenizer = build_tiny_tokenizer("llava", words=VOCABULARY)
    scenes = [Scene((SceneObject(3, "red", 4, 0),)), Scene((SceneObject(3, "blue", 0, 0), SceneObject(7, "red", 8, 0)))]
    sae = SAEV(SAEVConfig(d_in=4, d_sae=4, hook_layer=1, cooccurrence_threshold=1.0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    rows = [{"images": [None], "prompt": "is there a 3 ?", "scene": scene} for scene in scenes]
    found = {c.concept: c for c in concept_features(sae, _FakeReader(tokenizer, scenes), rows, batch_size=1)}
    assert set(found) == set(CONCEPTS)
    three = found["3"]
    assert (three.feature, three.text_rate, three.image_rate, three.elsewhere_rate, three.shared) == (0, 1, 1, 0, True)
    assert three.weight is None  # the SAE-V has no feature weights yet
    # feature 0 fires at 2.0 on both words and on the two cells with a 3, at 0.5 on the 16 other cells: its top 30
    # holds all 2 + 2 strong positions and 16 weak ones
    assert (three.top_k_text, three.top_k_image, three.text_mean, three.image_mean) == (2, 18, 2.0, 2.0)
    red = found["red"]  # shown (3 cells) but never said: not shared
    assert red.text_rate == 0 and not red.shared
    strict = concept_features(sae, _FakeReader(tokenizer, scenes), rows, GateThresholds(min_text_rate=1.01))
    assert not any(c.shared for c in strict)


def test_absence_knowledge_reads_the_refusal_margin_and_the_room_a_threshold_gives(monkeypatch):
    from saev_hf.demo import gate, grounded_llava
    from saev_hf.demo.scenes import ANSWERS

    def candidates(answer_values):
        names = list(ANSWERS["exists"])
        return names, torch.tensor([answer_values[n] for n in names])

    # "is there a 3 ?": margins (no - yes) of 2 present rows and 2 absent rows. Every absent row's margin is above
    # every present row's (AUROC 1), but one absent row still prefers "yes": a threshold of 0 gets 3 of 4 right, the
    # best threshold all 4.
    rows = [{"kind": "exists", "present": True, "response": "yes"},
            {"kind": "exists", "present": True, "response": "yes"},
            {"kind": "exists", "present": False, "response": "no"},
            {"kind": "exists", "present": False, "response": "no"},
            {"kind": "colour", "present": True, "response": "red"}]
    scored = [candidates({"yes": -0.1, "no": -3.0}), candidates({"yes": -0.2, "no": -2.0}),
              candidates({"yes": -1.0, "no": -0.5}), candidates({"yes": -0.5, "no": -1.0}),
              (list(ANSWERS["colour"]), torch.tensor([-0.1 if a == "blue" else -2.0 for a in ANSWERS["colour"]]))]
    monkeypatch.setattr(grounded_llava, "candidate_log_likelihoods", lambda model, processor, rows, batch_size: scored)
    result = gate.absence_knowledge(None, None, rows)
    assert set(result) == {"exists", "colour"}
    exists = result["exists"]
    assert exists["auroc"] == 1.0 and exists["accuracy"] == 0.75 and exists["best_shift_accuracy"] == 1.0
    assert exists["present_answer_accuracy"] == 1.0 and (exists["rows"], exists["absent"]) == (4, 2)
    colour = result["colour"]  # one present row answered "blue" (wrong): no absent row, no AUROC
    assert colour["auroc"] is None and colour["accuracy"] == 0.0 and colour["present_answer_accuracy"] == 0.0


def test_the_demo_saev_reproduces_its_recorded_figures_within_the_stated_tolerance():
    """The same command in another environment gives the recorded gate figures within REPRODUCIBILITY_TOLERANCE
    (on one machine, bit for bit: test_determinism.py)."""
    import json
    import tempfile
    from pathlib import Path

    from saev_hf.demo.gate import REPRODUCIBILITY_TOLERANCE, measure_gate
    from saev_hf.demo.run import DemoArguments, load_grounded_llava, load_recipe
    from saev_hf.demo.scene_saev import train_scene_saev
    from saev_hf.demo.scenes import question_rows

    recorded = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                           / "reproducibility.json").read_text())["runs"][0]
    model, processor = load_grounded_llava()
    scans = DigitScans(load_recipe().held_out_fraction, seed=load_recipe().seed)
    held_out = question_rows(scans, 600, "held_out", np.random.default_rng([0, 99]), absent_fraction=0.25)
    saev_args = DemoArguments().saev_arguments()
    with tempfile.TemporaryDirectory() as folder:
        sae = train_scene_saev(model, processor, scans, saev_args, folder, progress=False)
    answers = {"accuracy": 1.0, "by_kind": {}, "hallucination_rate": 0.0}  # (d) is not what is checked here
    gate = measure_gate(model, processor, sae, saev_args.layer, scans, held_out, answers, seed=0)
    tolerance = REPRODUCIBILITY_TOLERANCE
    assert abs(gate["weighted_features"] - recorded["weighted_features"]) <= tolerance["weighted_features"]
    assert abs(gate["shared_concepts"] - recorded["shared_concepts"]) <= tolerance["shared_concepts"]
    for name in ("cosine", "cooccur_l0"):
        assert gate["auroc"][name] == pytest.approx(recorded["gate_auroc"][name], abs=tolerance["auroc"])
    assert gate["cooccurrence_threshold"] == pytest.approx(recorded["delta"], rel=tolerance["delta_relative"])
