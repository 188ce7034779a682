"""SAELens interoperability: the layout the SAE-V authors published, read and written, checked through sae-lens itself."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from saev_hf import SAEV, SAEVConfig
from saev_hf.model.saelens import config_from_saelens

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is installed by the dev extra; CI installs it")


def make_sae(**kwargs):
    torch.manual_seed(1)
    sae = SAEV(SAEVConfig(**{"d_in": 16, "d_sae": 40, "hook_layer": 2, "base_model_name_or_path": "org/mllm", **kwargs}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.3)
    return sae


def write_authors_checkpoint(folder, d_in=16, d_sae=40, seed=2, **cfg_overrides):
    """A checkpoint in the pre-6 SAELens layout of the authors' SAELens-V fork, with its own reference weights."""
    torch.manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, d_sae) * 0.2,
        "b_enc": torch.randn(d_sae) * 0.05,
        "W_dec": torch.randn(d_sae, d_in) * 0.2,
        "b_dec": torch.randn(d_in) * 0.3,
    }
    cfg = {
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "activation_fn_str": "relu",
        "apply_b_dec_to_input": False, "finetuning_scaling_factor": False, "context_size": 4096,
        "model_name": "llava-hf/llava-v1.6-mistral-7b-hf", "hook_name": "blocks.16.hook_resid_post",
        "hook_layer": 16, "hook_head_index": None, "prepend_bos": True, "dataset_path": "HuggingFaceM4/OBELICS",
        "dtype": "float32", "device": "cuda", "sae_lens_training_version": "3.13.0",
        "normalize_activations": "none", **cfg_overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")
    save_file({"sparsity": torch.linspace(-6, -1, d_sae)}, folder / "sparsity.safetensors")
    return weights


def test_authors_layout_loads_with_its_fields_and_numerics(tmp_path):
    weights = write_authors_checkpoint(tmp_path / "SAEV_LLaVA_NeXT-7b_OBELICS")
    sae = SAEV.from_pretrained(tmp_path, subfolder="SAEV_LLaVA_NeXT-7b_OBELICS")
    config = sae.config
    assert (config.d_in, config.d_sae, config.activation, config.hook_layer) == (16, 40, "relu", 16)
    assert config.base_model_name_or_path == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert config.dataset_name == "HuggingFaceM4/OBELICS" and config.apply_b_dec_to_input is False
    torch.testing.assert_close(sae.feature_log_sparsity, torch.linspace(-6, -1, 40))
    x = torch.randn(9, 16)
    expected = torch.relu(x @ weights["W_enc"] + weights["b_enc"])  # the format's definition, b_dec not subtracted
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ weights["W_dec"] + weights["b_dec"])


def test_authors_layout_equals_sae_lens_own_loading(tmp_path):
    write_authors_checkpoint(tmp_path, apply_b_dec_to_input=True)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    ours = SAEV.from_pretrained(tmp_path)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x))
    torch.testing.assert_close(ours(x).reconstruction, theirs(x))


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_ours_saved_as_saelens_loads_in_sae_lens_with_equal_outputs(tmp_path, activation):
    sae = make_sae(input_scale=2.0, apply_b_dec_to_input=True, **({"activation": "topk", "k": 6} if activation == "topk" else {}))
    weights = torch.full((40,), math.nan)
    weights[:5] = torch.tensor([0.0, 0.1, 0.2, -0.3, 0.4])
    sae.set_feature_weights(weights, info={"num_examples": 7})
    sae.save_saelens(tmp_path)
    assert sae.config.input_scale == 2.0, "exporting must not modify the model"
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == ("topk" if activation == "topk" else "standard")
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "org/mllm"
    x = torch.randn(4, 3, 16)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x))
    torch.testing.assert_close(theirs(x), sae(x).reconstruction)

    back = SAEV.from_pretrained(tmp_path)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back.feature_weights, weights, equal_nan=True)
    assert back.config.feature_weights_info == {"num_examples": 7}
    assert (back.config.hook_layer, back.config.activation, back.config.k) == (2, sae.config.activation, sae.config.k)


def test_sae_lens_saved_model_loads_in_saev_with_equal_outputs(tmp_path):
    cfg = sae_lens.StandardSAEConfig(d_in=16, d_sae=40, apply_b_dec_to_input=True)
    cfg.metadata.model_name = "org/text-llm"
    cfg.metadata.hook_name = "blocks.5.hook_resid_pre"
    theirs = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_model(tmp_path)
    ours = SAEV.from_pretrained(tmp_path)
    assert ours.config.hook_layer == 4, "resid_pre of block 5 is the output of decoder layer 4"
    assert ours.config.base_model_name_or_path == "org/text-llm"
    assert torch.isnan(ours.feature_weights).all()
    x = torch.randn(7, 16)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x))
    torch.testing.assert_close(ours(x).reconstruction, theirs(x))


def test_local_folder_and_saelens_folder_give_identical_encodings(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path / "hf")
    sae.save_saelens(tmp_path / "saelens")
    x = torch.randn(11, 16)
    assert torch.equal(SAEV.from_pretrained(tmp_path / "hf").encode(x), SAEV.from_pretrained(tmp_path / "saelens").encode(x))


def test_d_in_that_does_not_match_saelens_weights_is_a_clear_error(tmp_path):
    write_authors_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_in"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc .* has shape \[16, 40\], but the config says d_in=32"):
        SAEV.from_pretrained(tmp_path)


def test_incomplete_saelens_folder_is_a_clear_error(tmp_path):
    write_authors_checkpoint(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(OSError, match="incomplete SAELens checkpoint: it needs both cfg.json and sae_weights"):
        SAEV.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"hook_name": "blocks.3.hook_mlp_out"}, "not a residual stream"),
        ({"hook_name": "blocks.0.hook_resid_pre"}, "reads the embeddings"),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn='tanh-relu' is not supported"),
    ],
)
def test_unsupported_saelens_configs_are_clear_errors(overrides, message):
    cfg = {"d_in": 16, "d_sae": 40, "architecture": "standard", "hook_name": "blocks.1.hook_resid_post", **overrides}
    with pytest.raises(ValueError, match=message):
        config_from_saelens(cfg)


def test_pre_6_topk_and_normalisation_factor_are_mapped():
    cfg = {
        "d_in": 16, "d_sae": 40, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7},
        "hook_point": "model.layers.9", "normalize_activations": "expected_average_only_in", "norm_scaling_factor": 3.5,
    }
    config = config_from_saelens(cfg)
    assert (config.activation, config.k, config.hook_layer, config.input_scale) == ("topk", 7, 9, 3.5)
    assert config.apply_b_dec_to_input is True, "SAELens before 6.0 defaults apply_b_dec_to_input to True"
