"""Hub cards: an SAE-V and a filtered dataset go to the Hub with cards that say where they came from.

Round trips run against the loopback Hub (`tests/hub_server.py`) with the real huggingface_hub, transformers and
datasets clients: push, then read back the weights, the rows and the cards (metadata and body), and validate the cards
through the server's /api/validate-yaml.
"""

import importlib.resources
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard

from saev_hf import (SAEV, FilterArguments, LayerReader, SAEVConfig, SAEVScorer, compute_feature_weights, evaluate_saev, filter_by_score, format_metrics_table)
from saev_hf.cli import main
from saev_hf.hub import (CITATION, HISTOGRAM_FILE, MODEL_CARD_TEMPLATE, DATASET_CARD_TEMPLATE, filtered_dataset_card, load_saev_config, push_filtered_dataset, push_saev, saev_model_card, template_text, text_histogram)
from saev_hf.scoring import ScorerArguments
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.weighting import WeightingArguments

ROOT = Path(__file__).resolve().parent.parent
NUM_ROWS = 12


@pytest.fixture(scope="module")
def pipeline(tiny_model_factory):
    """The whole flow on the tiny LLaVA: an SAE-V with real feature weights, its metrics, scored and kept rows."""
    llava = tiny_model_factory("llava")
    digits = digit_images(NUM_ROWS, seed=5)
    rows = datasets.Dataset.from_dict({
        "images": [[image] for image, _ in digits],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[label]}?" for _, label in digits],
        "chosen": [f"it is the digit {DIGIT_NAMES[label]} ." for _, label in digits],
        "rejected": [f"it is the digit {DIGIT_NAMES[(label + 1) % 10]} ." for _, label in digits],
    })
    torch.manual_seed(0)
    # The tiny model stands in for a Hub model: the config names the repo it would come from.
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=0.05,
                          base_model_name_or_path="org/tiny-llava", base_model_revision="0123abcd",
                          dataset_name="org/digit-captions", training_tokens=4096))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    compute_feature_weights(sae, LayerReader(llava.model, llava.processor, layer=1), rows,
                            WeightingArguments(num_examples=None, batch_size=6))
    sae.config.feature_weights_info["dataset"] = "org/digit-prefs"
    metrics = evaluate_saev(sae, llava.model, llava.processor, rows, batch_size=6)
    scored = rows.map(SAEVScorer(sae, llava.model, llava.processor), batched=True, batch_size=6)
    filter_args = FilterArguments(column="saev_cosine_score", fraction=0.5)
    kept = filter_by_score(scored, filter_args)
    return {"sae": sae, "metrics": metrics, "scored": scored, "kept": kept, "filter_args": filter_args}


def test_templates_are_package_data_of_saev_hf_hub_read_from_inside_the_package():
    for name in (MODEL_CARD_TEMPLATE, DATASET_CARD_TEMPLATE):
        canonical = (ROOT / "saev_hf" / "hub" / "card_templates" / name).read_text(encoding="utf-8")
        assert template_text(name) == canonical
        packaged = importlib.resources.files("saev_hf.hub").joinpath("card_templates", name)
        assert packaged.read_text(encoding="utf-8") == canonical


