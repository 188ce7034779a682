"""The input pipeline (saev_hf.data.pipeline): forward batches prepared ahead by DataLoader workers and grouped by length,
with results in the dataset's order and unchanged; the scorer, the weighting and the inspection on it; and
`saev score --num_proc` keeping the model off the accelerator in the parent process."""

import os

import datasets
import pytest
import torch

from saev_hf.interpret.inspection import InspectionArguments, inspect_saev
from saev_hf.data.pipeline import length_estimate, length_grouped_batches, prepared_batches
from saev_hf.data.prompts import PromptFormat, RowError, prepare_inputs
from saev_hf.scoring import SAEVScorer, ScorerArguments
from saev_hf.arguments import ModelArguments
from saev_hf.scoring.mapping import MapArguments, map_placement
from saev_hf.weighting import WeightingArguments, compute_feature_weights
from test_scoring import make_rows, rows_with_bad_images, weighted_setup

COLUMNS = ["saev_cosine_score", "saev_l0", "saev_cooccur_l0"]


def mixed_length_rows(n):
    """`make_rows` with prompts of very different lengths (0 to 6 extra sentences, in no order)."""
    rows = make_rows(n)
    rows["prompt"] = ["please look closely at the picture . " * ((5 * i) % 7) + p for i, p in enumerate(rows["prompt"])]
    return rows


@pytest.fixture(scope="module")
def pipeline_setup(tiny_model_factory, tmp_path_factory):
    """A tiny LLaVA, an SAE-V with feature weights, and a file-backed dataset of 12 rows of mixed lengths."""
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("pipeline")
    sae, ds, reader = weighted_setup(llava, root, mixed_length_rows(12))
    return llava, sae, ds, reader, root


def test_length_grouped_batches_sort_within_bounded_windows():
    lengths = [3, 9, 7, 7, 2, 8, 0, 5, 4, 1]
    batches = length_grouped_batches(lengths, batch_size=2, window=2)  # windows of 4 positions
    assert batches == [[1, 2], [3, 0], [5, 7], [4, 6], [8, 9]]  # longest first, ties in order, never across a window
    assert sorted(p for batch in batches for p in batch) == list(range(10))
    whole = length_grouped_batches(lengths, batch_size=3)
    assert [lengths[p] for batch in whole for p in batch] == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="window=0 must be positive"):
        length_grouped_batches(lengths, batch_size=2, window=0)


def test_length_estimate_counts_images_then_text():
    fmt = PromptFormat(response_column="chosen")
    row = {"images": ["a", "b"], "prompt": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}],
           "chosen": "de"}
    assert length_estimate(row, fmt) == (2, 5)
    assert length_estimate({"images": "a", "prompt": "x" * 40}, PromptFormat()) < length_estimate(row, fmt)


