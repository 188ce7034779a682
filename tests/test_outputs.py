"""No command overwrites a folder holding anything but its own earlier output, unless the user asks (issue 13)."""

import hashlib
import shutil

import datasets
import pytest
import torch

from saev_hf import SAEV, SAEVConfig
from saev_hf.cli import main
from saev_hf.runtime.folders import OUTPUT_RECORD, output_owner
from saev_hf.testing.digit_data import digit_images

TRAIN_FAST = ["--layer", "1", "--expansion_factor", "2", "--max_steps", "2", "--train_batch_size_tokens", "64",
              "--buffer_size_tokens", "256", "--input_scale_estimation_tokens", "256", "--disable_tqdm"]


@pytest.fixture(scope="module")
def sources(tiny_model_factory, tmp_path_factory):
    """The tiny LLaVA's folder, a saved 4-row image-text dataset, a scored dataset, and a weighted SAE-V folder."""
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("outputs")
    rows = {"images": [[image] for image, _ in digit_images(4)], "prompt": ["What digit is this?"] * 4}
    datasets.Dataset.from_dict(rows).save_to_disk(root / "data")
    datasets.Dataset.from_dict({"saev_cosine_score": [0.3, 0.1, 0.4, 0.2]}).save_to_disk(root / "scored")
    sae = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1, cooccurrence_threshold=0.01))
    sae.set_feature_weights(torch.linspace(-1, 1, 32), info={"hand_set": True})
    sae.save_pretrained(root / "sae")
    return llava, root


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def base_model_copy(llava, folder):
    shutil.copytree(llava.path, folder)
    return digests(folder)


def test_train_refuses_a_folder_holding_the_base_model(sources, tmp_path):
    llava, root = sources
    base = tmp_path / "base"
    before = base_model_copy(llava, base)
    argv = ["train", "--model_name_or_path", str(base), "--dataset_name", str(root / "data"), "--output_dir",
            str(base)] + TRAIN_FAST
    with pytest.raises(FileExistsError, match=r"already holds files that no training run wrote \(.*config\.json.*"
                                              r"--overwrite_output_dir"):
        main(argv)
    assert digests(base) == before  # the model still loads
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(base).model_type == "llava"


def command_lines(root, llava, out):
    source = ["--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path), "--dataset_name",
              str(root / "data"), "--output_dir", str(out), "--disable_tqdm"]
    return {
        "convert": ["convert", "--sae_name_or_path", str(root / "sae"), "--output_dir", str(out)],
        "weights": ["weights", *source, "--per_modality", "1", "--top_k", "4"],
        "score": ["score", *source],
        "patches": ["patches", *source, "--score", "l0"],
        "inspect": ["inspect", *source, "--features", "0", "--num_explained", "1", "--num_top_weighted", "0"],
        "filter": ["filter", "--dataset_name", str(root / "scored"), "--fraction", "0.5", "--output_dir", str(out)],
    }


@pytest.mark.parametrize("command", ["convert", "weights", "score", "patches", "inspect", "filter"])
def test_commands_refuse_a_foreign_folder_unless_asked_and_may_rewrite_their_own(sources, tmp_path, command):
    llava, root = sources
    out = tmp_path / "out"
    before = base_model_copy(llava, out)
    argv = command_lines(root, llava, out)[command]
    with pytest.raises(FileExistsError, match=r"already holds files that `.*` did not write \(.*config\.json.*\); "
                                              r"writing there could replace them.*--overwrite_output_dir"):
        main(argv)
    assert digests(out) == before

    assert main(argv + ["--overwrite_output_dir"]) == 0  # asked for
    assert output_owner(out) is not None
    assert main(argv) == 0  # its own earlier output: written again without asking

    other = tmp_path / "other"
    assert main(command_lines(root, llava, other)["convert"]) == 0
    if command != "convert":  # another command's output is not this command's own
        with pytest.raises(FileExistsError, match=r"already holds the output of `saev convert`"):
            main(command_lines(root, llava, other)[command])


def test_write_feature_browser_keeps_an_existing_index_html(sources, tmp_path):
    from saev_hf import InspectionArguments, LayerReader, inspect_saev, write_feature_browser

    llava, root = sources
    sae = SAEV.from_pretrained(root / "sae")
    reader = LayerReader(llava.model, llava.processor, layer=1)
    inspection = inspect_saev(sae, reader, datasets.load_from_disk(str(root / "data")),
                              InspectionArguments(features=[0], num_explained=1, num_top_weighted=0, num_examples=None))
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>my site</h1>")
    with pytest.raises(FileExistsError, match=r"already holds files that `write_feature_browser` did not write "
                                              r"\(index\.html\)"):
        write_feature_browser(inspection, site)
    assert (site / "index.html").read_text() == "<h1>my site</h1>" and not (site / OUTPUT_RECORD).exists()
    index = write_feature_browser(inspection, site, overwrite=True)
    assert "my site" not in index.read_text()
    assert write_feature_browser(inspection, site) == index  # its own earlier report
    assert write_feature_browser(inspection, tmp_path / "new") == tmp_path / "new" / "index.html"
