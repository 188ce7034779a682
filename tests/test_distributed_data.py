"""Feature weights and scores over several processes (torchrun, 2 gloo processes on the CPU) equal one process's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from saev_hf import SAEV, SAEVConfig, LayerReader, WeightingArguments, compute_feature_weights
from saev_hf.cache import ActivationCache, CacheArguments, CacheReader, cache_activations, cached_rows
from saev_hf.cli import main as cli_main
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.activations import load_model_and_processor
from saev_hf.scoring.mapping import SHARDS_FOLDER
from saev_hf.weighting.top_k import POSITION_STRIDE
from saev_hf.weighting.cosine import CosineAccumulator
from saev_hf.weighting.weights import _top_k_pass, _weighting_sample

TESTS = Path(__file__).parent
CAPTIONS = ("a handwritten digit {}", "what digit is this ? it is {}", "the image shows a handwritten number {}", "{}")


def digit_rows(n: int, seed: int = 0) -> dict:
    pairs = digit_images(n, seed=seed)
    return {"images": [[image] for image, _ in pairs],
            "prompt": [CAPTIONS[i % len(CAPTIONS)].format(DIGIT_NAMES[label]) for i, (_, label) in enumerate(pairs)]}


def torchrun(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 COMMAND`, one thread per process, in its own
    session so that a hang is killed with every worker (killing torchrun alone would orphan them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"the 2-process run did not finish in {timeout} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("distributed")
    # 26 distinct rows: in batches of 4, process 0 reads rows 0-15 (4 batches), process 1 rows 16-25 (3)
    datasets.Dataset.from_dict(digit_rows(26, seed=2)).save_to_disk(root / "plain")
    # 8 rows 3 times: batches of 4 are A B A B A B (process 0: A B A, process 1: B A B), so every activation is tied
    # with copies of it on both processes, which only the earlier-position rule can tell apart
    rows = digit_rows(8, seed=5)
    datasets.Dataset.from_dict({name: values * 3 for name, values in rows.items()}).save_to_disk(root / "ties")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.save_pretrained(root / "sae")
    model, processor = load_model_and_processor(str(llava.path), device="cpu")
    cache_activations(CacheArguments(output_dir=str(root / "cache"), layer=1, read_batch_size=4, disable_tqdm=True),
                      model=model, processor=processor, dataset=datasets.load_from_disk(str(root / "plain")))
    return llava, LayerReader(model, processor, layer=1), root


CONFIGS = {
    "plain": dict(data="plain", num_examples=None, batch_size=4, threshold_quantile=0.5),
    "ties": dict(data="ties", num_examples=None, batch_size=4),
    "sampled_per_modality_centred": dict(data="plain", num_examples=19, batch_size=3, top_k_pool="per_modality",
                                         mean_center=True, special_as_text=False),
    "stream": dict(data="plain", streamed=True, num_examples=22, batch_size=4, threshold_quantile=0.25),
    "activation_cache": dict(activation_cache="cache", num_examples=None, batch_size=4, threshold_quantile=0.5),
}


def one_process(reader, root, config):
    """The weights, and the SAE-V that stores them, computed here by one process."""
    config = dict(config)
    if "activation_cache" in config:
        cache = ActivationCache(root / config.pop("activation_cache"))
        reader, data = CacheReader(cache), cached_rows(cache)
    else:
        data = datasets.load_from_disk(str(root / config.pop("data")))
    if config.pop("streamed", False):
        data = data.to_iterable_dataset()
    sae = SAEV.from_pretrained(root / "sae")
    return compute_feature_weights(sae, reader, data, WeightingArguments(**config)), sae


def assert_bit_equal(actual, expected):
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num())


def test_two_processes_compute_exactly_the_weights_of_one_process(setup):
    llava, reader, root = setup
    configs = {name: {**config, **{key: str(root / config[key]) for key in ("data", "activation_cache")
                                   if key in config}}
               for name, config in CONFIGS.items()}
    out = root / "weights"
    out.mkdir()
    run = torchrun(str(TESTS / "distributed_weights_script.py"), str(llava.path), str(root / "sae"), str(out),
                   json.dumps(configs))
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [(load_file(out / f"rank_{i}.safetensors"), json.loads((out / f"rank_{i}.json").read_text()))
             for i in range(2)]
    assert [r["process"]["process_index"] for _, r in ranks] == [0, 1]
    assert all(r["process"]["num_processes"] == 2 and r["process"]["distributed_type"] == "DistributedType.MULTI_CPU"
               for _, r in ranks)
    for name, config in CONFIGS.items():
        expected, sae = one_process(reader, root, config)
        assert (~expected.isnan()).sum() >= 2, name  # features were weighted: the equality says something
        info = json.loads(json.dumps(sae.config.feature_weights_info, default=str))
        for weights, record in ranks:  # every process returned and stored the one-process result
            assert_bit_equal(weights[name], expected)
            assert record[name]["info"] == {**info, "num_processes": 2}, name
            assert record[name]["delta"] == sae.config.cooccurrence_threshold, name
            assert record[name]["delta_info"] == json.loads(json.dumps(sae.config.cooccurrence_threshold_info)), name
        if config.get("threshold_quantile"):  # all positives fit the sample: the calibrated delta is exact
            assert sae.config.cooccurrence_threshold_info["num_sampled"] == \
                sae.config.cooccurrence_threshold_info["num_positive_activations"]
            assert sae.config.cooccurrence_threshold != 0.05


def test_the_distributed_cases_straddle_the_shard_boundary(setup):
    """What the equality above covers: cosine positions and top-K ties on both processes' shards."""
    _, reader, root = setup
    sae = SAEV.from_pretrained(root / "sae")
    plain = datasets.load_from_disk(str(root / "plain"))
    args = WeightingArguments(num_examples=None, batch_size=4)
    first = _top_k_pass(sae, reader, plain, args, _weighting_sample(plain, args))
    _, _, weighted, chosen = first.top.selection(args.per_modality)
    rows = chosen[:, weighted] // POSITION_STRIDE  # (2 * per_modality, weighted features): the rows of the cosines
    assert ((rows < 16).any(0) & (rows >= 16).any(0)).any()  # a feature's cosine mixes rows of both processes
    needed = CosineAccumulator(weighted, chosen, args.per_modality, sae.config.d_in).needed_examples()
    assert min(needed) < 16 <= max(needed)

    ties = datasets.load_from_disk(str(root / "ties"))
    first = _top_k_pass(sae, reader, ties, args, _weighting_sample(ties, args))
    values, rows = first.top.values, first.top.positions // POSITION_STRIDE
    straddled = 0
    for f in range(values.shape[1]):
        for value in values[:, f][values[:, f] > 0].unique():
            kept = rows[:, f][values[:, f] == value]
            straddled += bool((kept < 12).any() and (kept >= 12).any())
    assert straddled >= 10  # equal activations kept from both shards: the merge must order them by position


