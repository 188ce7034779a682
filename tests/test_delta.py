"""The co-occurrence bound delta: detected when nothing can co-occur, calibrated on data on request, set from the CLI,
and what follows from all-zero scores (issue 13: the README's CLI flow gave every row a score of 0 without a word)."""

import json
import warnings

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file

from saev_hf import SAEV, SAEVConfig
from saev_hf.cli import main
from saev_hf.alignment import filter_by_score
from saev_hf.testing.digit_data import digit_images

TRAIN_FAST = ["--layer", "1", "--expansion_factor", "2", "--max_steps", "4", "--train_batch_size_tokens", "64",
              "--buffer_size_tokens", "256", "--input_scale_estimation_tokens", "256", "--disable_tqdm"]


@pytest.fixture(scope="module")
def flow(tiny_model_factory, tmp_path_factory):
    """The README's CLI flow up to `saev train` on the tiny LLaVA: its folder, the data, and the trained SAE-V."""
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("delta")
    n = 16
    datasets.Dataset.from_dict({
        "images": [[image] for image, _ in digit_images(n)],
        "prompt": ["What digit is this?"] * n,
        "chosen": ["A handwritten digit."] * n,
        "rejected": ["A photo of a cat."] * n,
    }).save_to_disk(root / "prefs")
    assert main(["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(root / "prefs"),
                 "--output_dir", str(root / "saev-new")] + TRAIN_FAST) == 0
    return llava, root


def source_args(llava, root, sae, out):
    return ["--sae_name_or_path", str(root / sae), "--model_name_or_path", str(llava.path), "--dataset_name",
            str(root / "prefs"), "--output_dir", str(root / out), "--disable_tqdm"]


def test_readme_flow_with_the_default_delta_stops_with_the_numbers_and_the_fix(flow):
    llava, root = flow
    assert SAEV.from_pretrained(root / "saev-new").config.cooccurrence_threshold == 1.0  # the default is kept
    with pytest.warns(UserWarning, match=r"While computing the feature weights: with cooccurrence_threshold \(delta\) "
                                         r"= 1, no feature of this SAE-V can co-occur: on the 16 weighting examples "
                                         r"the largest activation .* is 0\.\d+.*--threshold_quantile"):
        assert main(["weights", *source_args(llava, root, "saev-new", "saev-w")]) == 0
    weighted = SAEV.from_pretrained(root / "saev-w")  # the weights are kept: they do not depend on delta
    bound = weighted.config.feature_weights_info["cooccurrence_bound_max"]
    assert 0 < bound < 1.0 and weighted.has_feature_weight.any()
    with pytest.raises(ValueError, match=rf"While starting SAEVScorer: with cooccurrence_threshold \(delta\) = 1, no "
                                         rf"feature .* is {bound:.4g}, so every cosine score and co-occurring L0 would "
                                         rf"be 0\. Set a delta below {bound:.4g}.*--cooccurrence_threshold"):
        main(["score", *source_args(llava, root, "saev-w", "scored-default")])


def test_calibrated_delta_gives_meaningful_scores_and_records_its_provenance(flow):
    llava, root = flow
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a calibrated delta leaves features that co-occur: no warning
        assert main(["weights", *source_args(llava, root, "saev-new", "saev-cal"), "--threshold_quantile", "0.5"]) == 0
    sae = SAEV.from_pretrained(root / "saev-cal")
    info = sae.config.cooccurrence_threshold_info
    assert info["method"] == "quantile of the SAE-V's positive activations on the weighting data"
    assert info["quantile"] == 0.5 and info["previous"] == 1.0 and info["num_examples"] == 16
    assert info["num_positive_activations"] >= info["num_sampled"] > 0
    assert 0 < sae.config.cooccurrence_threshold < sae.config.feature_weights_info["cooccurrence_bound_max"]
    assert main(["score", *source_args(llava, root, "saev-cal", "scored")]) == 0
    scored = datasets.load_from_disk(str(root / "scored"))
    assert min(scored["saev_cooccur_l0"]) > 0 and len(set(scored["saev_cosine_score"])) > 1
    assert main(["filter", "--dataset_name", str(root / "scored"), "--fraction", "0.5", "--output_dir",
                 str(root / "best-half")]) == 0
    kept = datasets.load_from_disk(str(root / "best-half"))
    assert len(kept) == 8 and min(kept["saev_cosine_score"]) >= sorted(scored["saev_cosine_score"])[8]


