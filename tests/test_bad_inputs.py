"""The bad-input suite (issue 13): every public entry point, from Python and from the `saev` command, walked through
inputs a new user gives. For each: a clear error that names the problem (the row, where there is one) and the fix, or
a correct result; never a silent change, never a lost file.

Entry points: `LayerReader.read`, `SAEVScorer` and `PatchFilter` (as `datasets.map` functions, raising or with
`on_error="null"`), `compute_feature_weights`, `inspect_saev`, `evaluate_saev`, `train_saev`, `filter_by_score`, and
the commands `saev score`, `patches`, `weights`, `inspect`, `eval`, `train`, `filter`. The detailed tests of each fix
live beside the module they test (test_scoring, test_delta, test_outputs, test_inputs, test_errors); this module ties
them together over the whole surface.
"""

import copy
import io
import math
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from saev_hf import (SAEV, InspectionArguments, LayerReader, PatchFilter, PatchFilterArguments, PromptFormat, SAEVConfig, SAEVScorer, SAEVTrainer, SAEVTrainingArguments, ScorerArguments, WeightingArguments, compute_feature_weights, evaluate_saev, filter_by_score, inspect_saev, train_saev)
from saev_hf.cli import main
from saev_hf.alignment import FilterArguments
from saev_hf.data import RowError
from saev_hf.testing.digit_data import digit_images

N = 6


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def good_rows(n=N, seed=3):
    return {"images": [[image] for image, _ in digit_images(n, seed=seed)], "prompt": ["What digit is this?"] * n}


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    """The tiny LLaVA, an SAE-V with feature weights and a calibrated delta (saved), and a folder for datasets."""
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=64, hook_layer=1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    compute_feature_weights(sae, LayerReader(llava.model, llava.processor, layer=1),
                            datasets.Dataset.from_dict(good_rows(8, seed=9)),
                            WeightingArguments(num_examples=None, top_k=4, per_modality=1, threshold_quantile=0.5))
    sae.save_pretrained(root / "sae")
    return llava, sae, root


# ---------------------------------------------------------------------------------------------------------------
# Row-level defects, through every Python entry point
# ---------------------------------------------------------------------------------------------------------------


def no_image_in_row_2():
    rows = good_rows()
    rows["images"][2] = []
    return datasets.Dataset.from_dict(rows), PromptFormat()


def truncated_bytes_in_row_1():
    rows = good_rows()
    encoded = [[{"bytes": png(images[0]), "path": None}] for images in rows["images"]]
    encoded[1][0]["bytes"] = encoded[1][0]["bytes"][:60]
    features = datasets.Features({"images": datasets.Sequence(datasets.Image(decode=False)),
                                  "prompt": datasets.Value("string")})
    return datasets.Dataset.from_dict({**rows, "images": encoded}, features=features), PromptFormat()


def missing_image_column():
    return datasets.Dataset.from_dict(good_rows()).rename_column("images", "picture"), PromptFormat()


def misnamed_prompt_column():
    return datasets.Dataset.from_dict(good_rows()).rename_column("prompt", "question"), PromptFormat()


def max_length_cuts_image_tokens():
    return datasets.Dataset.from_dict(good_rows()), PromptFormat(max_length=8)


ROW_CASES = {  # case -> (dataset builder, the error every entry point must give)
    "no image in row 2": (no_image_in_row_2, RowError, r"Row 2 has no image in column 'images'.*drop text-only rows"),
    "truncated bytes in row 1": (truncated_bytes_in_row_1, RowError,
                                 r"Row 1: the image could not be read \((OSError|UnidentifiedImageError|SyntaxError)"),
    "missing image column": (missing_image_column, (KeyError, ValueError),
                             r"'images'.*(not found|is not in the dataset).*image_column"),
    "misnamed prompt column": (misnamed_prompt_column, KeyError,
                               r"Column 'prompt' not found; the data has columns .*'question'.*prompt_column"),
    "max_length cuts image tokens": (max_length_cuts_image_tokens, RowError,
                                     r"Row 0: max_length=8 would cut its image tokens.*Raise max_length"),
}


