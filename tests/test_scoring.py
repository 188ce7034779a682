"""SAEVScorer as a datasets.map function: reference scores, batch invariance, caching, num_proc, errors."""

import io
import pickle
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality
from saev_hf.data import PromptFormat, RowError
from saev_hf.scoring import SAEVScorer, ScorerArguments
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.testing.tiny_saes import data_driven_sae  # noqa: F401  (also imported from here by other tests)
from saev_hf.weighting import WeightingArguments, compute_feature_weights

DELTA = 0.05  # the tiny model's hidden states have norms near 0.1; delta = 1 would leave nothing co-occurring


def make_rows(n, seed=5):
    data = digit_images(n, seed=seed)
    return {
        "images": [[image] for image, _ in data],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(data)],
        "chosen": [DIGIT_NAMES[label] for _, label in data],
        "rejected": [DIGIT_NAMES[(label + 1) % 10] for _, label in data],
    }


def weighted_setup(llava, root, rows):
    """`rows` saved as a file-backed dataset under `root`, a reader of layer 1 of the tiny `llava`, and an SAE-V fitted
    to it with feature weights, saved to `root / "sae"`: `(sae, ds, reader)`."""
    datasets.Dataset.from_dict(rows).save_to_disk(root / "data")
    ds = datasets.load_from_disk(str(root / "data"))
    reader = LayerReader(llava.model, llava.processor, layer=1)
    sae = data_driven_sae(reader, ds)
    compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=None))
    sae.save_pretrained(root / "sae")
    return sae, ds, reader


@pytest.fixture(scope="module")
def scored_setup(tiny_model_factory, tmp_path_factory):
    """A tiny LLaVA (from its saved folder), an SAE-V with feature weights, and a file-backed dataset."""
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("scoring")
    sae, ds, _ = weighted_setup(llava, root, make_rows(10))
    return llava, sae, ds, root


def reference_firing(sae, reader, row):
    """One example's activations and the features above delta at some text / image position, computed directly:
    `(z, text_features, image_features)`."""
    acts = reader.read({k: [v] for k, v in row.items() if k in ("images", "prompt")})
    hidden, modality = acts.example(0)
    z = sae.encode(hidden)
    text = (modality == Modality.TEXT) | (modality == Modality.SPECIAL)
    image = modality == Modality.IMAGE
    return (z, set((z[text] > DELTA).any(0).nonzero().flatten().tolist()),
            set((z[image] > DELTA).any(0).nonzero().flatten().tolist()))


def reference_scores(sae, reader, row):
    """Algorithms 1 (stage 3), 2 and 3 for one example, written directly from the method page."""
    z, text_features, image_features = reference_firing(sae, reader, row)
    cooccurring = text_features & image_features
    weights = sae.feature_weights
    cosine = sum(float(weights[f]) for f in cooccurring if not torch.isnan(weights[f]))
    l0 = (z > 0).sum(-1).float().mean().item()
    return cosine, l0, len(cooccurring)


def test_scores_equal_the_reference_computation(scored_setup):
    llava, sae, ds, _ = scored_setup
    out = ds.map(SAEVScorer(sae, llava.model, llava.processor), batched=True, batch_size=4)
    assert out.column_names == ds.column_names + ["saev_cosine_score", "saev_l0", "saev_cooccur_l0"]
    reader = LayerReader(llava.model, llava.processor, layer=1)
    for i in range(len(ds)):
        cosine, l0, cooccur = reference_scores(sae, reader, ds[i])
        assert out[i]["saev_cooccur_l0"] == cooccur
        assert out[i]["saev_cosine_score"] == pytest.approx(cosine, abs=1e-4)
        assert out[i]["saev_l0"] == pytest.approx(l0, rel=1e-6)
    assert len(set(out["saev_cooccur_l0"])) > 3 and len(set(out["saev_cosine_score"])) > 3, "scores must vary"