def test_delta_set_from_the_command_line_is_used_and_recorded(flow):
    llava, root = flow
    assert main(["weights", *source_args(llava, root, "saev-new", "saev-set"), "--cooccurrence_threshold", "0.01"]) == 0
    sae = SAEV.from_pretrained(root / "saev-set")
    assert sae.config.cooccurrence_threshold == 0.01
    assert sae.config.cooccurrence_threshold_info == {"method": "set with --cooccurrence_threshold", "previous": 1.0}
    with pytest.raises(ValueError, match=r"Give either --cooccurrence_threshold 0.01 \(set delta\) or "
                                         r"--threshold_quantile 0.5"):
        main(["weights", *source_args(llava, root, "saev-new", "saev-both"), "--cooccurrence_threshold", "0.01",
              "--threshold_quantile", "0.5"])
    # `saev score --cooccurrence_threshold` overrides the saved delta for that run
    assert main(["score", *source_args(llava, root, "saev-set", "scored-set"), "--cooccurrence_threshold", "0.02"]) == 0
    assert min(datasets.load_from_disk(str(root / "scored-set"))["saev_cooccur_l0"]) > 0


def test_filter_refuses_a_column_whose_values_all_tie():
    ds = datasets.Dataset.from_dict({"saev_cosine_score": [0.0] * 16})
    with pytest.raises(ValueError, match=r"All 16 scored rows have the same 'saev_cosine_score' \(0\), so the top "
                                         r"fraction=0.5 cannot be chosen by score: it would be the first 8 rows by "
                                         r"index.*--cooccurrence_threshold"):
        filter_by_score(ds, fraction=0.5)
    assert len(filter_by_score(ds, fraction=1.0)) == 16  # keeping every row needs no ranking
    assert len(filter_by_score(ds, threshold=0.0)) == 16  # a threshold is a rule, not a ranking


@pytest.mark.parametrize("layout", ["saev", "saelens"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, layout, bad):
    sae = SAEV(SAEVConfig(d_in=16, d_sae=32, hook_layer=1))
    if layout == "saev":
        sae.save_pretrained(tmp_path)
        name, key = "model.safetensors", "b_enc"
    else:
        sae.save_saelens(tmp_path)
        name, key = "sae_weights.safetensors", "b_enc"
    tensors = load_file(tmp_path / name)
    tensors[key][3] = bad
    save_file(tensors, tmp_path / name, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"The SAE-V's b_enc holds 1 NaN or inf values \(first at index \(3,\)\): it "
                                         r"would encode NaN and score every row 0"):
        SAEV.from_pretrained(tmp_path)


def test_scorer_refuses_an_sae_with_nan_weights_in_memory(tiny_model_factory):
    from saev_hf import SAEVScorer, ScorerArguments

    llava = tiny_model_factory("llava")
    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1))
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"W_enc holds 1 NaN or inf values"):
        SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(scores=["l0"]))


def test_config_records_the_provenance_of_delta(tmp_path):
    sae = SAEV(SAEVConfig(d_in=16, d_sae=32))
    assert sae.config.cooccurrence_threshold == 1.0 and sae.config.cooccurrence_threshold_info is None
    sae.set_cooccurrence_threshold(0.2, info={"method": "chosen by hand"})
    sae.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["cooccurrence_threshold"] == 0.2
    assert saved["cooccurrence_threshold_info"] == {"method": "chosen by hand", "previous": 1.0}
    with pytest.raises(ValueError, match=r"cooccurrence_threshold=-1 must be a finite number >= 0.0"):
        sae.set_cooccurrence_threshold(-1)


def test_a_delta_that_almost_nothing_reaches_warns_with_the_numbers(flow):
    from saev_hf import SAEVScorer

    llava, root = flow
    sae = SAEV.from_pretrained(root / "saev-cal")
    info = sae.config.feature_weights_info
    p99, bound = info["cooccurrence_bound_percentiles"][99], info["cooccurrence_bound_max"]
    assert p99 < bound
    sae.set_cooccurrence_threshold(p99)
    with pytest.warns(UserWarning, match=rf"While starting SAEVScorer: with cooccurrence_threshold \(delta\) = "
                                         rf"{p99:.4g}, at most 1% of the {info['num_bimodal_features']} features that "
                                         rf"fire on both text and image positions reach it"):
        SAEVScorer(sae, llava.model, llava.processor)