def test_grouping_cuts_padding_and_every_row_comes_back_once(pipeline_setup):
    _, _, ds, reader, _ = pipeline_setup
    batch = ds[:]
    plain = list(prepared_batches(reader, batch, 3))
    grouped = list(prepared_batches(reader, batch, 3, group_by_length=True))
    assert [b.positions for b in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert sorted(p for b in grouped for p in b.positions) == list(range(12))
    assert [b.positions for b in grouped] != [b.positions for b in plain], "the rows must have been regrouped"

    def padding(batches):
        return sum(b.padding_fraction * b.inputs["attention_mask"].numel() for b in batches) / sum(
            b.inputs["attention_mask"].numel() for b in batches)

    assert padding(grouped) < 0.5 * padding(plain)


def test_grouping_by_length_gives_the_same_scores_in_the_dataset_order(pipeline_setup):
    llava, sae, ds, _, _ = pipeline_setup
    grouped = SAEVScorer(sae, llava.model, llava.processor,
                         args=ScorerArguments(forward_batch_size=3, group_by_length=True))
    plain = SAEVScorer(sae, llava.model, llava.processor)
    by_one = ds.map(plain, batched=True, batch_size=1, load_from_cache_file=False).select_columns(COLUMNS)[:]
    out = ds.map(grouped, batched=True, batch_size=12, load_from_cache_file=False).select_columns(COLUMNS)[:]
    for name in COLUMNS:
        assert out[name] == pytest.approx(by_one[name], abs=1e-5)
    assert len(set(by_one["saev_cosine_score"])) > 3, "scores must differ between rows for the order to be seen"


def test_preprocessing_workers_prepare_in_other_processes_the_same_inputs(pipeline_setup, monkeypatch):
    _, _, ds, reader, _ = pipeline_setup
    import saev_hf.data.pipeline as pipeline

    def prepare_and_tell(*args, **kwargs):  # marks which process prepared each batch
        inputs = prepare_inputs(*args, **kwargs)
        inputs["pid"] = torch.tensor(os.getpid())
        return inputs

    monkeypatch.setattr(pipeline, "prepare_inputs", prepare_and_tell)
    inline = list(prepared_batches(reader, ds, 4, [0, 2, 4, 6, 8, 10, 11]))
    ahead = list(prepared_batches(reader, ds, 4, [0, 2, 4, 6, 8, 10, 11], workers=2))
    assert {int(b.inputs.pop("pid")) for b in inline} == {os.getpid()}
    assert os.getpid() not in {int(b.inputs.pop("pid")) for b in ahead}
    assert [b.rows for b in ahead] == [b.rows for b in inline] == [[0, 2, 4, 6], [8, 10, 11]]
    for a, b in zip(ahead, inline):
        assert a.inputs.keys() == b.inputs.keys()
        for key in a.inputs:
            torch.testing.assert_close(a.inputs[key], b.inputs[key], rtol=0, atol=0)


def test_scorer_with_workers_and_grouping_matches_the_plain_scorer(pipeline_setup):
    llava, sae, ds, _, _ = pipeline_setup
    args = ScorerArguments(forward_batch_size=2, group_by_length=True, preprocessing_workers=2)
    piped = SAEVScorer(sae, llava.model, llava.processor, args=args)
    plain = SAEVScorer(sae, llava.model, llava.processor)
    want = ds.map(plain, batched=True, batch_size=4, load_from_cache_file=False).select_columns(COLUMNS)[:]
    got = ds.map(piped, batched=True, batch_size=6, load_from_cache_file=False).select_columns(COLUMNS)[:]
    in_workers = ds.map(piped, batched=True, batch_size=6, num_proc=2, with_rank=True,
                        load_from_cache_file=False).select_columns(COLUMNS)[:]
    for name in COLUMNS:
        assert got[name] == pytest.approx(want[name], abs=1e-5)
        assert in_workers[name] == pytest.approx(want[name], abs=1e-5)


def test_pipeline_options_do_not_change_the_fingerprint_and_hit_the_cache(pipeline_setup, monkeypatch):
    llava, sae, ds, _, _ = pipeline_setup
    from datasets.fingerprint import Hasher

    plain = SAEVScorer(sae, llava.model, llava.processor)
    piped = SAEVScorer(sae, llava.model, llava.processor,
                       args=ScorerArguments(forward_batch_size=2, group_by_length=True, preprocessing_workers=1))
    assert piped.fingerprint == plain.fingerprint and Hasher.hash(piped) == Hasher.hash(plain)
    assert SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(token_chunk=7)).fingerprint \
        != plain.fingerprint, "a setting that changes what is computed still changes it"
    first = ds.map(plain, batched=True, batch_size=6)
    calls = []
    original = SAEVScorer._score_inputs
    monkeypatch.setattr(SAEVScorer, "_score_inputs", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = ds.map(piped, batched=True, batch_size=6)
    assert calls == [] and second.cache_files == first.cache_files
    ds.map(piped, batched=True, batch_size=6, load_from_cache_file=False)
    assert calls, "the probe sees the scorer's work when the cache is not read"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_row_is_named_by_its_dataset_index_when_grouped_and_in_workers(pipeline_setup, workers):
    llava, sae, _, _, _ = pipeline_setup
    ds = rows_with_bad_images(12, (7,), decode=False)
    ds = ds.map(lambda row, i: {"prompt": "look closely . " * ((5 * i) % 7) + row["prompt"]}, with_indices=True)
    args = dict(forward_batch_size=3, group_by_length=True, preprocessing_workers=workers)
    scorer = SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(**args))
    with pytest.raises(RowError, match=r"^Row 7: the image could not be read \(OSError"):
        ds.map(scorer, batched=True, batch_size=12, with_indices=True, load_from_cache_file=False)
    nulls = SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(on_error="null", **args))
    out = ds.map(nulls, batched=True, batch_size=12, with_indices=True, load_from_cache_file=False)
    assert out["saev_error"][7].startswith("Row 7: the image could not be read")
    assert [i for i, e in enumerate(out["saev_error"]) if e is not None] == [7]
    good = [i for i in range(12) if i != 7]
    clean = SAEVScorer(sae, llava.model, llava.processor).score_rows(ds.select(good)[:])
    assert [out["saev_cosine_score"][i] for i in good] == pytest.approx(clean["saev_cosine_score"], abs=1e-5)