def test_scores_do_not_depend_on_batch_size_composition_or_padding(scored_setup):
    llava, sae, ds, _ = scored_setup
    scorer = SAEVScorer(sae, llava.model, llava.processor)
    columns = ["saev_cosine_score", "saev_l0", "saev_cooccur_l0"]
    by_one = ds.map(scorer, batched=True, batch_size=1, load_from_cache_file=False).select_columns(columns)[:]
    by_four = ds.map(scorer, batched=True, batch_size=4, load_from_cache_file=False).select_columns(columns)[:]
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    shuffled = ds.select(order).map(scorer, batched=True, batch_size=3, load_from_cache_file=False)
    tokenizer = llava.processor.tokenizer
    tokenizer.padding_side = "left"
    try:
        left = ds.map(scorer, batched=True, batch_size=4, load_from_cache_file=False).select_columns(columns)[:]
    finally:
        tokenizer.padding_side = "right"
    for name in columns:
        assert by_one[name] == pytest.approx(by_four[name], abs=1e-5)
        assert by_one[name] == pytest.approx(left[name], abs=1e-5)
        assert [by_one[name][i] for i in order] == pytest.approx(shuffled[name], abs=1e-5)


def test_scorer_pickles_to_its_identity_not_its_weights(scored_setup):
    llava, sae, _, _ = scored_setup
    scorer = SAEVScorer(sae, llava.model, llava.processor)
    payload = pickle.dumps(scorer)
    model_bytes = sum(p.numel() * p.element_size() for p in llava.model.parameters())
    assert len(payload) < 10_000 < model_bytes
    assert pickle.loads(payload) is scorer  # same process: the live scorer is found again
    other = SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(scores=["l0"]))
    assert other.fingerprint != scorer.fingerprint
    from datasets.fingerprint import Hasher

    assert Hasher.hash(scorer) == Hasher.hash(SAEVScorer(sae, llava.model, llava.processor))