def test_push_saev_uploads_weights_and_card_in_one_commit_and_both_read_back(loopback_hub, pipeline):
    sae, metrics = pipeline["sae"], pipeline["metrics"]
    commit = push_saev(sae, "org/saev-tiny", metrics=metrics, license="apache-2.0", eval_dataset="org/digit-prefs",
                       tags=["llava"])
    validated = [i for i, line in enumerate(loopback_hub.log) if "/api/validate-yaml" in line]
    committed = [i for i, line in enumerate(loopback_hub.log) if "/commit/main" in line]
    assert validated and committed and validated[0] < committed[0]  # the card is checked before anything is uploaded
    repo = loopback_hub.repo("org/saev-tiny")
    assert len(repo.commits) == 2 and repo.commits[-1].id == commit.oid  # the repo's first commit, then ours
    assert set(loopback_hub.files("org/saev-tiny")) == {".gitattributes", "config.json", "model.safetensors",
                                                       "README.md"}

    card = ModelCard.load("org/saev-tiny")
    card.validate()
    data = card.data
    assert data.library_name == "saev-hf" and data.license == "apache-2.0"
    assert data.base_model == "org/tiny-llava"
    assert data.datasets == ["org/digit-captions", "org/digit-prefs"]
    assert data.tags == ["saev", "sparse-autoencoder", "interpretability", "multimodal", "llava"]
    assert data.get("pipeline_tag") is None
    l0 = next(r for r in data.eval_results if r.metric_type == "l0")
    assert l0.metric_value == pytest.approx(metrics["all"]["l0"]) and l0.dataset_type == "org/digit-prefs"

    text = card.text
    assert "| Layer | 1: the residual stream after decoder layer 1" in text
    assert "| d_sae | 96 (1.50 x d_in) |" in text and "| d_in | 64 |" in text
    assert "revision `0123abcd`" in text and "4,096 tokens" in text
    assert format_metrics_table(metrics) in text  # every metric value, as evaluate_saev's table
    weighted = int(sae.has_feature_weight.sum())
    assert f"for {weighted} of its 96" in text and f"| Weighted features | {weighted} |" in text
    assert "| Top activating positions kept per feature (K) | 30 |" in text
    assert f"{NUM_ROWS} examples" in text
    assert 'SAEV.from_pretrained("org/saev-tiny")' in text and "filter_by_score(" in text
    assert CITATION in text and "volume    = {267}" in text

    loaded = SAEV.from_pretrained("org/saev-tiny")
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True)
    assert loaded.config.feature_weights_info == sae.config.feature_weights_info


def test_card_of_an_sae_without_metrics_or_weights_says_so_and_is_valid(loopback_hub):
    sae = SAEV(SAEVConfig(d_in=16, d_sae=64, hook_layer=3, base_model_name_or_path="/local/checkpoints/mllm",
                          activation="topk", k=8))
    card = saev_model_card(sae)
    card.validate()
    data = card.data.to_dict()
    assert "base_model" not in data and "datasets" not in data and "license" not in data  # a local path is no repo id
    assert "model-index" not in data
    assert "Not evaluated yet" in card.text and "Not computed: the cosine score needs them" in card.text
    assert "TopK, k = 8" in card.text and "| d_sae | 64 (4 x d_in) |" in card.text
    assert "compute_feature_weights(sae, LayerReader(model, processor, layer=3), ds)" in card.text


def test_push_filtered_dataset_rows_scores_and_card_read_back(loopback_hub, pipeline):
    scored, kept, filter_args = pipeline["scored"], pipeline["kept"], pipeline["filter_args"]
    push_filtered_dataset(
        kept, "org/digit-prefs-saev", scored=scored, filter_args=filter_args, source_dataset="org/digit-prefs",
        source_revision="fedcba98", sae_repo="org/saev-tiny", sae_config=pipeline["sae"].config,
        scorer_args=ScorerArguments(), license="cc-by-4.0", tags=["dpo"],
    )
    files = loopback_hub.files("org/digit-prefs-saev", repo_type="dataset")
    assert files[HISTOGRAM_FILE].startswith(b"\x89PNG\r\n\x1a\n")

    loaded = datasets.load_dataset("org/digit-prefs-saev", split="train")
    assert len(loaded) == len(kept) == NUM_ROWS // 2
    assert loaded.column_names == kept.column_names
    for column in ("prompt", "chosen", "rejected", "saev_cosine_score", "saev_l0", "saev_cooccur_l0"):
        assert loaded[column] == kept[column]
    assert [row[0].size for row in loaded["images"]] == [row[0].size for row in kept["images"]]

    card = DatasetCard.load("org/digit-prefs-saev")
    card.validate()
    data = card.data
    assert data.license == "cc-by-4.0" and data.tags == ["saev", "data-filtering", "dpo"]
    assert data.source_datasets == ["extended|org/digit-prefs"]
    assert data.task_categories == ["image-text-to-text"] and data.size_categories == ["n<1K"]
    assert data.configs and data.dataset_info  # written by datasets and kept: load_dataset above relied on them
    text = card.text
    assert "| Rows before | 12 |" in text and "| Rows after | 6 (50.0% kept) |" in text
    assert "the top 50% of rows by `saev_cosine_score`" in text
    assert "revision `fedcba98`" in text and "[`org/saev-tiny`](https://huggingface.co/org/saev-tiny)" in text
    assert "| Co-occurrence bound delta | 0.05 |" in text
    lowest = min(kept["saev_cosine_score"])
    assert f"| Lowest kept score | {lowest + 0.0:.4g} |" in text
    assert f"| mean | {np.mean(scored['saev_cosine_score']):.4g} | {np.mean(kept['saev_cosine_score']):.4g} |" in text
    assert f"]({HISTOGRAM_FILE})" in text
    assert text_histogram(scored["saev_cosine_score"], kept["saev_cosine_score"]) in text


