"""The activation cache: what it holds equals what training reads from the MLLM, bounded shards, exact resume, refused
foreign folders, shuffled reading in bounded memory, and training from it giving the weights training from the MLLM
gives."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load, load_file, save_file

import saev_hf.cache.activation_cache as cache_module
from saev_hf.cache.shard_writer import ShardWriter
from saev_hf import SAEV, DataArguments
from saev_hf.training.buffer import ActivationBuffer
from saev_hf.activations import LayerReader, Modality
from saev_hf.cache import (MANIFEST_NAME, SHARD_TENSORS, ActivationCache, CacheArguments, CacheReader, cache_activations, cached_rows)
from saev_hf.model import SAEVConfig
from saev_hf.evaluation import evaluate_saev
from saev_hf.weighting import WeightingArguments, compute_feature_weights
from saev_hf.cli import main as cli_main
from saev_hf.training import SAEVTrainer, train_saev

from test_training import digit_dataset, text_dataset, tiny_args


def cache_args(output_dir, **overrides) -> CacheArguments:
    values = dict(output_dir=str(output_dir), layer=1, shard_size_tokens=200, read_batch_size=4, disable_tqdm=True)
    values.update(overrides)
    return CacheArguments(**values)


def stream(cache: ActivationCache) -> dict[str, torch.Tensor]:
    """The whole cache in stream order, every column."""
    shards = list(cache.iter_shards())
    return {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(18)
    root = tmp_path_factory.mktemp("cache")
    path = cache_activations(cache_args(root / "full"), model=llava.model, processor=llava.processor,
                             dataset=dataset)
    return {"llava": llava, "dataset": dataset, "root": root, "cache": ActivationCache(path)}


def test_shards_hold_at_most_shard_size_tokens_and_whole_rows(setup):
    cache = setup["cache"]
    assert len(cache.shards) >= 3  # the test data spans several shards
    assert sum(shard["num_tokens"] for shard in cache.shards) == cache.num_tokens
    rows_seen = []
    for index, shard in enumerate(cache.shards):
        tensors = cache.load_shard(index)
        assert 0 < len(tensors["row"]) == shard["num_tokens"] <= 200
        rows = tensors["row"].unique().tolist()
        assert rows == list(range(shard["first_row"], shard["first_row"] + shard["num_rows"]))
        rows_seen += rows
    assert rows_seen == list(range(18))  # each row in exactly one shard, in order
    manifest = json.loads((cache.path / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["d_in"] == setup["llava"].model.config.text_config.hidden_size
    assert manifest["layer"] == 1 and manifest["storage_dtype"] == "float32"
    assert manifest["arguments"]["shard_size_tokens"] == 200 and manifest["arguments"]["read_batch_size"] == 4


def test_a_row_longer_than_a_shard_is_refused_with_the_size_to_use(setup):
    with pytest.raises(ValueError, match=r"Row 0 has \d+ tokens to cache, more than shard_size_tokens=5.*at least"):
        cache_activations(cache_args(setup["root"] / "tiny-shards", shard_size_tokens=5),
                          model=setup["llava"].model, processor=setup["llava"].processor, dataset=setup["dataset"])


@pytest.mark.parametrize("include_special", [True, False])
def test_cached_tokens_are_the_tokens_the_buffer_reads_with_their_modality_row_and_position(setup, include_special):
    llava, dataset = setup["llava"], setup["dataset"]
    if include_special:
        cache = setup["cache"]
    else:
        args = cache_args(setup["root"] / "no-special", include_special_tokens=False)
        cache = ActivationCache(cache_activations(args, model=llava.model, processor=llava.processor, dataset=dataset))
    cached = stream(cache)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    buffer = ActivationBuffer(reader, dataset, batch_size_tokens=8, buffer_size_tokens=16, read_batch_size=4,
                              include_special_tokens=include_special, shuffle_dataset=False)
    read = []
    while buffer.data_pass == 0:
        read.append(buffer.read_tokens())
    read = torch.cat(read[:-1])  # the last read starts the second pass
    assert torch.equal(cached["activations"], read)  # same tokens, same order, bit for bit
    # metadata: recompute every position's modality, row and position directly
    modality, rows, positions = [], [], []
    for start in range(0, len(dataset), 4):
        acts = reader.read(dataset[start : start + 4], first_row=start)
        mask = acts.scored_mask(include_special)
        for j in range(len(acts)):
            modality.append(acts.modality[j][mask[j]])
            rows.append(torch.full((int(mask[j].sum()),), start + j))
            positions.append(mask[j].nonzero().flatten())
    assert torch.equal(cached["modality"], torch.cat(modality).to(torch.int8))
    assert torch.equal(cached["row"], torch.cat(rows)) and torch.equal(cached["position"].long(), torch.cat(positions))
    kinds = set(cached["modality"].tolist())
    assert {int(Modality.IMAGE), int(Modality.TEXT)} <= kinds and int(Modality.PAD) not in kinds
    assert (int(Modality.SPECIAL) in kinds) == include_special


def test_an_interrupted_cache_resumes_to_the_cache_of_an_uninterrupted_run(setup, monkeypatch):
    llava, dataset = setup["llava"], setup["dataset"]
    real_write, written = ShardWriter.write, []

    def write_then_fail(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("interrupted")
        real_write(*args, **kwargs)
        written.append(1)

    monkeypatch.setattr(ShardWriter, "write", write_then_fail)
    out = setup["root"] / "resumed"
    with pytest.raises(KeyboardInterrupt):
        cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=dataset)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    partial = json.loads((out / MANIFEST_NAME).read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    assert 0 < partial["next_row"] < 18 and partial["next_row"] % 4 != 0  # resumes inside a forward batch
    with pytest.raises(ValueError, match="unfinished"):
        ActivationCache(out)
    assert ActivationCache(out, allow_incomplete=True).num_rows == partial["next_row"]
    cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=dataset)
    resumed, full = ActivationCache(out), setup["cache"]
    assert [s for s in resumed.shards] == [s for s in full.shards]
    for index in range(len(full.shards)):
        a, b = resumed.load_shard(index), full.load_shard(index)
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not list(out.glob("*.tmp"))


def assert_same_cache(a: ActivationCache, b: ActivationCache) -> None:
    assert a.shards == b.shards and a.num_rows == b.num_rows
    for index in range(len(b.shards)):
        x, y = a.load_shard(index), b.load_shard(index)
        assert all(torch.equal(x[key], y[key]) for key in SHARD_TENSORS)


def test_a_stream_caches_what_the_dataset_caches_and_resumes_after_its_cached_rows(setup, monkeypatch):
    """A `datasets.IterableDataset` is read in order: the same shards as the Dataset; an interrupted run reads the
    stream again from the start and skips the rows already cached; max_rows stops the stream."""
    llava, dataset = setup["llava"], setup["dataset"]
    streamed = dataset.to_iterable_dataset()
    out = setup["root"] / "stream"
    monkeypatch.setattr(ShardWriter, "write", interrupt_after(2, ShardWriter.write))
    with pytest.raises(KeyboardInterrupt):
        cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=streamed)
    monkeypatch.undo()
    partial = json.loads((out / MANIFEST_NAME).read_text())
    assert 0 < partial["next_row"] < 18 and partial["arguments"]["num_dataset_rows"] is None
    cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=streamed)
    assert_same_cache(ActivationCache(out), setup["cache"])

    first = ActivationCache(cache_activations(cache_args(setup["root"] / "stream-10", max_rows=10),
                                              model=llava.model, processor=llava.processor, dataset=streamed))
    assert first.num_rows == 10 and stream(first)["row"].max() == 9
    whole = stream(setup["cache"])
    assert torch.equal(stream(first)["activations"], whole["activations"][whole["row"] < 10])


def test_a_bad_row_of_a_resumed_stream_is_named_by_its_place_in_the_stream(setup, monkeypatch):
    """Rows are counted from the stream's start, also when a resumed run starts reading further on."""
    llava, dataset = setup["llava"], setup["dataset"]
    rows = [dict(row) for row in dataset]
    out = setup["root"] / "bad-stream"
    monkeypatch.setattr(ShardWriter, "write", interrupt_after(2, ShardWriter.write))
    with pytest.raises(KeyboardInterrupt):
        cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=iter_rows(rows))
    monkeypatch.undo()
    assert json.loads((out / MANIFEST_NAME).read_text())["next_row"] >= 4  # the resumed run skips rows
    rows[13]["images"] = [b"not an image"]
    with pytest.raises(ValueError, match=r"[Rr]ow 13\b"):
        cache_activations(cache_args(out), model=llava.model, processor=llava.processor, dataset=iter_rows(rows))