def test_second_identical_map_hits_the_cache(scored_setup, monkeypatch):
    llava, sae, ds, _ = scored_setup
    first = ds.map(SAEVScorer(sae, llava.model, llava.processor), batched=True, batch_size=4)
    calls = []
    original = SAEVScorer._score_batch  # every map batch goes through it
    monkeypatch.setattr(SAEVScorer, "_score_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = ds.map(SAEVScorer(sae, llava.model, llava.processor), batched=True, batch_size=4)
    assert calls == [], "a second identical map must be read from the datasets cache"
    assert second.cache_files == first.cache_files
    assert second["saev_cosine_score"] == first["saev_cosine_score"]


CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, datasets
    from saev_hf import SAEV
    from saev_hf.activations import load_model_and_processor
    from saev_hf.scoring import SAEVScorer
    root, model_dir = sys.argv[1], sys.argv[2]
    ds = datasets.load_from_disk(root + "/data")
    scorer = SAEVScorer(SAEV.from_pretrained(root + "/sae"), *load_model_and_processor(model_dir))
    calls = []
    original = SAEVScorer._score_batch
    SAEVScorer._score_batch = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    out = ds.map(scorer, batched=True, batch_size=4)
    print(json.dumps({"calls": len(calls), "cache": [f["filename"] for f in out.cache_files],
                      "scores": list(out["saev_cosine_score"])}))
    """
)


def test_cache_is_hit_from_a_new_process(scored_setup):
    llava, _, ds, root = scored_setup
    import json

    def run():
        result = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(root), str(llava.path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["calls"] > 0 and second["calls"] == 0
    assert first["cache"] == second["cache"] and first["scores"] == second["scores"]


def test_num_proc_and_with_rank_give_the_same_scores(scored_setup):
    llava, sae, ds, _ = scored_setup
    scorer = SAEVScorer(sae, llava.model, llava.processor)
    single = ds.map(scorer, batched=True, batch_size=2, load_from_cache_file=False)
    multi = ds.map(scorer, batched=True, batch_size=2, num_proc=2, with_rank=True, load_from_cache_file=False)
    for name in scorer.columns:
        assert multi[name] == pytest.approx(single[name], abs=1e-6)


def test_scorer_from_paths_loads_lazily(scored_setup):
    llava, sae, ds, root = scored_setup
    lazy = SAEVScorer(str(root / "sae"), str(llava.path))
    eager = SAEVScorer(sae, llava.model, llava.processor)
    assert lazy(ds[:3])["saev_cosine_score"] == pytest.approx(eager(ds[:3])["saev_cosine_score"], abs=1e-5)


def test_response_column_changes_what_is_scored(scored_setup):
    llava, sae, ds, _ = scored_setup
    prompt_only = SAEVScorer(sae, llava.model, llava.processor)(ds[:4])
    with_response = SAEVScorer(sae, llava.model, llava.processor,
                               prompt_format=PromptFormat(response_column="chosen"))(ds[:4])
    assert prompt_only["saev_l0"] != with_response["saev_l0"]


def test_custom_column_names_and_subset_of_scores(scored_setup):
    llava, sae, ds, _ = scored_setup
    args = ScorerArguments(scores=["cooccur_l0"], cooccur_l0_column="cooc")
    out = ds.map(SAEVScorer(sae, llava.model, llava.processor, args=args), batched=True)
    assert out.column_names == ds.column_names + ["cooc"]


# ---------------------------------------------------------------------------------------------------------------
# Errors: clear by default, or null scores with a reason when asked; never a silent 0
# ---------------------------------------------------------------------------------------------------------------


def broken_rows():
    """Images kept undecoded (as datasets does with decode=False) so that the scorer, not datasets, reads them."""
    rows = make_rows(4)
    encoded = []
    for images in rows["images"]:
        buffer = io.BytesIO()
        images[0].save(buffer, format="PNG")
        encoded.append([{"bytes": buffer.getvalue(), "path": None}])
    encoded[2] = [{"bytes": b"not an image", "path": None}]
    rows["images"] = encoded
    features = datasets.Features({"images": datasets.Sequence(datasets.Image(decode=False)),
                                  **{k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}})
    return datasets.Dataset.from_dict(rows, features=features)


def test_unscorable_example_raises_naming_the_row(scored_setup):
    llava, sae, _, _ = scored_setup
    with pytest.raises(RowError, match=r"Row 2: the image could not be read"):
        broken_rows().map(SAEVScorer(sae, llava.model, llava.processor), batched=True, batch_size=4, with_indices=True)


def test_unscorable_example_gets_null_scores_and_a_reason_when_asked(scored_setup):
    llava, sae, _, _ = scored_setup
    args = ScorerArguments(on_error="null")
    out = broken_rows().map(SAEVScorer(sae, llava.model, llava.processor, args=args), batched=True, batch_size=4,
                            with_indices=True)
    assert out["saev_cosine_score"][2] is None and out["saev_cooccur_l0"][2] is None
    assert "Row 2: the image could not be read" in out["saev_error"][2]
    assert [out["saev_error"][i] for i in (0, 1, 3)] == [None, None, None]
    clean = SAEVScorer(sae, llava.model, llava.processor)(broken_rows().select([0, 1, 3])[:])
    assert [out["saev_cosine_score"][i] for i in (0, 1, 3)] == pytest.approx(clean["saev_cosine_score"], abs=1e-5)


def test_truncated_image_tokens_are_an_error_not_a_zero(scored_setup):
    llava, sae, ds, _ = scored_setup
    scorer = SAEVScorer(sae, llava.model, llava.processor, prompt_format=PromptFormat(max_length=8),
                        args=ScorerArguments(on_error="null"))
    out = scorer(ds[:2])
    assert out["saev_cosine_score"] == [None, None]
    assert all("would cut its image tokens" in reason for reason in out["saev_error"])


def test_cosine_score_without_feature_weights_is_refused(scored_setup):
    llava, _, _, _ = scored_setup
    unweighted = SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1))
    with pytest.raises(ValueError, match=r"cross-modal feature weights, which were never computed"):
        SAEVScorer(unweighted, llava.model, llava.processor)
    scorer = SAEVScorer(unweighted, llava.model, llava.processor, args=ScorerArguments(scores=["l0", "cooccur_l0"]))
    assert scorer.columns == ["saev_l0", "saev_cooccur_l0"]


def test_sae_for_another_model_or_layer_is_refused(scored_setup):
    llava, _, _, _ = scored_setup
    with pytest.raises(ValueError, match=r"reads d_in=32 but LlavaForConditionalGeneration has hidden size 64"):
        SAEVScorer(SAEV(SAEVConfig(d_in=32, d_sae=64, hook_layer=1)), llava.model, llava.processor,
                   args=ScorerArguments(scores=["l0"]))
    with pytest.raises(ValueError, match=r"layer=9 does not exist"):
        SAEVScorer(SAEV(SAEVConfig(d_in=64, d_sae=64, hook_layer=9)), llava.model, llava.processor,
                   args=ScorerArguments(scores=["l0"]))


def test_missing_image_column_is_a_clear_error(scored_setup):
    llava, sae, ds, _ = scored_setup
    with pytest.raises(KeyError, match=r"Column 'images' not found"):
        ds.rename_column("images", "picture").map(SAEVScorer(sae, llava.model, llava.processor), batched=True)


def test_invalid_scorer_arguments():
    with pytest.raises(ValueError, match=r"must be a non-empty subset"):
        ScorerArguments(scores=["bleu"])
    with pytest.raises(ValueError, match=r"on_error='skip' must be 'raise' or 'null'"):
        ScorerArguments(on_error="skip")


# ---------------------------------------------------------------------------------------------------------------
# The fingerprint follows the objects: never stale scores from the cache, never a different SAE-V in the workers
# ---------------------------------------------------------------------------------------------------------------


def test_changing_the_sae_or_the_model_in_place_never_serves_stale_cached_scores(scored_setup):
    import copy

    llava, sae, ds, _ = scored_setup
    sae, model = copy.deepcopy(sae), copy.deepcopy(llava.model)  # private copies: changed in place below
    scorer = SAEVScorer(sae, model, llava.processor)
    first = ds.map(scorer, batched=True, batch_size=4)
    fingerprint = scorer.fingerprint

    # new feature weights, computed in place with other settings
    compute_feature_weights(sae, LayerReader(model, llava.processor, layer=1), ds,
                            WeightingArguments(num_examples=None, mean_center=True))
    assert scorer.fingerprint != fingerprint
    second = ds.map(scorer, batched=True, batch_size=4)
    now = scorer.score_rows(ds[:])
    assert second["saev_cosine_score"] == pytest.approx(now["saev_cosine_score"], abs=1e-5)
    assert second["saev_cosine_score"] != pytest.approx(first["saev_cosine_score"], abs=1e-3)

    # another delta, set in place on the config
    sae.config.cooccurrence_threshold = 1.2 * DELTA
    third = ds.map(scorer, batched=True, batch_size=4)
    assert third["saev_cooccur_l0"] == scorer.score_rows(ds[:])["saev_cooccur_l0"] != second["saev_cooccur_l0"]
    sae.config.cooccurrence_threshold = DELTA

    # a fine-tuning step on the MLLM, in place
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    fourth = ds.map(scorer, batched=True, batch_size=4)
    assert fourth["saev_l0"] == pytest.approx(scorer.score_rows(ds[:])["saev_l0"], rel=1e-6)
    assert fourth["saev_l0"] != pytest.approx(second["saev_l0"], rel=1e-3)
    assert len({first.cache_files[0]["filename"], second.cache_files[0]["filename"],
                third.cache_files[0]["filename"], fourth.cache_files[0]["filename"]}) == 4


def test_a_worker_that_reloads_a_changed_sae_refuses_instead_of_scoring_another(scored_setup, monkeypatch):
    """What a `spawn` worker does: no live objects to find, so it reloads the SAE-V from its folder; if the parent
    changed it in memory since, the worker must refuse, not score the version on disk."""
    import weakref

    import saev_hf.scoring.map_function as scoring

    llava, _, ds, root = scored_setup
    sae = SAEV.from_pretrained(root / "sae")
    unchanged = pickle.dumps(SAEVScorer(sae, str(llava.path)))
    with torch.no_grad():
        sae.W_enc.mul_(1.5)  # e.g. a training step in the parent, after loading
    changed = pickle.dumps(SAEVScorer(sae, str(llava.path)))

    monkeypatch.setattr(scoring, "_LIVE", weakref.WeakValueDictionary())  # a fresh process: nothing live
    worker = pickle.loads(unchanged)
    assert worker._sae is None  # it reloads from disk, lazily
    expected = SAEVScorer(SAEV.from_pretrained(root / "sae"), str(llava.path)).score_rows(ds[:3])
    assert worker(ds[:3])["saev_cosine_score"] == pytest.approx(expected["saev_cosine_score"], abs=1e-6)

    worker = pickle.loads(changed)
    with pytest.raises(ValueError, match=r"reloaded the SAE-V \(reloaded from '.*sae'\) from disk, but the parent "
                                         r"process scores a different one.*Save it \(save_pretrained\)"):
        worker(ds[:3])


# ---------------------------------------------------------------------------------------------------------------
# on_error="null": one bad row costs one null row, whatever the batch size and wherever the row is
# ---------------------------------------------------------------------------------------------------------------


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rows_with_bad_images(n, bad, decode):
    """`n` rows whose images at indices `bad` are truncated PNGs, in a `datasets.Image` column (decoded or not)."""
    rows = make_rows(n)
    images = [png_bytes(images[0]) for images in rows["images"]]
    for i in bad:
        images[i] = images[i][: len(images[i]) // 2]  # "image file is truncated"
    rows["images"] = [[{"bytes": data, "path": None}] for data in images]
    features = datasets.Features({"images": datasets.Sequence(datasets.Image(decode=decode)),
                                  **{k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("bad,batch_size", [((15,), 8), ((0,), 8), ((0, 1), 1)])
def test_null_mode_survives_a_bad_row_at_any_place_and_batch_size(scored_setup, bad, batch_size):
    llava, sae, _, _ = scored_setup
    ds = rows_with_bad_images(20, bad, decode=False)
    scorer = SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(on_error="null"))
    out = ds.map(scorer, batched=True, batch_size=batch_size, with_indices=True)
    assert out.features["saev_error"] == datasets.Value("string")
    assert out.features["saev_cosine_score"] == datasets.Value("float64")
    assert out.features["saev_cooccur_l0"] == datasets.Value("int64")
    good = [i for i in range(20) if i not in bad]
    for i in bad:
        assert out[i]["saev_cosine_score"] is None and out[i]["saev_l0"] is None
        assert out[i]["saev_error"].startswith(f"Row {i}: the image could not be read (OSError")
    assert [out[i]["saev_error"] for i in good] == [None] * len(good)
    clean = SAEVScorer(sae, llava.model, llava.processor).score_rows(ds.select(good)[:])
    assert [out[i]["saev_cosine_score"] for i in good] == pytest.approx(clean["saev_cosine_score"], abs=1e-5)


def test_score_command_with_null_mode_reads_a_corrupt_image_column_itself(scored_setup, tmp_path, capsys):
    """A saved dataset whose datasets.Image column holds a truncated image: one null row named, the rest scored, and
    the saved result keeps the column's (decoded) feature."""
    from saev_hf.cli import main

    llava, _, _, root = scored_setup
    ds = rows_with_bad_images(10, (6,), decode=True)
    ds.save_to_disk(tmp_path / "data")
    argv = ["score", "--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path),
            "--dataset_name", str(tmp_path / "data"), "--batch_size", "4", "--disable_tqdm"]
    with pytest.raises(RowError, match=r"Row 6: the image could not be read \(OSError"):
        main(argv + ["--output_dir", str(tmp_path / "raise")])
    assert main(argv + ["--output_dir", str(tmp_path / "null"), "--on_error", "null"]) == 0
    out = datasets.load_from_disk(str(tmp_path / "null"))
    assert out.features["images"] == ds.features["images"]  # decoded again, as it was
    assert out["saev_cosine_score"][6] is None and out["saev_error"][6].startswith("Row 6: the image could not be read")
    assert sum(score is not None for score in out["saev_cosine_score"]) == 9


def test_an_saev_without_statistics_under_an_unreachable_delta_warns_with_the_numbers(scored_setup):
    llava, sae, ds, _ = scored_setup
    bare = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=1000.0))  # no statistics recorded
    with torch.no_grad():
        bare.load_state_dict({**sae.state_dict(), "W_enc": sae.W_enc[:, :96], "b_enc": sae.b_enc[:96],
                              "W_dec": sae.W_dec[:96], "feature_weights": sae.feature_weights[:96],
                              "feature_log_sparsity": sae.feature_log_sparsity[:96]})
    assert bare.config.feature_weights_info is None
    scorer = SAEVScorer(bare, llava.model, llava.processor, args=ScorerArguments(scores=["l0", "cooccur_l0"]))
    with pytest.warns(UserWarning, match=r"No row of rows 0\.\.3 has a feature above cooccurrence_threshold \(delta\) "
                                         r"= 1000 .* the largest activation any feature reached on both is [\d.]+.* "
                                         r"--threshold_quantile"):
        scores = scorer.score_rows(ds[:4])
    assert scores["saev_cooccur_l0"] == [0, 0, 0, 0]
    bare.config.cooccurrence_threshold = DELTA  # reachable: no warning
    import warnings as warnings_module

    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")
        scores = SAEVScorer(bare, llava.model, llava.processor,
                            args=ScorerArguments(scores=["l0", "cooccur_l0"])).score_rows(ds[:4])
    assert any(scores["saev_cooccur_l0"])


