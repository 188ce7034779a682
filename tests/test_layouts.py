"""The paper's datasets enter unchanged: OBELICS's interleaved documents with image URLs, RLAIF-V's and
Align-Anything's preference rows, read into TRL's layout (`saev_hf.data.layouts`), by Python and by every command.

The stand-ins copy each dataset's schema exactly (`paper_datasets.py` says where each comes from); the URL images are
served by a real HTTP server on 127.0.0.1 with dead links among them.
"""

import json
import logging

import datasets
import pytest
import torch
from paper_datasets import (ALIGN_ANYTHING_TI2T_FEATURES, OBELICS_FEATURES, RLAIF_V_FEATURES, align_anything_rows,
                            obelics_documents, rlaif_v_rows)

from saev_hf import SAEV
from saev_hf.activations import Modality
from saev_hf.cache import ActivationCache
from saev_hf.cli import main
from saev_hf.data import PromptFormat, RowError, to_trl_layout
from saev_hf.data.prompts import prepare_inputs
from saev_hf.data.urls import REPORT_FILE
from saev_hf.testing.digit_data import digit_images
from saev_hf.testing.image_server import ImageServer


# ----------------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------------


def test_rlaif_v_rows_become_trl_rows_with_the_same_image_and_their_provenance():
    source = rlaif_v_rows(4)
    assert source.features == RLAIF_V_FEATURES
    converted = to_trl_layout(source, "rlaif_v")
    assert converted.features["images"] == datasets.List(datasets.Image())
    for original, row in zip(source, converted):
        assert row["prompt"] == original["question"]
        assert (row["chosen"], row["rejected"]) == (original["chosen"], original["rejected"])
        assert list(row["images"][0].getdata()) == list(original["image"].getdata())
        assert (row["idx"], row["origin_dataset"], row["image_path"]) == (
            original["idx"], original["origin_dataset"], original["image_path"])
    assert not {"image", "question"} & set(converted.column_names)


def test_align_anything_chosen_is_the_response_overall_response_names():
    source = align_anything_rows(4, overall=[1, 2, 2, 1])
    assert source.features == ALIGN_ANYTHING_TI2T_FEATURES
    converted = to_trl_layout(source, "align_anything")
    for original, row in zip(source, converted):
        better = original["overall_response"]
        assert row["chosen"] == original[f"response_{better}"]
        assert row["rejected"] == original[f"response_{3 - better}"]
        assert row["prompt"] == original["question"]
        assert row["overall_textfeedback"] == original["overall_textfeedback"]  # every other column kept
    assert converted.features["safety_rate_1"] == datasets.Value("int64")


def test_a_row_without_a_preference_is_an_error_naming_it_or_dropped_and_counted(caplog):
    source = align_anything_rows(5, overall=[1, 2, 0, 2, 3])
    with pytest.raises(RowError, match=r"Row 2: overall_response=0 states no preference.*--missing_preference drop"):
        to_trl_layout(source, "align_anything")
    with caplog.at_level(logging.WARNING, logger="saev_hf.data.layouts"):
        kept = to_trl_layout(source, "align_anything", missing_preference="drop")
    assert len(kept) == 3 and kept["res_1_from"] == ["res_1_from 0", "res_1_from 1", "res_1_from 3"]
    assert "2 of 5 rows of the align_anything layout have no preference" in caplog.text


def test_obelics_documents_become_parts_in_document_order():
    source = obelics_documents(["http://images.example/a.png", "http://images.example/b.png"], 3, without_images=1)
    assert source.features == OBELICS_FEATURES
    converted = to_trl_layout(source, "obelics")
    for original, row in zip(source, converted):
        assert row["images"] == [url for url in original["images"] if url is not None]
        assert [part["type"] for part in row["prompt"]] == [
            "image" if image is not None else "text" for image in original["images"]]
        assert [part["text"] for part in row["prompt"] if part["type"] == "text"] == [
            text for text in original["texts"] if text is not None]
        assert row["metadata"] == original["metadata"]
    assert converted[2]["images"] == []  # a document without images stays, text only


@pytest.mark.parametrize("images, texts, message", [
    (["u", None], [None], r"Row 0: `images` has 2 entries and `texts` 1"),
    (["u", None], ["both", "x"], r"Row 0: position 0 of the document holds both an image and a text"),
    ([None], [None], r"Row 0: position 0 of the document holds neither an image nor a text"),
])
def test_a_malformed_obelics_document_names_its_row_and_position(images, texts, message):
    source = datasets.Dataset.from_dict({"images": [images], "metadata": ["[]"], "general_metadata": ["{}"],
                                         "texts": [texts]}, features=OBELICS_FEATURES)
    with pytest.raises(RowError, match=message):
        to_trl_layout(source, "obelics")


