"""Sparse probing in `saev eval` (SAEBench's): a probe on one planted feature finds it and separates its class, labels
that mean nothing stay at chance, k-selection is the difference of class means, each split pools only its own
positions, the CLI writes `sparse_probing` into metrics.json, and bad labels say what to do."""

from __future__ import annotations

import json
import sys

import datasets
import numpy as np
import pytest
import torch

from saev_hf.activations import LayerReader
from saev_hf.cli import main as cli_main
from saev_hf.data.errors import RowError
from saev_hf.evaluation import SAEVEvaluationArguments, evaluate_saev, format_metrics_table
from saev_hf.evaluation.probing import PooledActivations, sparse_probing, stratified_split, top_k_features
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.testing.tiny_saes import data_driven_sae

PLANTED = 13


def marked_rows(n: int) -> list[dict]:
    """Handwritten digits; every other row is marked by a black square over its top-left quarter (`marked` 1), and
    `shuffled` is a label that has nothing to do with the images."""
    rows = []
    order = np.random.default_rng(5).permutation(n)
    for i, (image, digit) in enumerate(digit_images(n, seed=2)):
        marked = i % 2
        if marked:
            image = image.copy()
            image.paste((0, 0, 0), (0, 0, image.width // 2, image.height // 2))
        rows.append({"images": [image], "prompt": "what digit is this ?", "marked": marked,
                     "shuffled": int(order[i] % 2), "digit": digit})
    return rows


@torch.no_grad()
def planted_sae(reader: LayerReader, rows: list[dict], d_sae: int = 32):
    """A data-driven SAE-V whose feature PLANTED reads the mark: its encoder is the difference between the mean image
    state of marked and unmarked rows, its bias halfway between the two means' projections."""
    sae = data_driven_sae(reader, rows[:6], d_sae=d_sae)
    acts = reader.read(rows)
    image = acts.image_mask
    marked = torch.tensor([row["marked"] for row in rows], dtype=torch.bool)
    states = [acts.hidden_states[i][image[i]] - sae.b_dec for i in range(len(rows))]
    mean_marked = torch.cat([s for s, m in zip(states, marked) if m]).mean(0)
    mean_plain = torch.cat([s for s, m in zip(states, marked) if not m]).mean(0)
    direction = torch.nn.functional.normalize(mean_marked - mean_plain, dim=0)
    sae.W_enc[:, PLANTED] = direction
    sae.b_enc[PLANTED] = -0.5 * float((mean_marked + mean_plain) @ direction)
    return sae


@pytest.fixture(scope="module")
def planted(tiny_model_factory):
    llava = tiny_model_factory("llava")
    rows = marked_rows(120)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    return llava, rows, planted_sae(reader, rows)


def test_a_probe_on_one_feature_finds_the_planted_one_and_shuffled_labels_stay_at_chance(planted):
    llava, rows, sae = planted
    options = {"batch_size": 16, "compute_ce_loss": False, "probe_k": [1, 5], "probe_test_fraction": 0.25}
    marked = evaluate_saev(sae, llava.model, llava.processor, rows, probe_label_column="marked", **options)
    probing = marked["sparse_probing"]
    assert probing["classes"] == ["0", "1"] and probing["tasks"] == ["1"]  # two classes: one task
    assert probing["train_examples"] == 90 and probing["test_examples"] == 30
    image = probing["image"]
    assert image["per_task"]["1"]["features"][0] == PLANTED
    assert image["sae"]["1"] >= 0.9 and image["dense"] >= 0.9
    assert image["examples"] == 120 and image["d_in"] == 64

    shuffled = evaluate_saev(sae, llava.model, llava.processor, rows, probe_label_column="shuffled", **options)
    for split in ("all", "text", "image"):
        assert abs(shuffled["sparse_probing"][split]["sae"]["1"] - 0.5) <= 0.2, split
    # the rest of the evaluation is what it is without probing
    plain = evaluate_saev(sae, llava.model, llava.processor, rows, batch_size=16, compute_ce_loss=False)
    assert "sparse_probing" not in plain and plain["image"] == marked["image"]
    assert "| SAE-V top 1 | " in format_metrics_table(marked) and "| residual stream (64 dims) |" in \
        format_metrics_table(marked)


def test_several_classes_make_one_balanced_task_per_class_each_finding_its_own_feature():
    rng = np.random.default_rng(0)
    labels = ["cat", "dog", "fish"] * 40
    own = {"cat": 3, "dog": 7, "fish": 11}
    features = rng.normal(0, 1, (120, 16)).clip(min=0)
    for i, label in enumerate(labels):
        features[i, own[label]] += 6.0
    residual = rng.normal(0, 1, (120, 8))
    pooled = pooled_from(torch.tensor(features, dtype=torch.float32), torch.tensor(residual, dtype=torch.float32),
                         labels)
    result = sparse_probing(pooled, probe_k=[1, 2, 100], test_fraction=0.25, seed=1)
    assert result["tasks"] == ["cat", "dog", "fish"] and result["k"] == [1, 2, 16]  # 100 capped at d_sae
    for name, feature in own.items():
        task = result["all"]["per_task"][name]
        assert task["features"][0] == feature
        # balanced: 30 training positives against 30 negatives drawn 15 and 15 from the two other classes
        assert task["train"] == 60 and task["test"] == 20
        assert task["sae"]["1"] == 1.0
    assert result["all"]["dense"] == pytest.approx(0.5, abs=0.2)  # the residual here is noise
    assert result["image"] is None  # no example has an image position


def pooled_from(features: torch.Tensor, residual: torch.Tensor, labels: list) -> PooledActivations:
    """Pooled activations of one position per example, in the all and text splits; none in the image split."""
    pooled = PooledActivations("label")
    present = torch.ones(len(labels), 1, dtype=torch.bool)
    pooled.add(labels, range(len(labels)), residual[:, None], features[:, None],
               {"all": present, "text": present, "image": torch.zeros_like(present)})
    return pooled


def test_k_selection_is_the_largest_absolute_difference_of_class_means():
    features = np.array([[1.0, 0.0, 5.0, 2.0], [3.0, 0.0, 5.0, 2.0], [0.0, 2.0, 1.0, 2.0], [0.0, 4.0, 1.0, 2.0]])
    positive = np.array([True, True, False, False])
    # class means: positive (2, 0, 5, 2), negative (0, 3, 1, 2): |difference| (2, 3, 4, 0)
    assert top_k_features(features, positive, 3).tolist() == [2, 1, 0]

    # inside sparse_probing: two classes of equal size, so each task trains on all its training rows
    rng = np.random.default_rng(3)
    labels = [0, 1] * 20
    values = rng.normal(0, 1, (40, 10))
    pooled = pooled_from(torch.tensor(values, dtype=torch.float32), torch.zeros(40, 2), labels)
    result = sparse_probing(pooled, probe_k=[4], test_fraction=0.3, seed=9)
    train = ~stratified_split(labels, list(range(40)), 0.3, 9, "label")
    y = np.array(labels)[train] == 1
    x = values.astype(np.float32).astype(np.float64)[train]  # what was pooled
    by_hand = np.argsort(-np.abs(x[y].mean(0) - x[~y].mean(0)))[:4]
    assert result["all"]["per_task"]["1"]["features"] == by_hand.tolist()


def test_each_split_pools_only_its_own_positions(tiny_model_factory):
    llava = tiny_model_factory("llava")
    image = digit_images(1, seed=4)[0][0]
    # one image for every row, the label in the text only: image positions (before the text) are the same in every row
    rows = [{"images": [image], "prompt": f"it is {DIGIT_NAMES[7 if i % 2 else 3]}", "word": i % 2}
            for i in range(40)]
    reader = LayerReader(llava.model, llava.processor, layer=1)
    sae = data_driven_sae(reader, rows[:4], d_sae=64)  # features along most of these rows' states, the words' too
    probing = evaluate_saev(sae, llava.model, llava.processor, rows, batch_size=8, compute_ce_loss=False,
                            probe_label_column="word", probe_k=[1, 5])["sparse_probing"]
    for k in ("1", "5"):
        assert probing["image"]["sae"][k] == 0.5  # identical inputs: one prediction for every test row
        assert probing["text"]["sae"][k] == 1.0
    assert probing["image"]["dense"] == 0.5 and probing["text"]["dense"] == 1.0
    assert probing["image"]["per_task"]["1"]["features"] == [0, 1, 2, 3, 4]  # no feature differs: ties, by index

    # the pooled values themselves: masked means, padding and the other modality left out
    generator = torch.Generator().manual_seed(0)
    hidden, acts = torch.randn(2, 5, 3, generator=generator), torch.rand(2, 5, 4, generator=generator)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    hidden[:, 4], acts[:, 4] = float("nan"), float("inf")  # whatever sits at padding is never read
    pooled = PooledActivations("label")
    pooled.add(["a", "b"], [0, 1], hidden, acts, {"image": mask})
    for i in range(2):
        assert torch.allclose(pooled.features("image")[i], acts[i][mask[i]].mean(0))
        assert torch.allclose(pooled.residual("image")[i], hidden[i][mask[i]].mean(0))


def test_saev_eval_writes_sparse_probing_into_metrics_json(planted, tmp_path, capsys):
    llava, rows, sae = planted
    sae.save_pretrained(tmp_path / "sae")
    datasets.Dataset.from_list(rows[:60]).save_to_disk(str(tmp_path / "data"))
    argv = ["eval", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(llava.path),
            "--dataset_name", str(tmp_path / "data"), "--num_examples", "60", "--batch_size", "20",
            "--compute_ce_loss", "False", "--probe_label_column", "digit", "--probe_k", "1", "3",
            "--probe_test_fraction", "0.3", "--output_dir", str(tmp_path / "eval")]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    probing = json.loads((tmp_path / "eval" / "metrics.json").read_text())["sparse_probing"]
    assert probing["label_column"] == "digit" and probing["k"] == [1, 3] and probing["test_fraction"] == 0.3
    assert probing["classes"] == [str(d) for d in range(10)] and len(probing["tasks"]) == 10
    assert set(probing["all"]["sae"]) == {"1", "3"} and 0 <= probing["image"]["dense"] <= 1
    assert "| SAE-V top 3 |" in out and "Sparse probing of `digit` (10 classes, 10 one-vs-rest tasks" in out


def test_bad_labels_say_what_was_wrong_and_what_to_do(tiny_model_factory, monkeypatch):
    llava = tiny_model_factory("llava")
    rows = [{"images": [image], "prompt": "what digit is this ?", "digit": digit}
            for image, digit in digit_images(12, seed=6)]
    reader = LayerReader(llava.model, llava.processor, layer=1)
    sae = data_driven_sae(reader, rows[:2], d_sae=16)

    def evaluate(data, column="digit", **options):
        return evaluate_saev(sae, llava.model, llava.processor, data, batch_size=4, compute_ce_loss=False,
                             probe_label_column=column, **options)

    with pytest.raises(ValueError, match=r"column 'label', which the dataset does not have \(its columns: "
                                         r"\['images', 'prompt', 'digit'\]\)\. Pass --probe_label_column"):
        evaluate(datasets.Dataset.from_list(rows), column="label")
    with pytest.raises(RowError, match="Row 2 has no column 'label'"):
        evaluate([{**row, "label": 1} if i < 2 else row for i, row in enumerate(rows)], column="label")
    with pytest.raises(RowError, match=r"Row 5: its label 'digit' is null; .*dataset\.filter"):
        evaluate([{**row, "digit": None} if i == 5 else row for i, row in enumerate(rows)])
    with pytest.raises(RowError, match=r"Row 1: its label 'digit' is 0.5 \(float\), not a class"):
        evaluate([{**row, "digit": 0.5} if i == 1 else row for i, row in enumerate(rows)])
    with pytest.raises(ValueError, match=r"holds a single class \(7 in all 12 evaluated rows\): a probe needs at least "
                                         r"two"):
        evaluate([{**row, "digit": 7} for row in rows])
    lonely = [{**row, "digit": "rare" if i == 9 else "common" if i % 2 else "other"} for i, row in enumerate(rows)]
    with pytest.raises(ValueError, match=r"Class 'rare' of the label column 'digit' has 1 evaluated row \(row 9\): "
                                         r".*at least 2 rows per class"):
        evaluate(lonely)
    with pytest.raises(ValueError, match=r"probe_k=\[0, 2\] must be a non-empty list of positive numbers"):
        SAEVEvaluationArguments(probe_label_column="digit", probe_k=[0, 2])
    with pytest.raises(ValueError, match=r"probe_test_fraction=1.0 must be a fraction in \(0, 1\)"):
        SAEVEvaluationArguments(probe_test_fraction=1.0)

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r'pip install "saev-hf\[probing\]"'):
        evaluate(rows)


def test_saev_eval_refuses_probing_on_an_activation_cache_before_loading_anything(tmp_path, capsys):
    argv = ["eval", "--sae_name_or_path", str(tmp_path / "sae"), "--activation_cache", str(tmp_path / "cache"),
            "--compute_ce_loss", "False", "--probe_label_column", "digit"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Sparse probing reads each row's class from the dataset column 'digit'" in err and "holds no labels" in err