def test_a_float32_saev_encodes_half_precision_hidden_states_in_float32(scored_setup):
    """The bfloat16 model's states are upcast, not the SAE-V downcast (docs/scale.md has the measured effect)."""
    import copy

    llava, sae, ds, _ = scored_setup
    states = torch.randn(5, 64).to(torch.bfloat16)
    assert sae.encode(states).dtype == torch.float32
    torch.testing.assert_close(sae.encode(states), sae.encode(states.float()), rtol=0, atol=0)
    half_model = copy.deepcopy(llava.model).to(torch.bfloat16)
    scores = SAEVScorer(sae, half_model, llava.processor).score_rows(ds[:4])
    full = SAEVScorer(sae, llava.model, llava.processor).score_rows(ds[:4])
    assert scores["saev_l0"] == pytest.approx(full["saev_l0"], rel=0.05)  # close, not equal: the states were rounded


# ---------------------------------------------------------------------------------------------------------------
# Scores beyond the paper: asked for by name, never a default
# ---------------------------------------------------------------------------------------------------------------


def reference_jaccard(sae, reader, row):
    """|T & I| / |T | I| for one example, written directly from its definition."""
    _, text_features, image_features = reference_firing(sae, reader, row)
    union = text_features | image_features
    return len(text_features & image_features) / len(union) if union else 0.0


