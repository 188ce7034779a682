"""SAE-V on the Hub: push_to_hub and from_pretrained("org/name") through a loopback Hub server, in both layouts."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from saev_hf import SAEV, SAEVConfig


def make_sae(input_scale=1.7):
    torch.manual_seed(3)
    config = SAEVConfig(d_in=16, d_sae=40, hook_layer=2, base_model_name_or_path="org/mllm", input_scale=input_scale)
    sae = SAEV(config)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.3)
        sae.feature_log_sparsity.uniform_(-5, -1)
    weights = torch.full((40,), math.nan)
    weights[::3] = torch.linspace(-0.2, 0.9, 14)
    weights[1] = 0.0
    sae.set_feature_weights(weights, info={"num_examples": 12, "top_k": 30})
    return sae


def assert_same_tensors(loaded, sae):
    assert set(loaded.state_dict()) == set(sae.state_dict()) == {
        "W_enc", "b_enc", "W_dec", "b_dec", "feature_weights", "feature_log_sparsity"
    }
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True)


def test_push_to_hub_then_from_pretrained_and_auto_model_give_every_tensor(loopback_hub, tmp_path):
    sae = make_sae()
    sae.push_to_hub("org/saev-tiny")
    assert set(loopback_hub.files("org/saev-tiny")) >= {"config.json", "model.safetensors"}

    loaded = SAEV.from_pretrained("org/saev-tiny")
    assert_same_tensors(loaded, sae)
    assert loaded.config.feature_weights_info == {"num_examples": 12, "top_k": 30}
    assert loaded.config.input_scale == 1.7

    auto = AutoModel.from_pretrained("org/saev-tiny")
    assert type(auto) is SAEV
    assert_same_tensors(auto, sae)
    assert isinstance(AutoConfig.from_pretrained("org/saev-tiny"), SAEVConfig)


def test_local_hub_and_saelens_subfolder_give_identical_encodings(loopback_hub, tmp_path):
    sae = make_sae(input_scale=1.0)  # the same weights in both layouts (a scale would be folded in for SAELens)
    sae.save_pretrained(tmp_path / "local")
    sae.push_to_hub("org/saev-tiny")
    sae.save_saelens(tmp_path / "saelens")
    loopback_hub.api.create_repo("org/SAE-V")
    loopback_hub.api.upload_folder(
        repo_id="org/SAE-V", folder_path=tmp_path / "saelens", path_in_repo="SAEV_Tiny_layer2"
    )
    x = torch.randn(3, 9, 16)
    expected = sae.encode(x)
    for loaded in (
        SAEV.from_pretrained(tmp_path / "local"),
        SAEV.from_pretrained("org/saev-tiny"),
        SAEV.from_pretrained("org/SAE-V", subfolder="SAEV_Tiny_layer2"),
    ):
        assert torch.equal(loaded.encode(x), expected)
    from_saelens = SAEV.from_pretrained("org/SAE-V", subfolder="SAEV_Tiny_layer2")
    torch.testing.assert_close(from_saelens.feature_weights, sae.feature_weights, equal_nan=True)
    assert from_saelens.config.hook_layer == 2 and from_saelens.config.input_scale == 1.0


def test_hub_repo_without_an_sae_is_a_clear_error(loopback_hub):
    loopback_hub.api.create_repo("org/empty")
    loopback_hub.api.upload_file(path_or_fileobj=b"hello", path_in_repo="README.md", repo_id="org/empty")
    with pytest.raises(OSError, match=r"'org/empty' holds no SAE"):
        SAEV.from_pretrained("org/empty")
    with pytest.raises(OSError, match=r"subfolder 'nope'\) holds no SAE"):
        SAEV.from_pretrained("org/empty", subfolder="nope")
