"""Every long step shows a tqdm progress bar, as datasets and Trainer do, and `--disable_tqdm` hides it: filling the
activation buffer (and the input-scale estimate before it), training, evaluation, feature weighting, scoring, patch
filtering and inspection, each run through its `saev` command on the tiny LLaVA."""

import datasets
import pytest
import torch

from saev_hf import SAEV, SAEVConfig
from saev_hf.cli import main
from saev_hf.testing.digit_data import digit_images


@pytest.fixture(autouse=True)
def library_bars_on():
    """Start with the libraries' bars on (some benchmarks run in-process turn datasets' off for good), then restore."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    before = (datasets.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled(),
              hub_utils.are_progress_bars_disabled())
    datasets.enable_progress_bars()
    transformers_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()
    yield
    if before[0]:
        datasets.disable_progress_bars()
    if not before[1]:
        transformers_logging.disable_progress_bar()
    if before[2]:
        hub_utils.disable_progress_bars()


@pytest.fixture(scope="module")
def folders(tiny_model_factory, tmp_path_factory):
    """The tiny LLaVA, the README's data and an SAE-V with feature weights, saved to folders."""
    root = tmp_path_factory.mktemp("progress")
    llava = tiny_model_factory("llava")
    datasets.Dataset.from_dict({
        "images": [[image] for image, _ in digit_images(6)],
        "prompt": ["What digit is this?"] * 6,
    }).save_to_disk(str(root / "data"))
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, expansion_factor=4, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.set_feature_weights(torch.linspace(-1, 1, sae.config.d_sae), info={"hand_set": True})
    sae.save_pretrained(root / "sae")
    return {"root": root, "model": str(llava.path), "data": str(root / "data"), "sae": str(root / "sae")}


def commands(f, out):
    source = ["--sae_name_or_path", f["sae"], "--model_name_or_path", f["model"], "--dataset_name", f["data"],
              "--device", "cpu"]
    return {
        "train": (["train", "--model_name_or_path", f["model"], "--dataset_name", f["data"], "--layer", "1",
                   "--output_dir", out, "--expansion_factor", "2", "--max_steps", "2", "--train_batch_size_tokens",
                   "32", "--buffer_size_tokens", "128", "--read_batch_size", "2", "--input_scale_estimation_tokens",
                   "64"],
                  ["Estimating the input scale", "Filling the activation buffer", "Training SAE-V", "2/2"]),
        "eval": (["eval", "--sae_name_or_path", f["sae"], "--model_name_or_path", f["model"], "--dataset_name",
                  f["data"], "--batch_size", "4"], ["Evaluating SAE-V", "2/2"]),
        "weights": (["weights", *source, "--output_dir", out, "--batch_size", "4"],
                    ["Feature weights: top-K pass", "Feature weights: cosine pass"]),
        "score": (["score", *source, "--output_dir", out], ["Scores", "6/6"]),
        "patches": (["patches", *source, "--output_dir", out], ["Patch filter (cosine)", "6/6"]),
        "inspect": (["inspect", *source, "--output_dir", out, "--num_explained", "1", "--top_n", "1",
                     "--max_features", "2"], ["Inspection: scanning rows"]),
    }


@pytest.mark.parametrize("command", ["train", "eval", "weights", "score", "patches", "inspect"])
def test_long_steps_show_progress_and_disable_tqdm_hides_it(folders, command, capsys):
    for quiet in (False, True):
        out = str(folders["root"] / f"{command}-{quiet}")
        argv, bars = commands(folders, out)[command]
        assert main(argv + (["--disable_tqdm"] if quiet else [])) == 0
        err = capsys.readouterr().err
        for bar in bars:
            assert (bar in err) != quiet, (command, quiet, bar, err[-2000:])
        if quiet:  # no bar at all: neither saev-hf's nor those datasets, transformers and huggingface_hub draw
            assert "%|" not in err and "it/s" not in err, err[-2000:]
    assert not datasets.are_progress_bars_disabled()  # --disable_tqdm does not outlive its command


def test_a_log_gets_one_buffer_bar_and_few_redraws_however_many_refills(folders, capsys):
    """stderr is not a terminal here (pytest captures it), as in a log file: the activation buffer's refills during
    training draw no bar of their own (only the first fill does), and bars redraw at most every LOG_INTERVAL seconds,
    so 20 steps with a refill every 2 steps write a handful of bar lines, not one per refill."""
    from saev_hf.runtime.progress import LOG_INTERVAL, _is_terminal

    assert not _is_terminal() and LOG_INTERVAL >= 10
    argv = ["train", "--model_name_or_path", folders["model"], "--dataset_name", folders["data"], "--layer", "1",
            "--output_dir", str(folders["root"] / "log-train"), "--expansion_factor", "2", "--max_steps", "20",
            "--train_batch_size_tokens", "32", "--buffer_size_tokens", "64", "--read_batch_size", "2",
            "--input_scale_estimation_tokens", "64", "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("Filling the activation buffer") <= 2, err
    training_lines = [line for line in err.replace("\r", "\n").splitlines() if "Training SAE-V" in line]
    assert 1 <= len(training_lines) <= 3 and "20/20" in training_lines[-1], training_lines