def test_jaccard_and_polarity_scores_equal_their_definitions(scored_setup):
    llava, sae, ds, _ = scored_setup
    denials = ["none", "no", "three", "No, there is none", "seven", "none", "four", "no", "one", "two"]
    data = ds.remove_columns("chosen").add_column("chosen", denials)
    args = ScorerArguments(scores=["cooccur_l0", "cooccur_jaccard", "polarity_jaccard"], denial_pattern=r"^(none|no)\b",
                           polarity_threshold=0.3)
    out = data.map(SAEVScorer(sae, llava.model, llava.processor, args=args), batched=True, batch_size=4)
    assert out.column_names[-3:] == ["saev_cooccur_l0", "saev_cooccur_jaccard", "saev_polarity_jaccard"]
    reader = LayerReader(llava.model, llava.processor, layer=1)
    for i in range(len(ds)):
        jaccard = reference_jaccard(sae, reader, ds[i])
        assert out[i]["saev_cooccur_jaccard"] == pytest.approx(jaccard, abs=1e-9)
        denies = denials[i].lower().startswith(("none", "no"))
        assert out[i]["saev_polarity_jaccard"] == pytest.approx(0.3 - jaccard if denies else jaccard - 0.3, abs=1e-9)
    assert 0 < min(out["saev_cooccur_jaccard"]) < max(out["saev_cooccur_jaccard"]) < 1, "the score must vary"
    default = SAEVScorer(sae, llava.model, llava.processor)
    assert "saev_cooccur_jaccard" not in default.columns, "a score beyond the paper is never a default"