def entry_points(llava, sae, tmp_path):
    """name -> run(dataset, prompt_format): each public Python entry point that reads rows."""
    model, processor = llava.model, llava.processor

    def reader(prompt_format):
        return LayerReader(model, processor, layer=1, prompt_format=prompt_format)

    return {
        "LayerReader.read": lambda ds, pf: reader(pf).read(ds[:]),
        "SAEVScorer": lambda ds, pf: ds.map(SAEVScorer(sae, model, processor, prompt_format=pf), batched=True,
                                            batch_size=4, with_indices=True, load_from_cache_file=False),
        "PatchFilter": lambda ds, pf: ds.map(PatchFilter(sae, model, processor, prompt_format=pf,
                                                         args=PatchFilterArguments(score="l0")),
                                             batched=True, batch_size=4, with_indices=True, load_from_cache_file=False),
        "compute_feature_weights": lambda ds, pf: compute_feature_weights(
            copy.deepcopy(sae), reader(pf), ds, WeightingArguments(num_examples=None, top_k=4, per_modality=1,
                                                                   batch_size=4)),
        "inspect_saev": lambda ds, pf: inspect_saev(sae, reader(pf), ds, InspectionArguments(
            num_examples=None, features=[0], num_explained=1, num_top_weighted=0, batch_size=4)),
        "evaluate_saev": lambda ds, pf: evaluate_saev(sae, model, processor, ds, prompt_format=pf, batch_size=4,
                                                      compute_ce_loss=False),
        "train_saev": lambda ds, pf: train_saev(SAEVTrainingArguments(
            output_dir=str(tmp_path / "train"), layer=1, expansion_factor=2, max_steps=2, train_batch_size_tokens=64,
            buffer_size_tokens=256, input_scale_estimation_tokens=256, read_batch_size=4, disable_tqdm=True,
            shuffle_dataset=False), model, processor, ds, prompt_format=pf),
    }


ENTRY_POINTS = ["LayerReader.read", "SAEVScorer", "PatchFilter", "compute_feature_weights", "inspect_saev",
                "evaluate_saev", "train_saev"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_defects_give_a_clear_error_at_every_entry_point(setup, tmp_path, case, entry):
    llava, sae, _ = setup
    build, error, message = ROW_CASES[case]
    ds, prompt_format = build()
    with pytest.raises(error, match=message):
        entry_points(llava, sae, tmp_path)[entry](ds, prompt_format)


@pytest.mark.parametrize("case,bad", [("no image in row 2", 2), ("truncated bytes in row 1", 1)])
@pytest.mark.parametrize("kind", ["SAEVScorer", "PatchFilter"])
def test_null_mode_costs_one_null_row_per_bad_row(setup, case, bad, kind):
    llava, sae, _ = setup
    ds, _ = ROW_CASES[case][0]()
    if kind == "SAEVScorer":
        function, column = SAEVScorer(sae, llava.model, llava.processor,
                                      args=ScorerArguments(on_error="null")), "saev_cosine_score"
    else:
        function, column = PatchFilter(sae, llava.model, llava.processor, args=PatchFilterArguments(
            score="l0", on_error="null")), "saev_patch_scores"
    out = ds.map(function, batched=True, batch_size=4, with_indices=True, load_from_cache_file=False)
    assert len(out) == N and out[column][bad] is None and out["saev_error"][bad].startswith(f"Row {bad}")
    assert all(out[column][i] is not None and out["saev_error"][i] is None for i in range(N) if i != bad)


# ---------------------------------------------------------------------------------------------------------------
# Inputs that must simply work: every PIL mode, tiny and huge images, one-row and empty datasets
# ---------------------------------------------------------------------------------------------------------------


def scores_of(setup, images):
    llava, sae, _ = setup
    scorer = SAEVScorer(sae, llava.model, llava.processor)
    return scorer.score_rows({"images": [[image] for image in images], "prompt": ["What digit is this?"] * len(images)})


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "I;16", "I", "F"])
def test_every_pil_mode_is_scored_as_its_8_bit_rgb_image(setup, mode):
    base = digit_images(1, seed=4)[0][0].convert("L")
    pixels = np.asarray(base)
    if mode == "I;16":
        image, rgb = Image.fromarray(pixels.astype(np.uint16) * 257), base.convert("RGB")  # 16-bit: v * 257
    elif mode == "I":
        image, rgb = Image.fromarray(pixels.astype(np.int32) * 257), base.convert("RGB")
    elif mode == "F":
        image, rgb = Image.fromarray(pixels.astype(np.float32) / 255), base.convert("RGB")
    else:
        image = digit_images(1, seed=4)[0][0].convert(mode)
        rgb = image.convert("RGB")
    assert image.mode == mode
    assert scores_of(setup, [image]) == scores_of(setup, [rgb])