def test_missing_columns_and_unknown_layouts_name_the_fix():
    with pytest.raises(KeyError, match=r"lacks the columns \['overall_response'\] of the 'align_anything' layout"):
        to_trl_layout(rlaif_v_rows(2).rename_column("question", "q").rename_column("q", "question")
                      .rename_columns({"chosen": "response_1", "rejected": "response_2"}), "align_anything")
    with pytest.raises(ValueError, match="is not a layout saev-hf reads"):
        to_trl_layout(rlaif_v_rows(2), "llava_instruct")


def test_a_stream_is_converted_as_it_is_read():
    stream = align_anything_rows(4, overall=[2, 0, 1, 1]).to_iterable_dataset()
    rows = list(to_trl_layout(stream, "align_anything", missing_preference="drop"))
    assert [row["chosen"] == row["response_1"] for row in rows] == [False, True, True]


# ----------------------------------------------------------------------------------------------------------------------
# Documents before the MLLM
# ----------------------------------------------------------------------------------------------------------------------

DOCUMENT = [{"type": "text", "text": "one two"}, {"type": "image", "text": None}, {"type": "text", "text": "three"},
            {"type": "image", "text": None}, {"type": "text", "text": "four five six"}]


def image_runs(input_ids, image_token_id):
    """(start, end) of each run of image tokens."""
    flags = (input_ids == image_token_id).tolist() + [False]
    runs, start = [], None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_a_document_is_one_sequence_with_each_image_where_it_stands(tiny_model_factory):
    llava = tiny_model_factory("llava")
    token = llava.model.config.image_token_id
    images = [image for image, _ in digit_images(2)]
    inputs = prepare_inputs(llava.processor, {"images": [images], "prompt": [DOCUMENT]}, PromptFormat(), token)
    ids = inputs["input_ids"][0]
    (first, first_end), (second, second_end) = image_runs(ids, token)
    tokenizer = llava.tokenizer
    assert tokenizer.decode(ids[:first]).split() == ["<s>", "one", "two"]
    assert tokenizer.decode(ids[first_end:second]).split() == ["three"]
    assert tokenizer.decode(ids[second_end:]).split() == ["four", "five", "six"]
    assert inputs["pixel_values"].shape[0] == 2
    # read as it stands: no chat template (no role words)
    assert "USER" not in tokenizer.decode(ids) and "ASSISTANT" not in tokenizer.decode(ids)


def test_a_long_document_is_cut_before_an_image_never_through_it(tiny_model_factory):
    llava = tiny_model_factory("llava")
    token = llava.model.config.image_token_id
    images = [image for image, _ in digit_images(2)]
    whole = prepare_inputs(llava.processor, {"images": [images], "prompt": [DOCUMENT]}, PromptFormat(), token)
    (first, first_end), (second, second_end) = image_runs(whole["input_ids"][0], token)
    for max_length in range(first_end, whole["input_ids"].shape[1]):
        cut = prepare_inputs(llava.processor, {"images": [images], "prompt": [DOCUMENT]},
                             PromptFormat(max_length=max_length), token)
        runs = image_runs(cut["input_ids"][0], token)
        assert cut["input_ids"].shape[1] <= max_length
        assert all(end - start == first_end - first for start, end in runs)  # whole images only
        assert cut["pixel_values"].shape[0] == len(runs)  # as many images as image runs
        assert len(runs) == (2 if max_length >= second_end else 1)
        assert torch.equal(cut["input_ids"][0, :second], whole["input_ids"][0, :second][:cut["input_ids"].shape[1]])


def test_documents_without_images_are_read_as_text(tiny_model_factory):
    llava = tiny_model_factory("llava")
    token = llava.model.config.image_token_id
    rows = {"images": [[], []], "prompt": [[{"type": "text", "text": "one two"}], [{"type": "text", "text": "three"}]]}
    inputs = prepare_inputs(llava.processor, rows, PromptFormat(), token)
    assert "pixel_values" not in inputs and not (inputs["input_ids"] == token).any()
    assert llava.tokenizer.decode(inputs["input_ids"][0]).split() == ["<s>", "one", "two"]


# ----------------------------------------------------------------------------------------------------------------------
# OBELICS with URL images, from the command line
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def obelics_on_a_server(tmp_path):
    with ImageServer() as server:
        urls = [server.add_image(f"d{i}.png", image) for i, (image, _) in enumerate(digit_images(4, seed=5))]
        urls.append(f"{server.url}/missing/gone.png")  # a dead link, as OBELICS has many
        obelics_documents(urls, 10, seed=1, without_images=2).save_to_disk(tmp_path / "obelics")
        yield server, tmp_path


def obelics_options(tmp_path, model_path, policy="skip_image"):
    return ["--model_name_or_path", str(model_path), "--dataset_name", str(tmp_path / "obelics"),
            "--dataset_layout", "obelics", "--allow_private_urls", "--image_cache_dir", str(tmp_path / "image-cache"),
            "--image_failure_policy", policy, "--image_fetch_retries", "0"]