def test_saev_weights_and_score_on_two_processes_write_what_one_process_writes(setup, tmp_path):
    llava, _, root = setup
    data = root / "plain"
    common = ["--model_name_or_path", str(llava.path), "--dataset_name", str(data), "--device", "cpu",
              "--disable_tqdm"]
    weights = ["weights", "--sae_name_or_path", str(root / "sae"), *common, "--num_examples", "26", "--batch_size",
               "4"]
    assert cli_main([*weights, "--output_dir", str(tmp_path / "weighted_1")]) == 0
    run = torchrun("-m", "saev_hf.cli", *weights, "--output_dir", str(tmp_path / "weighted_2"))
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("features weighted over 26 examples") == 1  # the main process reports
    one, two = SAEV.from_pretrained(tmp_path / "weighted_1"), SAEV.from_pretrained(tmp_path / "weighted_2")
    assert_bit_equal(two.feature_weights, one.feature_weights)
    assert one.has_feature_weight.any()

    score = ["score", "--sae_name_or_path", str(tmp_path / "weighted_1"), *common, "--batch_size", "4"]
    assert cli_main([*score, "--output_dir", str(tmp_path / "scored_1")]) == 0
    run = torchrun("-m", "saev_hf.cli", *score, "--output_dir", str(tmp_path / "scored_2"))
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Scored 26 examples") == 1
    assert not (tmp_path / "scored_2" / SHARDS_FOLDER).exists()  # the shards were assembled, then removed
    one, two = (datasets.load_from_disk(str(tmp_path / f"scored_{n}")) for n in (1, 2))
    assert two.features == one.features and len(two) == len(one) == 26
    # every column, in row order: scores bit-equal (each row scored in the same batch), images and prompts in place
    undecoded = datasets.Sequence(datasets.Image(decode=False))
    assert two.cast_column("images", undecoded).to_dict() == one.cast_column("images", undecoded).to_dict()
    assert two["prompt"] == datasets.load_from_disk(str(data))["prompt"]
    assert any(score > 0 for score in one["saev_cosine_score"])  # scores that could have differed