def test_1x1_and_6000x6000_images_are_scored(setup):
    tiny = Image.new("RGB", (1, 1), (200, 30, 30))
    huge = digit_images(1, seed=4)[0][0].resize((6000, 6000))
    scores = scores_of(setup, [tiny, huge])
    assert all(math.isfinite(v) for v in scores["saev_cosine_score"] + scores["saev_l0"])
    assert scores["saev_l0"] == pytest.approx(scores_of(setup, [tiny])["saev_l0"] + scores_of(setup, [huge])["saev_l0"])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_one_row_dataset_works_everywhere(setup, tmp_path, entry):
    llava, sae, _ = setup
    ds = datasets.Dataset.from_dict(good_rows(1))
    result = entry_points(llava, sae, tmp_path)[entry](ds, PromptFormat())
    if entry in ("SAEVScorer", "PatchFilter"):
        assert len(result) == 1
    if entry == "SAEVScorer":
        assert result[0]["saev_l0"] > 0
    assert len(filter_by_score(datasets.Dataset.from_dict({"s": [0.5]}), column="s", fraction=0.5)) == 1


EMPTY_EXPECTED = {  # an empty dataset: an empty result where that is the answer, else a clear error
    "LayerReader.read": (ValueError, r"The batch holds no rows: there is nothing to read"),
    "compute_feature_weights": (ValueError, r"The dataset yielded no tokens to weight features on"),
    "inspect_saev": (ValueError, r"The dataset has no rows: there is nothing to inspect"),
    "evaluate_saev": (ValueError, r"The evaluation data gave no token: check that the dataset split has rows"),
    "train_saev": (ValueError, r"The training data has no rows .* Check that the dataset split is not empty"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_empty_dataset_gives_an_empty_result_or_a_clear_error(setup, tmp_path, entry):
    llava, sae, _ = setup
    ds = datasets.Dataset.from_dict(good_rows(1)).select([])
    run = entry_points(llava, sae, tmp_path)[entry]
    if entry in EMPTY_EXPECTED:
        error, message = EMPTY_EXPECTED[entry]
        with pytest.raises(error, match=message):
            run(ds, PromptFormat())
    else:
        out = run(ds, PromptFormat())
        assert len(out) == 0 and set(out.column_names) >= {"images", "prompt"}


# ---------------------------------------------------------------------------------------------------------------
# An SAE-V for another model or layer; fractions out of range
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,message", [
    ({"d_in": 32, "hook_layer": 1}, r"reads d_in=32 but LlavaForConditionalGeneration has hidden size 64"),
    ({"d_in": 64, "hook_layer": 9}, r"layer=9 does not exist"),
])
def test_an_sae_for_another_hidden_size_or_layer_is_refused_everywhere(setup, tmp_path, config, message):
    llava, _, root = setup
    wrong = SAEV(SAEVConfig(d_sae=64, **config))
    wrong.set_feature_weights(torch.zeros(64), info={"hand_set": True})
    ds = datasets.Dataset.from_dict(good_rows(2))
    runs = {
        "SAEVScorer": lambda: SAEVScorer(wrong, llava.model, llava.processor),
        "PatchFilter": lambda: PatchFilter(wrong, llava.model, llava.processor, args=PatchFilterArguments(score="l0")),
        "compute_feature_weights": lambda: compute_feature_weights(
            wrong, LayerReader(llava.model, llava.processor, layer=wrong.config.hook_layer), ds),
        "inspect_saev": lambda: inspect_saev(
            wrong, LayerReader(llava.model, llava.processor, layer=wrong.config.hook_layer), ds),
        "evaluate_saev": lambda: evaluate_saev(wrong, llava.model, llava.processor, ds),
    }
    for name, run in runs.items():
        with pytest.raises(ValueError, match=message):
            run()
    wrong.save_pretrained(tmp_path / "wrong")
    ds.save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        main(["score", "--sae_name_or_path", str(tmp_path / "wrong"), "--model_name_or_path", str(llava.path),
              "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, float("nan")])
def test_fractions_outside_0_1_are_refused_from_python_and_the_command_line(tmp_path, capsys, fraction):
    with pytest.raises(ValueError, match=rf"fraction={fraction} must be in \(0, 1\]"):
        FilterArguments(fraction=fraction)
    with pytest.raises(ValueError, match=rf"keep_fraction={fraction} must be in \(0, 1\]"):
        PatchFilterArguments(keep_fraction=fraction)
    datasets.Dataset.from_dict({"saev_cosine_score": [0.1, 0.2]}).save_to_disk(tmp_path / "scored")
    with pytest.raises(SystemExit) as exit_info:
        main(["filter", "--dataset_name", str(tmp_path / "scored"), "--fraction", str(fraction), "--output_dir",
              str(tmp_path / "kept")])
    assert exit_info.value.code == 2 and "must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "kept").exists()


# ---------------------------------------------------------------------------------------------------------------
# The commands: the same defects, named by dataset row; nothing written over
# ---------------------------------------------------------------------------------------------------------------


CLI_COMMANDS = ["score", "patches", "weights", "inspect", "eval", "train"]


def cli_argv(command, llava, root, data, out):
    source = ["--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path), "--dataset_name",
              str(data), "--disable_tqdm", "--batch_size", "4"]
    return {
        "score": ["score", *source, "--output_dir", str(out)],
        "patches": ["patches", *source, "--output_dir", str(out), "--score", "l0"],
        "weights": ["weights", *source[:-2], "--output_dir", str(out), "--top_k", "4", "--per_modality", "1"],
        "inspect": ["inspect", *source[:-2], "--output_dir", str(out), "--features", "0", "--num_explained", "1",
                    "--num_top_weighted", "0"],
        "eval": ["eval", *source, "--num_examples", "6"],
        "train": ["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(data), "--output_dir",
                  str(out), "--layer", "1", "--expansion_factor", "2", "--max_steps", "2", "--train_batch_size_tokens",
                  "64", "--buffer_size_tokens", "256", "--input_scale_estimation_tokens", "256", "--disable_tqdm",
                  "--shuffle_dataset", "false"],
    }[command]


@pytest.mark.parametrize("command", CLI_COMMANDS)
@pytest.mark.parametrize("case", ["no image in row 2", "truncated bytes in row 1"])
def test_commands_name_the_dataset_row_of_a_bad_input(setup, tmp_path, case, command):
    llava, _, root = setup
    build, error, message = ROW_CASES[case]
    ds, _ = build()
    if case == "truncated bytes in row 1":  # saved as users have it: a decoded datasets.Image column
        ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(tmp_path / "data")
    with pytest.raises(error, match=message):
        main(cli_argv(command, llava, root, tmp_path / "data", tmp_path / "out"))


@pytest.mark.parametrize("command", ["score", "patches", "weights", "inspect", "train"])
def test_commands_never_write_over_a_folder_they_did_not_write(setup, tmp_path, command):
    llava, _, root = setup
    datasets.Dataset.from_dict(good_rows(4)).save_to_disk(tmp_path / "data")
    precious = tmp_path / "precious"
    shutil.copytree(llava.path, precious)
    before = {p.name: p.read_bytes() for p in precious.iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds .*--overwrite_output_dir"):
        main(cli_argv(command, llava, root, tmp_path / "data", precious))
    assert {p.name: p.read_bytes() for p in precious.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C during training, then resume: nothing lost, the same SAE-V as an uninterrupted run
# ---------------------------------------------------------------------------------------------------------------


def test_ctrl_c_during_training_then_resume_gives_the_uninterrupted_run(setup, tmp_path, monkeypatch):
    llava, _, _ = setup
    ds = datasets.Dataset.from_dict(good_rows(8))

    def args(out, **extra):
        return SAEVTrainingArguments(output_dir=str(out), layer=1, expansion_factor=2, max_steps=12,
                                     train_batch_size_tokens=32, buffer_size_tokens=128, read_batch_size=4,
                                     input_scale_estimation_tokens=128, save_steps=5, save_total_limit=None,
                                     learning_rate=1e-3, disable_tqdm=True, **extra)

    uninterrupted = train_saev(args(tmp_path / "full"), llava.model, llava.processor, ds)

    calls = {"n": 0}
    forward = SAEV.forward

    def interrupted_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # in the middle of step 8, after checkpoint-5
            raise KeyboardInterrupt
        return forward(self, *a, **k)

    monkeypatch.setattr(SAEV, "forward", interrupted_forward)
    with pytest.raises(KeyboardInterrupt):
        train_saev(args(tmp_path / "run"), llava.model, llava.processor, ds)
    monkeypatch.setattr(SAEV, "forward", forward)
    assert (tmp_path / "run" / "checkpoint-5").is_dir()  # nothing lost

    # resuming into its own output_dir needs no overwrite flag
    trainer = SAEVTrainer(args(tmp_path / "run", resume_from_checkpoint="latest"), llava.model, llava.processor, ds)
    resumed = trainer.train()
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