def interrupt_after(shards: int, write):
    """A stand-in for `ShardWriter.write` that writes `shards` shards, then stops the run as Ctrl-C would."""
    written = []

    def write_then_fail(*args, **kwargs):
        if len(written) == shards:
            raise KeyboardInterrupt("interrupted")
        write(*args, **kwargs)
        written.append(1)

    return write_then_fail


class iter_rows:
    """A plain re-iterable of rows (a stream that is not a datasets object)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_folder_with_another_cache_or_foreign_files_is_refused(setup):
    llava, dataset = setup["llava"], setup["dataset"]
    kwargs = dict(model=llava.model, processor=llava.processor, dataset=dataset)
    with pytest.raises(ValueError, match=r"other arguments \(layer: 1 \(cache\) vs 2 \(now\); storage_dtype: "
                                         r"'float32' \(cache\) vs 'bfloat16' \(now\)\).*--overwrite_output_dir"):
        cache_activations(cache_args(setup["cache"].path, layer=2, storage_dtype="bfloat16"), **kwargs)
    foreign = setup["root"] / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="config.json"):
        cache_activations(cache_args(foreign), **kwargs)
    # asked to: the other cache is deleted and a new one written
    other = setup["root"] / "other"
    cache_activations(cache_args(other, shard_size_tokens=100), **kwargs)
    cache_activations(cache_args(other, layer=2, overwrite_output_dir=True), **kwargs)
    assert ActivationCache(other).layer == 2
    assert sorted(p.name for p in other.glob("shard-*")) == [s["file"] for s in ActivationCache(other).shards]


def test_shuffled_reading_is_a_seeded_permutation_of_the_stream_holding_at_most_window_shards(setup, monkeypatch):
    cache = setup["cache"]
    ordered = torch.cat(list(cache.batches(10)))
    assert torch.equal(ordered, stream(cache)["activations"])
    live, most = [0], [0]

    def counted_load(*args, **kwargs):
        tensors = load(*args, **kwargs)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(tensors["activations"], lambda: live.__setitem__(0, live[0] - 1))
        return tensors

    monkeypatch.setattr(cache_module, "load", counted_load)
    first = [b.clone() for b in cache.batches(10, shuffle=True, seed=1, window_shards=2)]
    assert most[0] <= 2  # never more than a window of shards in memory
    again = list(cache.batches(10, shuffle=True, seed=1, window_shards=2))
    other = list(cache.batches(10, shuffle=True, seed=2, window_shards=2))
    shuffled = torch.cat(first)
    assert all(len(b) == 10 for b in first[:-1])
    assert len(shuffled) == len(ordered) and not torch.equal(shuffled, ordered)
    assert torch.equal(torch.sort(shuffled, dim=0).values, torch.sort(ordered, dim=0).values)
    assert torch.equal(shuffled[torch.argsort(shuffled[:, 0])], ordered[torch.argsort(ordered[:, 0])])
    assert torch.equal(torch.cat(again), shuffled) and not torch.equal(torch.cat(other), shuffled)
    with_metadata = next(cache.batches(10, shuffle=True, seed=1, window_shards=2, with_metadata=True))
    assert torch.equal(with_metadata["activations"], first[0]) and len(with_metadata["row"]) == 10


@pytest.mark.parametrize("storage_dtype", ["bfloat16", "float16"])
def test_half_precision_storage_round_trips_within_its_precision(setup, storage_dtype):
    llava = setup["llava"]
    half = ActivationCache(cache_activations(cache_args(setup["root"] / storage_dtype, storage_dtype=storage_dtype),
                                             model=llava.model, processor=llava.processor, dataset=setup["dataset"]))
    exact, stored = stream(setup["cache"]), stream(half)
    assert load_file(str(half.path / half.shards[0]["file"]))["activations"].dtype == getattr(torch, storage_dtype)
    assert stored["activations"].dtype == torch.float32
    assert torch.equal(stored["activations"], exact["activations"].to(getattr(torch, storage_dtype)).float())
    eps = torch.finfo(getattr(torch, storage_dtype)).eps
    assert torch.allclose(stored["activations"], exact["activations"], rtol=eps, atol=1e-6)
    assert all(torch.equal(stored[key], exact[key]) for key in ("modality", "row", "position"))
    # shuffled reading gathers in the storage dtype, then converts: the same tokens in the same order
    shuffled = torch.cat(list(half.batches(10, shuffle=True, seed=3, window_shards=2)))
    expected = torch.cat(list(setup["cache"].batches(10, shuffle=True, seed=3, window_shards=2)))
    assert shuffled.dtype == torch.float32 and torch.equal(shuffled, expected.to(getattr(torch, storage_dtype)).float())


def test_training_from_the_cache_gives_the_weights_training_from_the_mllm_gives(setup, tmp_path):
    llava, dataset, cache = setup["llava"], setup["dataset"], setup["cache"]
    direct = train_saev(tiny_args(tmp_path / "direct", max_steps=30, shuffle_dataset=False), llava.model,
                        llava.processor, dataset)
    cached = train_saev(tiny_args(tmp_path / "cached", max_steps=30, shuffle_dataset=False), dataset=cache)
    for name, value in direct.state_dict().items():  # bit for bit (feature_weights: NaN, unset, in both)
        torch.testing.assert_close(cached.state_dict()[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.isfinite(direct.W_enc).all() and direct.config.training_tokens == cached.config.training_tokens
    assert cached.config.input_scale == direct.config.input_scale
    assert cached.config.base_model_name_or_path == cache.manifest["model_name_or_path"]
    # shuffled rows (the default): the same procedure over the cache's rows. The MLLM then reads the rows in other
    # forward batches (other padding) than the cache did, so equality holds up to float rounding in general.
    direct = train_saev(tiny_args(tmp_path / "direct-shuffled", max_steps=30), llava.model, llava.processor, dataset)
    cached = train_saev(tiny_args(tmp_path / "cached-shuffled", max_steps=30),
                        dataset=DataArguments(activation_cache=str(cache.path)))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(cached.state_dict()[name], direct.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(cached.W_enc, train_saev(tiny_args(tmp_path / "other-seed", max_steps=30, seed=1),
                                                    dataset=cache).W_enc)
    # every cached token is read once per pass, in another order than the stream's
    trainer = SAEVTrainer(tiny_args(tmp_path / "shuffled"), train_dataset=cache)
    buffer = trainer.activation_buffer()
    read = []
    while buffer.data_pass == 0:
        read.append(buffer.read_tokens())
    read = torch.cat(read[:-1])
    expected = stream(cache)["activations"]
    assert len(read) == len(expected) and not torch.equal(read, expected)
    assert torch.equal(torch.sort(read, dim=0).values, torch.sort(expected, dim=0).values)


def test_training_from_a_cache_refuses_what_it_cannot_serve(setup, tmp_path):
    with pytest.raises(ValueError, match="holds layer 1, but layer=2"):
        SAEVTrainer(tiny_args(tmp_path / "a", layer=2), train_dataset=setup["cache"])
    with pytest.raises(ValueError, match="replaces the base model: pass no model= or processor="):
        SAEVTrainer(tiny_args(tmp_path / "b"), setup["llava"].model, setup["llava"].processor,
                    train_dataset=setup["cache"])
    with pytest.raises(ValueError, match="not an activation cache"):
        SAEVTrainer(tiny_args(tmp_path / "c"), train_dataset=DataArguments(activation_cache=str(tmp_path)))


def random_saev(d_in: int, seed: int = 0) -> SAEV:
    """An untrained SAE-V of layer 1 whose features fire on both modalities (random biases)."""
    torch.manual_seed(seed)
    sae = SAEV(SAEVConfig(d_in=d_in, d_sae=4 * d_in, hook_layer=1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("num_examples", [None, 12])
def test_weights_from_the_cache_are_the_weights_from_the_mllm(setup, num_examples):
    """Both passes (top-K, then the re-read of the rows holding chosen positions) and the calibration of delta read
    the cache's rows through its CacheReader: the same weights, delta and record as reading the MLLM."""
    llava, dataset, cache = setup["llava"], setup["dataset"], setup["cache"]
    args = WeightingArguments(batch_size=4, num_examples=num_examples, threshold_quantile=0.9)
    direct, cached = random_saev(cache.d_in), random_saev(cache.d_in)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    expected = compute_feature_weights(direct, reader, dataset, args)
    weights = compute_feature_weights(cached, CacheReader(cache), cached_rows(cache), args)
    assert int(torch.isfinite(expected).sum()) >= 5  # features with a weight, to compare
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.equal(torch.isnan(weights), torch.isnan(expected))  # the same features weighted
    assert cached.config.cooccurrence_threshold == direct.config.cooccurrence_threshold
    record, direct_record = cached.config.feature_weights_info, direct.config.feature_weights_info
    assert record["dataset_fingerprint"] == dataset._fingerprint == cache.manifest["dataset_fingerprint"]
    assert {k: v for k, v in record.items() if "percentiles" not in k} == \
        {k: v for k, v in direct_record.items() if "percentiles" not in k}