def test_a_bad_row_on_the_second_process_fails_the_distributed_score_naming_its_row(setup, tmp_path):
    llava, _, root = setup
    rows = digit_rows(24, seed=2)
    rows["images"][21] = []  # in process 1's shard
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "bad")
    run = torchrun("-m", "saev_hf.cli", "score", "--sae_name_or_path", str(root / "sae"), "--model_name_or_path",
                   str(llava.path), "--dataset_name", str(tmp_path / "bad"), "--device", "cpu", "--disable_tqdm",
                   "--batch_size", "4", "--scores", "l0", "--output_dir", str(tmp_path / "scored"), timeout=240)
    assert run.returncode != 0  # the launcher stopped process 0, which waited for process 1's shard
    assert "Row 21 has no image in column 'images'" in run.stderr  # the row of the dataset, not of the shard
    assert not (tmp_path / "scored" / "dataset_info.json").exists()  # nothing was assembled


def test_fewer_rows_than_processes_score_like_one_process(setup, tmp_path):
    llava, _, root = setup
    datasets.Dataset.from_dict(digit_rows(1, seed=4)).save_to_disk(tmp_path / "one")
    score = ["score", "--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path),
             "--dataset_name", str(tmp_path / "one"), "--device", "cpu", "--disable_tqdm", "--scores", "l0"]
    assert cli_main([*score, "--output_dir", str(tmp_path / "scored_1")]) == 0
    run = torchrun("-m", "saev_hf.cli", *score, "--output_dir", str(tmp_path / "scored_2"), timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]  # process 1 has no row to score
    one, two = (datasets.load_from_disk(str(tmp_path / f"scored_{n}")) for n in (1, 2))
    assert len(two) == 1 and two["saev_l0"] == one["saev_l0"]


class FakeState:
    """What `batch_share` and the weighting read of accelerate's state, for process `process_index` of `n`."""

    def __init__(self, process_index: int, num_processes: int) -> None:
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = self.is_local_main_process = process_index == 0

    def split_between_processes(self, inputs):
        from accelerate import PartialState

        return PartialState.split_between_processes(self, inputs)  # accelerate's own cut, for this process


@pytest.mark.parametrize("processes, expected", [
    (2, [range(0, 16), range(16, 26)]),
    (3, [range(0, 12), range(12, 20), range(20, 26)]),
    (8, [range(0, 4), range(4, 8), range(8, 12), range(12, 16), range(16, 20), range(20, 24), range(24, 26), []]),
])
def test_each_process_gets_a_contiguous_run_of_whole_batches(processes, expected):
    from saev_hf.runtime.distributed import batch_share

    rows = list(range(100, 126))  # 26 rows (dataset indices), in batches of 4: 7 batches
    shares = [batch_share(rows, 4, FakeState(i, processes)) for i in range(processes)]
    assert shares == [[rows[i] for i in share] for share in expected]
    assert batch_share(rows, 4, None) == rows  # one process: everything


def test_merged_calibration_samples_are_every_value_when_they_fit_and_a_uniform_sample_otherwise():
    from saev_hf.weighting.delta import PositiveSample

    acts = torch.rand(2, 300, 8) - 0.5  # two processes' activations, about half positive
    whole = PositiveSample(seed=1)
    whole.update(acts.flatten(0, 1))
    parts = [PositiveSample(seed=1 + i) for i in range(2)]
    for part, chunk in zip(parts, acts):
        part.update(chunk)
    merged = PositiveSample(seed=1)
    merged.merge([(p.values, p.keys, p.seen) for p in parts])
    assert merged.seen == whole.seen == merged.size  # everything fits: the very same values
    assert torch.equal(merged.values.sort().values, whole.values.sort().values)
    assert merged.quantile(0.3) == whole.quantile(0.3)

    small = [PositiveSample(capacity=100, seed=1 + i) for i in range(2)]
    for part, chunk in zip(small, acts):
        part.update(chunk)
    merged = PositiveSample(capacity=100, seed=1)
    merged.merge([(p.values, p.keys, p.seen) for p in small])
    assert merged.size == 100 and merged.seen == whole.seen  # a sample of the capacity, counting every positive
    kept = torch.cat([p.keys for p in small]).sort().values[:100]
    assert torch.equal(merged.keys.sort().values, kept)  # the smallest keys of both: uniform over the union
    assert set(merged.values.tolist()) <= set(whole.values.tolist())


def test_a_stream_without_num_examples_is_refused_on_several_processes(setup, monkeypatch):
    import saev_hf.weighting.weights as weights

    _, reader, root = setup
    monkeypatch.setattr(weights, "distributed_state", lambda cpu=False: FakeState(0, 2))
    stream = datasets.load_from_disk(str(root / "plain")).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"over 2 processes needs its length.*num_examples"):
        compute_feature_weights(SAEV.from_pretrained(root / "sae"), reader, stream,
                                WeightingArguments(num_examples=None))
