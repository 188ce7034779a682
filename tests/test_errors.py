"""Errors that say what happened: the row, the value and the fix (issue 13, item 6)."""

import json
import os
import pickle
import weakref

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file

from saev_hf import SAEV, SAEVConfig, SAEVScorer, ScorerArguments
from saev_hf.activations import LayerReader
from saev_hf.alignment import FilterArguments, filter_by_score
from saev_hf.data import RowError
from saev_hf.testing.digit_data import digit_images
from saev_hf.weighting import WeightingArguments, compute_feature_weights


def rows(n, seed=0):
    return {"images": [[image] for image, _ in digit_images(n, seed=seed)], "prompt": ["what digit is this?"] * n}


@pytest.fixture(scope="module")
def llava(tiny_model_factory):
    return tiny_model_factory("llava")


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors") / "sae"
    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1, cooccurrence_threshold=0.0))
    sae.save_pretrained(folder)
    return folder


def test_saelens_config_without_d_in_names_the_key_and_the_fix(tmp_path):
    SAEV(SAEVConfig(d_in=16, d_sae=32, hook_layer=1)).save_saelens(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.pop("d_in")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"This SAELens cfg.json has no d_in \(it has \[.*\]\): the sizes of the SAE "
                                         r"are required. Add \"d_in\""):
        SAEV.from_pretrained(tmp_path)


def test_checkpoint_missing_a_tensor_is_refused_not_initialised(tmp_path):
    SAEV(SAEVConfig(d_in=16, d_sae=32, hook_layer=1)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("b_enc")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"lack \['b_enc'\] \(they hold \[.*\]\): an SAE-V needs all of \['W_enc', "
                                      r"'b_enc', 'W_dec', 'b_dec'\], and loading would silently set the missing ones"):
        SAEV.from_pretrained(tmp_path)


def test_empty_batch_adds_empty_columns_and_reading_nothing_is_a_clear_error(llava, saved_sae):
    scorer = SAEVScorer(str(saved_sae), str(llava.path), args=ScorerArguments(scores=["l0"]))
    assert scorer({"images": [], "prompt": []}) == {"saev_l0": []}
    assert len(datasets.Dataset.from_dict(rows(2)).select([]).map(scorer, batched=True)) == 0
    reader = LayerReader(llava.model, llava.processor, layer=1)
    with pytest.raises(ValueError, match=r"The batch holds no rows: there is nothing to read"):
        reader.read({"images": [], "prompt": []})


def test_map_without_batched_says_to_pass_batched(llava, saved_sae):
    scorer = SAEVScorer(str(saved_sae), str(llava.path), args=ScorerArguments(scores=["l0"]))
    with pytest.raises(TypeError, match=r"scores batches of rows, but it was given a single row .* Call "
                                        r"ds.map\(scorer, batched=True, batch_size=8\)"):
        datasets.Dataset.from_dict(rows(2)).map(scorer)


def test_weighting_streams_an_iterable_dataset(llava):
    reader = LayerReader(llava.model, llava.processor, layer=1)
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1, cooccurrence_threshold=0.0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    ds = datasets.Dataset.from_dict(rows(6))
    args = WeightingArguments(num_examples=None, top_k=4, per_modality=1, batch_size=4)
    indexed = compute_feature_weights(sae, reader, ds, args, store=False)
    streamed = compute_feature_weights(sae, reader, ds.to_iterable_dataset(), args, store=False)
    assert torch.equal(indexed.isnan(), streamed.isnan()) and (~indexed.isnan()).any()
    assert torch.allclose(indexed.nan_to_num(), streamed.nan_to_num(), atol=1e-6)
    first_four = compute_feature_weights(sae, reader, ds.select(range(4)), args, store=False)
    limited = compute_feature_weights(sae, reader, ds.to_iterable_dataset(),
                                      WeightingArguments(**{**args.__dict__, "num_examples": 4}), store=False)
    assert torch.allclose(first_four.nan_to_num(), limited.nan_to_num(), atol=1e-6)
    with pytest.raises(TypeError, match=r"reads its data twice .* a generator can be read only once"):
        compute_feature_weights(sae, reader, (row for row in ds), args)


def test_weighting_error_names_the_dataset_row_of_a_sample(llava):
    reader = LayerReader(llava.model, llava.processor, layer=1)
    data = rows(10)
    data["images"][5] = []
    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1))
    args = WeightingArguments(num_examples=5, top_k=4, per_modality=1, batch_size=8, seed=1)
    sample = sorted(torch.randperm(10, generator=torch.Generator().manual_seed(1))[:5].tolist())
    assert sample == [0, 1, 2, 5, 6]  # row 5 is read 4th: counting positions would name row 3
    with pytest.raises(RowError, match=r"^Row 5 has no image in column 'images'"):
        compute_feature_weights(sae, reader, datasets.Dataset.from_dict(data), args)


def test_training_error_names_the_dataset_row_not_the_reading_position(tmp_path):
    from saev_hf import SAEVTrainingArguments, train_saev
    from saev_hf.testing.tiny_models import build_tiny_model

    model, processor = build_tiny_model("llava")
    data = rows(6)
    data["images"][1] = []
    args = SAEVTrainingArguments(output_dir=str(tmp_path / "out"), layer=1, expansion_factor=2, max_steps=2,
                                 train_batch_size_tokens=64, buffer_size_tokens=256,
                                 input_scale_estimation_tokens=256, disable_tqdm=True)
    with pytest.raises(RowError, match=r"^Row 1 has no image in column 'images'.*Row numbers are indices in the data"):
        train_saev(args, model=model, processor=processor, dataset=datasets.Dataset.from_dict(data))


def test_scorer_restored_in_another_working_directory_finds_its_folders(llava, saved_sae, tmp_path, monkeypatch):
    import saev_hf.scoring.map_function as scoring

    monkeypatch.chdir(saved_sae.parent)
    scorer = SAEVScorer("sae", os.path.relpath(llava.path), args=ScorerArguments(scores=["l0"]))
    expected = scorer(rows(2))["saev_l0"]
    payload = pickle.dumps(scorer)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scoring, "_LIVE", weakref.WeakValueDictionary())  # a fresh process
    restored = pickle.loads(payload)
    assert restored._sae_source == str(saved_sae)
    assert restored(rows(2))["saev_l0"] == pytest.approx(expected)


def test_a_local_path_with_a_typo_says_that_the_folder_does_not_exist():
    from saev_hf.data import load_dataset_split
    from saev_hf.activations import load_model_and_processor

    for load, what in ((SAEV.from_pretrained, "SAE-V"), (load_model_and_processor, "model"),
                       (load_dataset_split, "dataset")):
        with pytest.raises(FileNotFoundError, match=rf"The {what} folder './nope' does not exist \(looked for "
                                                    rf"/.*nope\). Check the path"):
            load("./nope")


def test_filter_refuses_args_mixed_with_keywords():
    ds = datasets.Dataset.from_dict({"saev_cosine_score": [0.1, 0.3, 0.2, 0.4]})
    with pytest.raises(TypeError, match=r"got both args= and keyword arguments \['fraction'\]; the keywords would be "
                                        r"ignored"):
        filter_by_score(ds, FilterArguments(fraction=0.5), fraction=0.25)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": -1}, {"num_examples": 0}])
def test_evaluate_saev_refuses_non_positive_sizes(llava, bad):
    from saev_hf import evaluate_saev

    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1))
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"{name}={value} must be a positive number"):
        evaluate_saev(sae, llava.model, llava.processor, datasets.Dataset.from_dict(rows(2)), **bad)