def test_weights_from_a_cache_refuse_what_it_cannot_serve(setup):
    cache = setup["cache"]
    with pytest.raises(ValueError, match="must be its rows.*Pass cached_rows"):
        compute_feature_weights(random_saev(cache.d_in), CacheReader(cache), setup["dataset"].select(range(5)))
    with pytest.raises(ValueError, match="holds layer 1.*Cache layer 2"):
        sae = random_saev(cache.d_in)
        sae.config.hook_layer = 2
        compute_feature_weights(sae, CacheReader(cache), cached_rows(cache))
    with pytest.raises(ValueError, match="is on cpu, but the activation cache.*is on meta"):
        compute_feature_weights(random_saev(cache.d_in), CacheReader(cache, "meta"), cached_rows(cache))
    named = ActivationCache(cache.path)
    named.manifest["model_name_or_path"] = "/models/llava"  # as a cache of a saved model records it
    other = random_saev(cache.d_in)
    other.config.base_model_name_or_path = "org/another-mllm"
    with pytest.raises(ValueError, match=r"made for 'org/another-mllm' but the activation cache .* holds the "
                                         r"activations of '/models/llava'"):
        compute_feature_weights(other, CacheReader(named), cached_rows(named))
    other.config.base_model_name_or_path = "llava-hf/llava"  # the cache's model under its Hub name: the same model
    CacheReader(named).check_sae(other)
    llava = setup["llava"]
    no_special = ActivationCache(cache_activations(cache_args(setup["root"] / "no-special-w", include_special_tokens=False,
                                                              max_rows=4), model=llava.model,
                                                   processor=llava.processor, dataset=setup["dataset"]))
    with pytest.raises(ValueError, match="made without them. Pass special_as_text=False"):
        compute_feature_weights(random_saev(cache.d_in), CacheReader(no_special), cached_rows(no_special))
    with pytest.raises(ValueError, match="without the special tokens"):
        evaluate_saev(random_saev(cache.d_in), reader=CacheReader(no_special), compute_ce_loss=False)


