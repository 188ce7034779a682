"""RLAIF-V and Align-Anything rows go through `saev weights`, `score`, `filter`, `dpo` and `inspect` with
`--dataset_layout`, nothing renamed by hand; the image every stage reads is the source's image."""

import datasets
import numpy as np
import pytest
import torch
from paper_datasets import align_anything_rows, rlaif_v_rows

from saev_hf import SAEV, SAEVConfig
from saev_hf.cli import main
from saev_hf.data import RowError
from saev_hf.scoring.baselines import BASELINES
from saev_hf.testing.tiny_models import build_tiny_clip

LAYOUTS = {
    # layout: (source rows, options, rows that survive the conversion)
    "rlaif_v": (lambda: rlaif_v_rows(8, seed=2), [], 8),
    "align_anything": (lambda: align_anything_rows(9, seed=2, overall=[1, 2, 2, 1, 0, 1, 2, 2, 1]),
                       ["--missing_preference", "drop"], 8),
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    for part in build_tiny_clip(seed=2):
        part.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def weighted_sae(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference-sae")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.save_pretrained(root / "sae")
    return root / "sae"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_preference_layout_goes_through_weights_score_filter_dpo_and_inspect(layout, weighted_sae, tiny_clip,
                                                                             tiny_model_factory, tmp_path):
    make_rows, options, surviving = LAYOUTS[layout]
    source = make_rows()
    source.save_to_disk(tmp_path / "data")
    llava = tiny_model_factory("llava")
    data = ["--dataset_name", str(tmp_path / "data"), "--dataset_layout", layout, *options]
    common = ["--model_name_or_path", str(llava.path), *data, "--device", "cpu"]
    assert main(["weights", "--sae_name_or_path", str(weighted_sae), *common, "--output_dir", str(tmp_path / "weighted"),
                 "--num_examples", str(surviving), "--batch_size", "4"]) == 0
    assert SAEV.from_pretrained(tmp_path / "weighted").config.feature_weights_info["num_examples"] == surviving

    assert main(["score", "--sae_name_or_path", str(tmp_path / "weighted"), *common, "--scores", "cosine", "l0",
                 "cooccur_l0", *BASELINES, "--clip_model_name_or_path", str(tiny_clip),
                 "--output_dir", str(tmp_path / "scored"), "--batch_size", "3"]) == 0
    scored = datasets.load_from_disk(str(tmp_path / "scored"))
    assert len(scored) == surviving and {"images", "prompt", "chosen", "rejected", "saev_cosine_score",
                                         *BASELINES} <= set(scored.column_names)
    assert all(value is not None for name in BASELINES for value in scored[name])
    kept_sources = [row for row in source if layout != "align_anything" or row["overall_response"] in (1, 2)]
    for original, row in zip(kept_sources, scored):  # the image is the source's, pixel for pixel
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(original["image"]))
        assert row["prompt"] == original["question"]

    assert main(["filter", "--dataset_name", str(tmp_path / "scored"), "--output_dir", str(tmp_path / "kept"),
                 "--column", "saev_cosine_score", "--fraction", "0.5"]) == 0
    kept = datasets.load_from_disk(str(tmp_path / "kept"))
    assert len(kept) == surviving // 2
    assert min(kept["saev_cosine_score"]) >= sorted(scored["saev_cosine_score"])[surviving // 2 - 1]
    assert main(["filter", "--dataset_name", str(tmp_path / "scored"), "--output_dir", str(tmp_path / "kept-clip"),
                 "--column", "clip_score", "--fraction", "0.5"]) == 0
    assert sorted(datasets.load_from_disk(str(tmp_path / "kept-clip"))["clip_score"]) == sorted(
        scored["clip_score"])[surviving // 2:]

    # DPO straight from the source layout, and from the filtered rows (already TRL's layout)
    dpo = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
           "--max_length", "128", "--save_strategy", "no", "--lora", "--use_cpu"]
    assert main(["dpo", "--model_name_or_path", str(llava.path), *data, "--output_dir", str(tmp_path / "dpo-all"),
                 *dpo]) == 0
    assert main(["dpo", "--model_name_or_path", str(llava.path), "--dataset_name", str(tmp_path / "kept"),
                 "--output_dir", str(tmp_path / "dpo-kept"), *dpo]) == 0
    assert (tmp_path / "dpo-all" / "adapter_config.json").exists()
    assert (tmp_path / "dpo-kept" / "adapter_config.json").exists()

    assert main(["inspect", "--sae_name_or_path", str(tmp_path / "weighted"), *common,
                 "--output_dir", str(tmp_path / "inspect"), "--features", "0", "--examples", "1", "--num_examples",
                 str(surviving), "--top_n", "2", "--batch_size", "4"]) == 0
    assert (tmp_path / "inspect" / "examples" / "example_1.html").exists()


def test_a_tie_under_the_default_policy_stops_the_command_naming_the_row(tiny_model_factory, weighted_sae, tmp_path):
    align_anything_rows(3, overall=[1, 0, 2]).save_to_disk(tmp_path / "data")
    with pytest.raises(RowError, match=r"Row 1: overall_response=0 states no preference"):
        main(["score", "--sae_name_or_path", str(weighted_sae), "--model_name_or_path",
              str(tiny_model_factory("llava").path), "--dataset_name", str(tmp_path / "data"), "--dataset_layout",
              "align_anything", "--device", "cpu", "--output_dir", str(tmp_path / "scored")])
    assert not (tmp_path / "scored" / "dataset_info.json").exists()  # nothing half-scored was saved


def test_column_options_a_layout_contradicts_are_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--sae_name_or_path", "x", "--model_name_or_path", "y", "--dataset_name", str(tmp_path),
              "--dataset_layout", "rlaif_v", "--image_column", "image", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "dataset_layout='rlaif_v' reads the rows into TRL's layout, whose images are in `images`, but " \
           "image_column='image'" in capsys.readouterr().err