def test_polarity_score_needs_a_valid_denial_pattern_and_the_response(scored_setup):
    llava, sae, ds, _ = scored_setup
    with pytest.raises(ValueError, match="polarity_jaccard needs denial_pattern"):
        ScorerArguments(scores=["polarity_jaccard"])
    with pytest.raises(ValueError, match="polarity_jaccard needs polarity_threshold"):
        ScorerArguments(scores=["polarity_jaccard"], denial_pattern="^no")
    with pytest.raises(ValueError, match=r"denial_pattern='\(none' is not a regular expression"):
        ScorerArguments(scores=["polarity_jaccard"], denial_pattern="(none", polarity_threshold=0.2)
    args = ScorerArguments(scores=["polarity_jaccard"], denial_pattern="^no", polarity_threshold=0.2)
    with pytest.raises(KeyError, match="Column 'chosen' .*polarity_jaccard.*baseline_response_column"):
        ds.remove_columns(["chosen"]).map(SAEVScorer(sae, llava.model, llava.processor, args=args), batched=True)
    with pytest.raises(RowError, match="Row 0: the response must be text or a conversation"):
        SAEVScorer(sae, llava.model, llava.processor, args=args).score_rows(
            {**ds[:1], "chosen": [7]})


def test_polarity_reads_conversational_responses(scored_setup):
    llava, sae, ds, _ = scored_setup
    args = ScorerArguments(scores=["cooccur_jaccard", "polarity_jaccard"], denial_pattern=r"^there is no\b",
                           polarity_threshold=0.25)
    rows = {**ds[:2], "chosen": [[{"role": "assistant", "content": "There is no seven."}],
                                 [{"role": "assistant", "content": [{"type": "text", "text": "A seven."}]}]]}
    out = SAEVScorer(sae, llava.model, llava.processor, args=args).score_rows(rows)
    assert out["saev_polarity_jaccard"][0] == pytest.approx(0.25 - out["saev_cooccur_jaccard"][0])
    assert out["saev_polarity_jaccard"][1] == pytest.approx(out["saev_cooccur_jaccard"][1] - 0.25)


def test_jaccard_is_not_raised_by_an_image_firing_every_feature():
    from saev_hf.scoring.activity import jaccard_scores

    text = torch.tensor([[True, True, False, False, False, False]])
    few = torch.tensor([[True, False, False, False, False, False]])
    every = torch.ones(1, 6, dtype=torch.bool)
    assert (few & text).sum() < (every & text).sum()  # |C(x)| grows with what the image fires ...
    assert float(jaccard_scores(text, every)) < float(jaccard_scores(text, text))  # ... the Jaccard does not
    assert float(jaccard_scores(torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool))) == 0.0
