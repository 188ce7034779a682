"""dtype and device the ecosystem's way (issue 16): one `model_dtype` ('auto' = the checkpoint's own) and `device_map`
for every loader, the SAE-V placed with the layer it reads or refused with both devices named, TF32 only while a
float32 SAE-V encodes on a GPU."""

import copy
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import HfArgumentParser

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality, layer_device
from saev_hf.scoring.activity import example_activity
from saev_hf.activations import MODEL_DTYPES, load_model_and_processor
from saev_hf.runtime.devices import sae_matmul_precision
from saev_hf.scoring import SAEVScorer, ScorerArguments
from saev_hf.arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from saev_hf.weighting import WeightingArguments, compute_feature_weights


def tiny_sae(**config):
    torch.manual_seed(0)
    return SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1, **config))


def test_auto_dtype_is_the_checkpoint_dtype(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    model, _ = load_model_and_processor(str(llava.path))  # default 'auto': the tiny checkpoint is float32
    assert model.dtype == torch.float32
    bf16 = copy.deepcopy(llava.model).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    llava.processor.save_pretrained(tmp_path / "bf16")
    assert load_model_and_processor(str(tmp_path / "bf16"))[0].dtype == torch.bfloat16
    assert load_model_and_processor(str(tmp_path / "bf16"), dtype="float32")[0].dtype == torch.float32
    assert load_model_and_processor(str(llava.path), dtype="bfloat16")[0].dtype == torch.bfloat16


def test_device_map_is_passed_to_from_pretrained(tiny_model_factory, monkeypatch):
    from transformers import AutoModelForImageTextToText

    llava = tiny_model_factory("llava")
    asked = []
    original = AutoModelForImageTextToText.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: asked.append(kwargs) or original(cls, *args, **kwargs)))
    model, _ = load_model_and_processor(str(llava.path), device_map="cpu")
    assert asked[-1]["device_map"] == "cpu" and model.device == torch.device("cpu")
    load_model_and_processor(str(llava.path))
    assert "device_map" not in asked[-1]  # None: transformers' own default placement, then `device`
    with pytest.raises(ValueError, match=r"Give either device='cpu' .* or device_map='cpu'"):
        load_model_and_processor(str(llava.path), device="cpu", device_map="cpu")
    with pytest.raises(ValueError, match=r"dtype='float8' is not supported; use one of"):
        load_model_and_processor(str(llava.path), dtype="float8")


def test_every_command_that_loads_the_mllm_takes_model_dtype_device_and_device_map():
    from saev_hf.cli import COMMANDS

    loading = [name for name, command in COMMANDS.items() if ModelArguments in command.arguments()]
    assert set(loading) == {"cache", "train", "eval", "weights", "score", "inspect", "patches", "dpo", "steer",
                            "explore", "label"}
    parser = HfArgumentParser(ModelArguments)
    (model,) = parser.parse_args_into_dataclasses(["--model_name_or_path", "m", "--model_dtype", "bfloat16",
                                                   "--device_map", "auto"])
    assert (model.model_dtype, model.device_map, model.device) == ("bfloat16", "auto", "auto")
    (default,) = parser.parse_args_into_dataclasses(["--model_name_or_path", "m"])
    assert (default.model_dtype, default.device_map) == ("auto", None)
    assert MODEL_DTYPES == ("auto", "bfloat16", "float16", "float32")
    with pytest.raises(ValueError, match=r"model_dtype='float8' is not supported"):
        ModelArguments("m", model_dtype="float8")
    with pytest.raises(ValueError, match=r"Give either device='cuda:1' .* or device_map='auto'"):
        ModelArguments("m", device="cuda:1", device_map="auto")


def test_load_sources_loads_in_the_dtype_asked_and_puts_the_sae_with_its_layer(tiny_model_factory, tmp_path,
                                                                              monkeypatch):
    llava = tiny_model_factory("llava")
    tiny_sae().save_pretrained(tmp_path / "sae")
    datasets.Dataset.from_dict({"prompt": ["a"]}).save_to_disk(tmp_path / "data")
    sae_args, data_args = SAEArguments(str(tmp_path / "sae")), DataArguments(str(tmp_path / "data"))
    sae, model, _, _ = load_sources(sae_args, ModelArguments(str(llava.path), model_dtype="bfloat16", device_map="cpu"),
                                    data_args)
    assert model.dtype == torch.bfloat16
    assert sae.W_enc.dtype == torch.float32  # the SAE-V keeps its own dtype
    # the SAE-V goes where the layer it reads runs (here faked as another device)
    seen = []
    monkeypatch.setattr("saev_hf.arguments.layer_device",
                        lambda model, layer: seen.append(layer) or torch.device("meta"))
    sae, _, _, _ = load_sources(sae_args, ModelArguments(str(llava.path), device="cpu"), data_args)
    assert seen == [1] and sae.W_enc.device.type == "meta"