def test_obelics_with_url_images_trains_an_sae_v_and_fills_a_cache_and_a_rerun_fetches_nothing(
        obelics_on_a_server, tiny_model_factory):
    server, tmp_path = obelics_on_a_server
    llava = tiny_model_factory("llava")
    options = obelics_options(tmp_path, llava.path)
    assert main(["train", *options, "--layer", "1", "--output_dir", str(tmp_path / "sae"), "--expansion_factor", "2",
                 "--max_steps", "4", "--train_batch_size_tokens", "32", "--buffer_size_tokens", "128",
                 "--read_batch_size", "4", "--input_scale_estimation_tokens", "64", "--disable_tqdm"]) == 0
    sae = SAEV.from_pretrained(tmp_path / "sae")
    assert sae.config.training_tokens == 4 * 32
    report = json.loads((tmp_path / "sae" / REPORT_FILE).read_text())
    documents = datasets.load_from_disk(str(tmp_path / "obelics"))
    urls = [url for row in documents["images"] for url in row if url is not None]
    dead = sum(url.endswith("gone.png") for url in urls)
    assert dead and report["urls"] == len(urls) and report["failed"] == dead
    assert report["failed_by_reason"] == {"http 404": dead} and report["images_dropped"] == dead
    assert report["fetched"] == len(urls) - dead - report["from_cache"]
    assert {sample["url"].rsplit("/", 1)[-1] for sample in report["failed_sample"]} == {"gone.png"}
    requests_after_training = sum(server.requests.values())

    assert main(["cache", *options, "--layer", "1", "--output_dir", str(tmp_path / "cache"), "--read_batch_size", "4",
                 "--shard_size_tokens", "2000", "--disable_tqdm"]) == 0
    assert sum(server.requests.values()) == requests_after_training  # everything, the dead link too, from the cache
    report = json.loads((tmp_path / "cache" / REPORT_FILE).read_text())
    assert (report["fetched"], report["from_cache"], report["failed"]) == (0, len(urls) - dead, dead)
    cache = ActivationCache(tmp_path / "cache")
    assert cache.num_rows == 10  # every document, the two without images too
    rows = torch.cat([shard["row"] for shard in cache.iter_shards()])
    modality = torch.cat([shard["modality"] for shard in cache.iter_shards()])
    assert set(rows.tolist()) == set(range(10))
    image, text = int(Modality.IMAGE), int(Modality.TEXT)
    assert (modality[rows >= 8] != image).all() and (modality[rows >= 8] == text).any()  # text-only documents
    assert (modality[rows < 8] == image).any()

    assert main(["eval", "--sae_name_or_path", str(tmp_path / "sae"), *options, "--output_dir", str(tmp_path / "eval"),
                 "--num_examples", "6", "--batch_size", "3", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_examples"] == 6 and (tmp_path / "eval" / REPORT_FILE).exists()
    inspect = ["inspect", "--sae_name_or_path", str(tmp_path / "sae"), *options, "--device", "cpu", "--features", "0",
               "1", "--num_explained", "0", "--top_n", "2", "--batch_size", "4"]
    assert main([*inspect, "--output_dir", str(tmp_path / "inspect"), "--num_examples", "8"]) == 0
    assert (tmp_path / "inspect" / "features" / "feature_0.html").exists()
    with pytest.raises(RowError, match=r"Row 8: no image token reached the model .*Leave rows without an image out"):
        main([*inspect, "--output_dir", str(tmp_path / "inspect-all"), "--num_examples", "10"])  # row 8: text only
    assert sum(server.requests.values()) == requests_after_training


def test_a_dead_image_url_under_the_error_policy_names_the_row_and_the_url(obelics_on_a_server, tiny_model_factory):
    _, tmp_path = obelics_on_a_server
    llava = tiny_model_factory("llava")
    with pytest.raises(RowError, match=r"Row \d+: image \d+ \(http://127\.0\.0\.1:\d+/missing/gone\.png\) could not "
                                       r"be fetched: http 404"):
        main(["cache", *obelics_options(tmp_path, llava.path, policy="error"), "--layer", "1",
              "--output_dir", str(tmp_path / "cache"), "--disable_tqdm"])


def test_without_allow_private_urls_a_loopback_url_is_refused(obelics_on_a_server, tiny_model_factory):
    server, tmp_path = obelics_on_a_server
    llava = tiny_model_factory("llava")
    options = [option for option in obelics_options(tmp_path, llava.path, policy="error")
               if option != "--allow_private_urls"]
    with pytest.raises(RowError, match=r"private address .*--allow_private_urls"):
        main(["cache", *options, "--layer", "1", "--output_dir", str(tmp_path / "cache"), "--disable_tqdm"])
    assert sum(server.requests.values()) == 0