def test_rows_out_of_order_are_named_by_their_own_index(pipeline_setup):
    llava, _, _, _, _ = pipeline_setup
    rows = make_rows(3)
    rows["images"][1] = []
    with pytest.raises(RowError, match=r"^Row 2 has no image"):
        prepare_inputs(llava.processor, rows, PromptFormat(), first_row=[5, 2, 9])


def test_weighting_and_inspection_with_workers_match_without(pipeline_setup):
    llava, sae, ds, reader, _ = pipeline_setup
    weights = {w: compute_feature_weights(sae, reader, ds, WeightingArguments(
        num_examples=9, batch_size=4, preprocessing_workers=w), store=False) for w in (0, 2)}
    assert weights[0].isnan().sum() < len(weights[0]), "some features must be weighted"
    torch.testing.assert_close(weights[2], weights[0], equal_nan=True)
    inspections = {w: inspect_saev(sae, reader, ds, InspectionArguments(
        num_examples=10, batch_size=4, num_explained=3, preprocessing_workers=w)) for w in (0, 2)}
    assert list(inspections[2].explanations) == list(inspections[0].explanations)
    for row, explanation in inspections[0].explanations.items():
        assert inspections[2].explanations[row].cosine_score == pytest.approx(explanation.cosine_score, abs=1e-6)
    assert inspections[2].features.keys() == inspections[0].features.keys()


def test_invalid_pipeline_arguments():
    with pytest.raises(ValueError, match="forward_batch_size is None"):
        ScorerArguments(group_by_length=True)
    with pytest.raises(ValueError, match="forward_batch_size is None"):
        ScorerArguments(preprocessing_workers=2)
    with pytest.raises(ValueError, match="forward_batch_size=0 must be a positive"):
        ScorerArguments(forward_batch_size=0)
    for arguments in (ScorerArguments, WeightingArguments, InspectionArguments):
        with pytest.raises(ValueError, match="preprocessing_workers=-1 must be"):
            arguments(preprocessing_workers=-1)


def test_num_proc_loads_the_model_on_the_cpu_and_refuses_a_device_map():
    source = ModelArguments("model")
    assert map_placement(source, MapArguments()) == (source, False)
    placed, with_rank = map_placement(source, MapArguments(num_proc=2))
    assert placed.device == "cpu" and with_rank
    assert map_placement(ModelArguments("model", device="cpu"),
                         MapArguments(num_proc=2))[1] is False
    with pytest.raises(ValueError, match="device_map='auto' places one model"):
        map_placement(ModelArguments("model", device_map="auto"),
                      MapArguments(num_proc=2))
    with pytest.raises(ValueError, match="device='cuda:0' cannot hold"):
        map_placement(ModelArguments("model", device="cuda:0"),
                      MapArguments(num_proc=2))


def test_score_command_with_num_proc_never_puts_the_model_on_the_accelerator_in_the_parent(
        pipeline_setup, tmp_path, monkeypatch):
    """`saev score --num_proc 2` on a machine whose 'auto' device is an accelerator (the meta device stands in for
    CUDA here): the parent loads the model on the CPU, so the workers it forks can each take their own GPU."""
    import saev_hf.arguments as sources
    from saev_hf.cli import main

    llava, sae, ds, _, root = pipeline_setup
    asked = []
    original = sources.load_model_and_processor

    def load(*args, device=None, **kwargs):
        asked.append(device)
        return original(*args, device=device, **kwargs)

    monkeypatch.setattr(sources, "choose_device",
                        lambda device="auto", **_: torch.device("meta" if device in ("auto", None) else device))
    monkeypatch.setattr(sources, "load_model_and_processor", load)
    argv = ["score", "--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path),
            "--dataset_name", str(root / "data"), "--batch_size", "6", "--forward_batch_size", "2",
            "--group_by_length", "--disable_tqdm"]
    assert main(argv + ["--output_dir", str(tmp_path / "multi"), "--num_proc", "2"]) == 0
    assert asked == [torch.device("cpu")]
    with pytest.raises(Exception):
        main(argv + ["--output_dir", str(tmp_path / "single")])  # without num_proc: the 'accelerator' is used
    assert asked[-1] == torch.device("meta")
    scored = datasets.load_from_disk(str(tmp_path / "multi"))
    want = SAEVScorer(sae, llava.model, llava.processor).score_rows(ds[:])
    for name in COLUMNS:
        assert scored[name] == pytest.approx(want[name], abs=1e-5)