def test_saev_push_command_pushes_an_sae_folder_and_a_filtered_dataset_folder(loopback_hub, pipeline, tmp_path,
                                                                               capsys):
    pipeline["sae"].save_pretrained(tmp_path / "sae")
    (tmp_path / "metrics.json").write_text(json.dumps(pipeline["metrics"]))
    assert main(["push", "--sae", str(tmp_path / "sae"), "--repo_id", "org/cli-saev",
                 "--metrics_json", str(tmp_path / "metrics.json"), "--license", "mit"]) == 0
    card = ModelCard.load("org/cli-saev")
    assert card.data.license == "mit" and card.data.base_model == "org/tiny-llava"
    assert format_metrics_table(pipeline["metrics"]) in card.text
    assert torch.equal(SAEV.from_pretrained("org/cli-saev").W_enc, pipeline["sae"].W_enc)

    pipeline["scored"].save_to_disk(tmp_path / "scored")
    pipeline["kept"].save_to_disk(tmp_path / "kept")
    assert main(["push", "--dataset", str(tmp_path / "kept"), "--scored_dataset", str(tmp_path / "scored"),
                 "--repo_id", "org/cli-ds", "--source_dataset", "org/digit-prefs", "--sae_repo", "org/cli-saev",
                 "--source_split", "train"]) == 0
    assert "Pushed 6 rows" in capsys.readouterr().out
    pulled = datasets.load_dataset("org/cli-ds", split="train")
    assert pulled["saev_cosine_score"] == pipeline["kept"]["saev_cosine_score"]
    text = DatasetCard.load("org/cli-ds").text
    assert "| Rows before | 12 |" in text and "| Rows after | 6 (50.0% kept) |" in text
    assert "[`org/tiny-llava`](https://huggingface.co/org/tiny-llava), decoder layer 1" in text  # from --sae_repo
    assert "split `train`" in text


def test_saev_filter_records_its_rule_and_saev_push_states_it(loopback_hub, pipeline, tmp_path, capsys):
    pipeline["scored"].save_to_disk(tmp_path / "scored")
    assert main(["filter", "--dataset_name", str(tmp_path / "scored"), "--column", "saev_cooccur_l0",
                 "--fraction", "0.25", "--output_dir", str(tmp_path / "quarter")]) == 0
    record = json.loads((tmp_path / "quarter" / "saev_filter.json").read_text())
    assert record["column"] == "saev_cooccur_l0" and record["fraction"] == 0.25
    assert main(["push", "--dataset", str(tmp_path / "quarter"), "--scored_dataset", str(tmp_path / "scored"),
                 "--repo_id", "org/cli-quarter", "--source_dataset", "org/digit-prefs"]) == 0
    text = DatasetCard.load("org/cli-quarter").text
    assert "the top 25% of rows by `saev_cooccur_l0`" in text  # the rule, not only the observed kept fraction
    assert "| Rows after | 3 (25.0% kept) |" in text


@pytest.mark.parametrize("argv, message", [
    (["--repo_id", "org/x"], "Give exactly one of --sae"),
    (["--repo_id", "org/x", "--sae", "a", "--dataset", "b"], "Give exactly one of --sae"),
    (["--repo_id", "org/x", "--dataset", "b"], "--dataset needs --source_dataset"),
    (["--repo_id", "org/x", "--sae", "a", "--source_dataset", "o/d"], "--source_dataset does not apply"),
    (["--repo_id", "org/x", "--sae", "a", "--sae_repo", "o/s", "--split", "test", "--source_split", "test"],
     "--source_split, --sae_repo do not apply when pushing an SAE-V"),
    (["--repo_id", "org/x", "--dataset", "b", "--source_dataset", "o/d", "--metrics_json", "m"],
     "--metrics_json does not apply when pushing a dataset"),
])
def test_saev_push_rejects_mixed_or_missing_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_load_saev_config_reads_either_layout_without_the_weights(tmp_path):
    sae = SAEV(SAEVConfig(d_in=8, d_sae=24, hook_layer=2, base_model_name_or_path="org/mllm",
                          cooccurrence_threshold=0.5))
    sae.save_pretrained(tmp_path / "saev")
    sae.save_saelens(tmp_path / "saelens")
    for folder in ("saev", "saelens"):
        config = load_saev_config(str(tmp_path / folder))
        assert (config.d_sae, config.hook_layer, config.base_model_name_or_path) == (24, 2, "org/mllm")
        assert config.cooccurrence_threshold == 0.5