def test_evaluation_from_the_cache_is_the_evaluation_on_the_mllm(setup):
    llava, dataset, cache = setup["llava"], setup["dataset"], setup["cache"]
    sae = random_saev(cache.d_in, seed=1)
    direct = evaluate_saev(sae, llava.model, llava.processor, dataset, batch_size=4, num_examples=14,
                           compute_ce_loss=False)
    cached = evaluate_saev(sae, reader=CacheReader(cache), batch_size=4, num_examples=14, compute_ce_loss=False)
    assert direct["num_examples"] == cached["num_examples"] == 14 and direct["all"]["tokens"] > 0
    assert cached == {**direct, "model": cache.manifest["model_name_or_path"]}
    with pytest.raises(ValueError, match="CE-loss-recovered runs the MLLM.*compute_ce_loss=False"):
        evaluate_saev(sae, reader=CacheReader(cache))
    with pytest.raises(ValueError, match="or reader=CacheReader"):
        evaluate_saev(sae, compute_ce_loss=False)


def test_saev_weights_and_saev_eval_read_a_cache(setup, tmp_path, capsys):
    cache, llava = setup["cache"], setup["llava"]
    random_saev(cache.d_in).save_pretrained(tmp_path / "sae")
    setup["dataset"].save_to_disk(str(tmp_path / "data"))
    common = ["--sae_name_or_path", str(tmp_path / "sae"), "--batch_size", "4", "--device", "cpu"]
    assert cli_main(["weights", *common, "--activation_cache", str(cache.path), "--output_dir",
                     str(tmp_path / "from-cache")]) == 0
    assert cli_main(["weights", *common, "--model_name_or_path", str(llava.path), "--dataset_name",
                     str(tmp_path / "data"), "--output_dir", str(tmp_path / "from-mllm")]) == 0
    from_cache, from_mllm = SAEV.from_pretrained(tmp_path / "from-cache"), SAEV.from_pretrained(tmp_path / "from-mllm")
    torch.testing.assert_close(from_cache.feature_weights, from_mllm.feature_weights, rtol=0, atol=1e-6,
                               equal_nan=True)
    assert from_cache.has_feature_weight.sum() >= 5
    capsys.readouterr()
    for argv, message in [
        (["weights", *common, "--activation_cache", str(cache.path), "--model_name_or_path", "m", "--output_dir",
          str(tmp_path / "x")], "stands in for the MLLM and the dataset: drop model_name_or_path"),
        (["weights", *common, "--output_dir", str(tmp_path / "z")], "model_name_or_path and dataset_name required"),
        (["eval", "--sae_name_or_path", str(tmp_path / "sae"), "--activation_cache", str(cache.path)],
         "CE-loss-recovered runs the MLLM"),
        (["score", *common, "--activation_cache", str(cache.path), "--output_dir", str(tmp_path / "y")],
         "activation_cache is read by `saev train`, `weights` and `eval`; `saev score` runs the MLLM"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    eval_common = ["--sae_name_or_path", str(tmp_path / "sae"), "--batch_size", "4", "--num_examples", "12",
                   "--compute_ce_loss", "False", "--device", "cpu", "--disable_tqdm"]
    assert cli_main(["eval", *eval_common, "--activation_cache", str(cache.path), "--output_dir",
                     str(tmp_path / "cached")]) == 0
    assert "explained variance" in capsys.readouterr().out
    assert cli_main(["eval", *eval_common, "--model_name_or_path", str(llava.path), "--dataset_name",
                     str(tmp_path / "data"), "--output_dir", str(tmp_path / "direct")]) == 0
    cached, direct = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("cached", "direct"))
    assert {**cached, "model": None} == {**direct, "model": None} and cached["all"]["tokens"] > 0


def test_saev_cache_then_saev_train_from_the_cache(tiny_model_factory, tmp_path, capsys):
    llava = tiny_model_factory("llava")
    digit_dataset(8).save_to_disk(str(tmp_path / "data"))
    argv = ["cache", "--model_name_or_path", str(llava.path), "--dataset_name", str(tmp_path / "data"), "--layer",
            "1", "--output_dir", str(tmp_path / "cache"), "--shard_size_tokens", "150", "--read_batch_size", "4",
            "--storage_dtype", "bfloat16", "--disable_tqdm"]
    assert cli_main(argv) == 0
    cache = ActivationCache(tmp_path / "cache")
    assert f"Cached {cache.num_tokens} tokens of layer 1 (8 rows)" in capsys.readouterr().out
    assert cli_main(argv) == 0  # again on its own complete output: nothing to redo
    assert ActivationCache(tmp_path / "cache").shards == cache.shards
    streamed = [value if value != str(tmp_path / "cache") else str(tmp_path / "streamed") for value in argv]
    assert cli_main(streamed + ["--streaming"]) == 0  # the dataset read as a stream: the same cache
    assert_same_cache(ActivationCache(tmp_path / "streamed"), cache)
    assert cli_main(["train", "--activation_cache", str(tmp_path / "cache"), "--layer", "1", "--output_dir",
                     str(tmp_path / "out"), "--expansion_factor", "4", "--max_steps", "8", "--train_batch_size_tokens",
                     "32", "--buffer_size_tokens", "128", "--read_batch_size", "4", "--input_scale_estimation_tokens",
                     "64", "--disable_tqdm"]) == 0
    sae = SAEV.from_pretrained(tmp_path / "out")
    assert sae.config.base_model_name_or_path == str(llava.path) and sae.config.training_tokens == 8 * 32
    assert sae.config.dataset_name == str(tmp_path / "data") and sae.config.hook_layer == 1


def test_a_pushed_cache_reads_back_from_the_hub_with_its_card(setup, loopback_hub, capsys):
    from huggingface_hub import DatasetCard

    cache = setup["cache"]
    assert cli_main(["push", "--cache", str(cache.path), "--repo_id", "org/cache", "--license", "mit"]) == 0
    assert "Pushed the activation cache" in capsys.readouterr().out
    files = loopback_hub.files("org/cache", repo_type="dataset")
    assert set(files) >= {"README.md", MANIFEST_NAME, *(shard["file"] for shard in cache.shards)}
    assert not any(name.endswith(".tmp") or name == "saev_output.json" for name in files)
    card = DatasetCard.load("org/cache", repo_type="dataset")
    assert "activation-cache" in card.data.tags and card.data.license == "mit"
    assert f"{cache.num_tokens} tokens of 18 rows, d_in = {cache.d_in}" in card.text
    pulled = ActivationCache("org/cache")
    assert pulled.manifest == cache.manifest
    assert torch.equal(stream(pulled)["activations"], stream(cache)["activations"])
    with pytest.raises(SystemExit):  # --cache with an option of another kind
        cli_main(["push", "--cache", str(cache.path), "--repo_id", "org/x", "--source_dataset", "o/d"])
    assert "--source_dataset does not apply when pushing an activation cache" in capsys.readouterr().err


def test_a_text_only_model_caches_text_and_trains_a_plain_sae_from_it(tiny_text_model, tmp_path):
    model, tokenizer, dataset = tiny_text_model.model, tiny_text_model.processor, text_dataset(12)
    cache = ActivationCache(cache_activations(cache_args(tmp_path / "cache", shard_size_tokens=40), model=model,
                                              processor=tokenizer, dataset=dataset))
    assert len(cache.shards) > 1 and int(Modality.IMAGE) not in stream(cache)["modality"].tolist()
    direct = train_saev(tiny_args(tmp_path / "direct", max_steps=10, shuffle_dataset=False), model, tokenizer, dataset)
    cached = train_saev(tiny_args(tmp_path / "cached", max_steps=10, shuffle_dataset=False), dataset=cache)
    assert torch.equal(direct.W_enc, cached.W_enc) and torch.equal(direct.b_dec, cached.b_dec)


def test_a_damaged_or_missing_shard_is_refused_not_read(setup, tmp_path):
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(setup["cache"].path, copy)
    without_checksums(copy)  # a cache written before shards had checksums: its contents are checked
    cache = ActivationCache(copy)
    first = copy / cache.shards[0]["file"]
    tensors = load_file(str(first))
    tensors["activations"][3, 2] = float("nan")
    save_file(tensors, str(first))
    shard_rows = range(cache.shards[0]["first_row"], cache.shards[0]["first_row"] + cache.shards[0]["num_rows"])
    with pytest.raises(ValueError, match="non-finite activations"):
        cache.load_shard(0)
    with pytest.raises(ValueError, match="non-finite activations"):  # training reads rows, checked alike
        ActivationCache(copy).rows(list(shard_rows))
    save_file({k: v for k, v in tensors.items() if k != "position"}, str(first))
    with pytest.raises(ValueError, match=r"lacks the tensors \['position'\]"):
        cache.load_shard(0)
    with pytest.raises(ValueError, match=r"lacks the tensors \['position'\]"):
        ActivationCache(copy).rows([shard_rows[0]])
    save_file({k: v[:-1] for k, v in tensors.items()}, str(first))
    with pytest.raises(ValueError, match="the shard and cache_manifest.json disagree"):
        cache.load_shard(0)
    (copy / cache.shards[1]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        cache.load_shard(1)


def without_checksums(folder):
    """Drop the shards' SHA-256 from a cache's manifest (as a cache written before they were recorded)."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        entry.pop("sha256")
    path.write_text(json.dumps(manifest))


def test_changed_swapped_truncated_or_mislabelled_shards_and_a_damaged_manifest_are_named(setup, tmp_path):
    import shutil

    def fresh(name):
        folder = tmp_path / name
        shutil.copytree(setup["cache"].path, folder)
        return folder, ActivationCache(folder)

    folder, cache = fresh("changed")
    first = folder / cache.shards[0]["file"]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0x01  # one bit of one activation
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.safetensors .* is not the file `saev cache` wrote"):
        cache.load_shard(0)
    with pytest.raises(ValueError, match="shard-00000.safetensors .* SHA-256 differs"):
        ActivationCache(folder).rows([0])

    folder, cache = fresh("swapped")
    a, b = (folder / cache.shards[i]["file"] for i in (0, 1))
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        cache.load_shard(1)
    without_checksums(folder)  # without checksums, the shapes or the rows give the swap away
    with pytest.raises(ValueError, match=r"shard-00000.safetensors .*(disagree|renamed or mixed)"):
        ActivationCache(folder).load_shard(0)
    tensors = load_file(str(b))  # the first shard's own tensors (moved to the second's name), its rows renumbered
    tensors["row"] = tensors["row"] + 1000
    save_file(tensors, str(a))
    with pytest.raises(ValueError, match=r"shard-00000.safetensors .* holds rows 1000\.\.\d+, where the manifest "
                                         r"says 0\.\.\d+ in order: the shards were renamed or mixed"):
        ActivationCache(folder).load_shard(0)

    folder, cache = fresh("truncated")
    without_checksums(folder)
    first = folder / cache.shards[0]["file"]
    first.write_bytes(first.read_bytes()[:200])
    with pytest.raises(ValueError, match="shard-00000.safetensors .* is damaged"):
        ActivationCache(folder).load_shard(0)
    with pytest.raises(ValueError, match="shard-00000.safetensors .* is damaged"):
        ActivationCache(folder).rows([0])

    folder, cache = fresh("dtype")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["storage_dtype"] = "bfloat16"  # the shards hold float32
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="stores torch.float32 activations, where the manifest says bfloat16"):
        ActivationCache(folder).load_shard(0)

    folder, _ = fresh("manifest")
    text = (folder / MANIFEST_NAME).read_text()
    (folder / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="cache_manifest.json is damaged"):
        ActivationCache(folder)


def test_identical_runs_write_identical_shards(setup, tmp_path):
    again = cache_activations(cache_args(tmp_path / "again"), model=setup["llava"].model,
                              processor=setup["llava"].processor, dataset=setup["dataset"])
    cache = setup["cache"]
    for entry in cache.shards:
        assert (again / entry["file"]).read_bytes() == (cache.path / entry["file"]).read_bytes()
    assert [e["sha256"] for e in ActivationCache(again).shards] == [e["sha256"] for e in cache.shards]