def test_layer_device_follows_accelerate_hooks(tiny_model_factory):
    llava = tiny_model_factory("llava")
    reader = LayerReader(llava.model, llava.processor, layer=1)
    assert layer_device(llava.model, 1) == reader.device == torch.device("cpu")
    layer = reader.layers[1]
    layer._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))  # as device_map would attach
    try:
        assert layer_device(llava.model, 1) == reader.device == torch.device("meta")
        assert layer_device(llava.model, 0) == torch.device("cpu")
    finally:
        del layer._hf_hook


def test_an_sae_on_another_device_than_the_model_is_refused_naming_both(tiny_model_factory):
    llava = tiny_model_factory("llava")
    sae = tiny_sae().to("meta")
    expected = r"The SAE-V is on meta, but .* is on cpu.*sae\.to\('cpu'\)"
    with pytest.raises(ValueError, match=expected):
        SAEVScorer(sae, llava.model, llava.processor)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    with pytest.raises(ValueError, match=expected):
        compute_feature_weights(sae, reader, [{"images": [], "prompt": "a"}], WeightingArguments(num_examples=None))
    hidden = torch.randn(6, 64)
    modality = torch.tensor([Modality.TEXT] * 3 + [Modality.IMAGE] * 3, dtype=torch.int8)
    with pytest.raises(ValueError, match=expected):
        example_activity(sae, hidden, modality, row=0)


def test_lazy_scorer_loads_in_its_dtype_and_places_the_sae_with_the_model(tiny_model_factory, tmp_path, monkeypatch):
    llava = tiny_model_factory("llava")
    sae = tiny_sae(cooccurrence_threshold=0.0)
    sae.save_pretrained(tmp_path / "sae")
    scorer = SAEVScorer(str(tmp_path / "sae"), str(llava.path), args=ScorerArguments(scores=["l0"]),
                        model_dtype="bfloat16", device_map="cpu")
    loaded_sae, model, _ = scorer._load()
    assert model.dtype == torch.bfloat16 and loaded_sae.W_enc.device == torch.device("cpu")
    scores = scorer.score_rows({"images": [[_image()]], "prompt": ["a cat"]})
    assert scores["saev_l0"][0] > 0
    placed = []
    monkeypatch.setattr("saev_hf.scoring.map_function.layer_device",
                        lambda model, layer, layers=None: placed.append(layer) or torch.device("meta"))
    other = SAEVScorer(str(tmp_path / "sae"), str(llava.path))
    assert other._load()[0].W_enc.device.type == "meta" and placed == [1]
    with pytest.raises(ValueError, match=r"model_dtype='bfloat16' and device_map=None say how to load the MLLM"):
        SAEVScorer(sae, llava.model, llava.processor, model_dtype="bfloat16")


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_lazy_scorer_dtype_and_device_map_are_part_of_its_fingerprint(tiny_model_factory, tmp_path):
    from datasets.fingerprint import Hasher

    llava = tiny_model_factory("llava")
    tiny_sae().save_pretrained(tmp_path / "sae")
    sae, model = str(tmp_path / "sae"), str(llava.path)
    fp32 = Hasher.hash(SAEVScorer(sae, model, model_dtype="float32"))
    assert Hasher.hash(SAEVScorer(sae, model, model_dtype="float32")) == fp32
    assert Hasher.hash(SAEVScorer(sae, model, model_dtype="bfloat16")) != fp32
    assert Hasher.hash(SAEVScorer(sae, model, model_dtype="float32", device_map="cpu")) != fp32


def test_tf32_only_while_a_cuda_sae_encodes_and_restored_afterwards():
    before = torch.get_float32_matmul_precision()
    with sae_matmul_precision("cpu"):
        assert torch.get_float32_matmul_precision() == before  # no TF32 on the CPU
    with sae_matmul_precision("cuda:0", allow_tf32=False):
        assert torch.get_float32_matmul_precision() == before
    with sae_matmul_precision("cuda:0"):
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls allowed
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError, match="boom"):
        with sae_matmul_precision(torch.device("cuda", 0)):
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before


def test_scorer_encodes_under_the_tf32_switch_it_was_given(tiny_model_factory, monkeypatch):
    import contextlib

    llava = tiny_model_factory("llava")
    calls = []

    @contextlib.contextmanager
    def spy(device, allow_tf32=True):
        calls.append((torch.device(device).type, allow_tf32))
        yield

    monkeypatch.setattr("saev_hf.scoring.activity.sae_matmul_precision", spy)
    rows = {"images": [[_image()]], "prompt": ["a cat"]}
    sae = tiny_sae(cooccurrence_threshold=0.0)
    args = ScorerArguments(scores=["l0"], allow_tf32=False)
    SAEVScorer(sae, llava.model, llava.processor, args=args).score_rows(rows)
    assert calls and set(calls) == {("cpu", False)}
    calls.clear()
    SAEVScorer(sae, llava.model, llava.processor, args=ScorerArguments(scores=["l0"])).score_rows(rows)
    assert calls and set(calls) == {("cpu", True)}