def test_dataset_card_names_a_missing_score_column():
    kept = datasets.Dataset.from_dict({"prompt": ["a"], "score": [1.0]})
    with pytest.raises(KeyError, match=r"Score column 'saev_cosine_score' not found.*columns \['prompt', 'score'\]"):
        filtered_dataset_card(kept, source_dataset="org/data")


def test_dataset_card_without_the_scored_rows_describes_the_kept_rows_only():
    kept = datasets.Dataset.from_dict({"prompt": list("abcd"), "saev_l0": [3.0, 1.0, None, 2.0]})
    card = filtered_dataset_card(kept, source_dataset="/data/local-prefs", column="saev_l0")
    assert "source_datasets" not in card.data.to_dict()  # a local folder is not a Hub dataset
    assert "| Rows before | not recorded |" in card.text and "| Rows without a score | 1 |" in card.text
    assert "| `saev_l0` | kept rows |" in card.text and "| max | 3 |" in card.text
    assert "the mean number of active SAE-V features per token" in card.text


def test_text_histogram_counts_every_finite_score_and_the_kept_ones():
    scores = [0.0, 0.1, 0.2, 0.9, 1.0, None, float("nan")]
    lines = text_histogram(scores, kept=[0.9, 1.0], bins=4).splitlines()
    assert len(lines) == 5  # header + 4 bins
    rows = [int(line.split()[-2]) for line in lines[1:]]
    kept = [int(line.split()[-1]) for line in lines[1:]]
    assert sum(rows) == 5 and sum(kept) == 2 and kept[-1] == 2
    assert lines[-1].startswith("[0.75, 1]")


def test_saev_push_refuses_a_metrics_file_that_lacks_what_the_card_needs(loopback_hub, pipeline, tmp_path):
    pipeline["sae"].save_pretrained(tmp_path / "sae")
    push = ["push", "--sae", str(tmp_path / "sae"), "--repo_id", "org/bad-metrics", "--metrics_json"]
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty\.json: The metrics lack model, layer, .*, all, text, image: .*"
                                         r"saev eval \.\.\. --output_dir DIR` \(DIR/metrics\.json\)"):
        main([*push, str(tmp_path / "empty.json")])
    partial = json.loads(json.dumps(pipeline["metrics"]))
    del partial["all"]["mse"], partial["num_examples"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(ValueError, match=r"The metrics lack num_examples, all\.mse:"):
        main([*push, str(tmp_path / "partial.json")])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: Expecting property name"):
        main([*push, str(tmp_path / "broken.json")])
    with pytest.raises(FileNotFoundError, match=r"missing\.json: no such file\. Write it with `saev eval"):
        main([*push, str(tmp_path / "missing.json")])
    assert not loopback_hub.api.repo_exists("org/bad-metrics")  # refused before anything was created or uploaded
    with pytest.raises(ValueError, match=r"The metrics lack model"):
        saev_model_card(pipeline["sae"], {"all": {}})  # the Python API checks them too


def test_the_example_cards_in_hub_cards_are_what_the_templates_render_now(tmp_path):
    """`hub_cards/` holds the cards of the demo's SAE-V and of the data it filtered, rendered from recorded inputs; a
    template change without rendering them again (`python hub_cards/render.py`) fails here."""
    import importlib.util

    folder = Path(__file__).resolve().parent.parent / "hub_cards"
    spec = importlib.util.spec_from_file_location("hub_cards_render", folder / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    written = render.render(output=tmp_path)
    assert [path.name for path in written] == ["saev_model_card.md", "filtered_dataset_card.md"]
    for path in written:
        assert path.read_text() == (folder / path.name).read_text(), (
            f"hub_cards/{path.name} is stale: run `python hub_cards/render.py` and commit it")
    model_card = (folder / "saev_model_card.md").read_text()
    assert "| d_sae | 256 (2 x d_in) |" in model_card and "| CE loss recovered |" in model_card
    assert "| Rows after | 300 (50.0% kept) |" in (folder / "filtered_dataset_card.md").read_text()
