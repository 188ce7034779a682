"""benchmarks/feature_labels.py on small settings: it labels every concept's feature with the grounded model, scores
each label and both controls by detection, and writes the table with its summary."""

import json

from benchmark_scripts import load_benchmark

from saev_hf.demo.concept_labels import concept_label, label_concept
from saev_hf.demo.scenes import CONCEPTS
from saev_hf.interpret.labels import DETECTION_KEYS


def test_feature_labels_benchmark_labels_and_scores_every_concept_and_the_controls(tmp_path):
    load_benchmark("feature_labels").main(["--rows", "60", "--concept-rows", "40", "--saev-steps", "40", "--top-n", "2",
                                           "--num-detection", "3", "--random-features", "2",
                                           "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "feature_labels.json").read_text())
    assert [r["concept"] for r in result["concepts"]] == list(CONCEPTS)
    for r in result["concepts"]:
        assert r["agrees"] == (r["label"] is not None and label_concept(r["label"]) == r["concept"])
        for key in ("detection", "shuffled_detection"):
            if r[key] is not None:
                assert set(DETECTION_KEYS) <= set(r[key]) and 0 <= r[key]["f1"] <= 1
                assert r[key]["num_non_activating"] <= r[key]["num_activating"] <= 3
    labelled = [r for r in {r["feature"]: r for r in result["concepts"]}.values() if r["label"] is not None]
    assert len(labelled) >= 2
    assert sorted(r["shuffled_label"] for r in labelled) == sorted(r["label"] for r in labelled)  # moved, not new
    assert len(result["random_features"]) == 2
    summary = result["summary"]
    assert summary["agreement"] == sum(r["agrees"] for r in result["concepts"]) / len(CONCEPTS)
    assert {"mean_f1", "shuffled_agreement", "shuffled_mean_f1", "random_mean_f1"} <= set(summary)
    table = (tmp_path / "feature_labels.md").read_text()
    assert "| concept | feature | shared | label | agrees |" in table and "control: concept features, shuffled" in table


def test_concept_labels_name_one_concept_each():
    assert [label_concept(concept_label(c)) for c in CONCEPTS] == list(CONCEPTS)
    assert label_concept("no digit or colour") is None and label_concept("red 3") is None
