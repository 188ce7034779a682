"""SAEV: the autoencoder's maths, its loss terms, the feature-weight buffer and the transformers checkpoint."""

import math

import pytest
import torch
from transformers import AutoModel

from saev_hf import SAEV, SAEVConfig, SAEVOutput


def make_sae(**kwargs):
    torch.manual_seed(0)
    config = SAEVConfig(**{"d_in": 16, "d_sae": 48, "hook_layer": 1, **kwargs})
    sae = SAEV(config)
    with torch.no_grad():  # non-trivial biases so that every term of the formula is exercised
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.3)
    return sae


def reference_encode(sae, x):
    x = x * sae.config.input_scale
    if sae.config.apply_b_dec_to_input:
        x = x - sae.b_dec
    return torch.relu(x @ sae.W_enc + sae.b_enc)


def test_init_follows_the_paper():
    sae = SAEV(SAEVConfig(d_in=16, d_sae=48))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((48,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0
    assert torch.isnan(sae.feature_weights).all() and not sae.has_feature_weight.any()


@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
@pytest.mark.parametrize("input_scale", [1.0, 3.0])
def test_encode_decode_match_the_formula(apply_b_dec_to_input, input_scale):
    sae = make_sae(apply_b_dec_to_input=apply_b_dec_to_input, input_scale=input_scale)
    x = torch.randn(4, 7, 16)
    z = sae.encode(x)
    torch.testing.assert_close(z, reference_encode(sae, x))
    torch.testing.assert_close(sae.decode(z), (z @ sae.W_dec + sae.b_dec) / input_scale)


def test_forward_returns_named_loss_terms():
    sae = make_sae(l1_coefficient=2.0, input_scale=2.0)
    x = torch.randn(3, 5, 16)
    out = sae(x)
    assert isinstance(out, SAEVOutput)
    z = reference_encode(sae, x)
    x_hat_scaled = z @ sae.W_dec + sae.b_dec
    mse = (x_hat_scaled - 2.0 * x).pow(2).sum(-1).mean()
    sparsity = (z * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.mse_loss, mse)
    torch.testing.assert_close(out.sparsity_loss, sparsity)
    torch.testing.assert_close(out.loss, mse + 2.0 * sparsity)
    torch.testing.assert_close(out.loss, sae(x, l1_coefficient=2.0).loss)
    torch.testing.assert_close(sae(x, l1_coefficient=0.0).loss, mse)
    torch.testing.assert_close(out.reconstruction, x_hat_scaled / 2.0)
    assert out.l0.item() == pytest.approx((z > 0).sum(-1).float().mean().item())
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_topk_keeps_exactly_k_features_and_has_no_l1():
    sae = make_sae(activation="topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # all pre-activations positive, so exactly k survive ReLU
    x = torch.randn(10, 16) * 0.01
    z = sae.encode(x)
    assert ((z > 0).sum(-1) == 5).all()
    pre = sae.pre_activations(x)
    assert torch.equal(z.topk(5, dim=-1).indices.sort().values, pre.topk(5, dim=-1).indices.sort().values)
    out = sae(x)
    torch.testing.assert_close(out.loss, out.mse_loss)


def test_wrong_hidden_size_is_a_clear_error():
    sae = make_sae(base_model_name_or_path="org/mllm")
    with pytest.raises(ValueError, match=r"size 32 in their last dimension, but this SAE-V reads d_in=16.*org/mllm"):
        sae.encode(torch.randn(2, 32))


def test_fold_input_scale_keeps_encodings_and_reconstructions():
    sae = make_sae(input_scale=4.0, apply_b_dec_to_input=True)
    x = torch.randn(6, 16)
    z, x_hat = sae.encode(x), sae(x).reconstruction
    sae.fold_input_scale()
    assert sae.config.input_scale == 1.0
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x).reconstruction, x_hat)


def test_feature_weights_distinguish_no_weight_from_zero(tmp_path):
    sae = make_sae()
    weights = torch.full((48,), math.nan)
    weights[0], weights[1], weights[2] = 0.0, 0.25, -0.5
    sae.set_feature_weights(weights, info={"num_examples": 3})
    sae.save_pretrained(tmp_path)
    loaded = SAEV.from_pretrained(tmp_path)
    assert torch.equal(loaded.has_feature_weight[:4], torch.tensor([True, True, True, False]))
    assert loaded.feature_weights[0].item() == 0.0
    torch.testing.assert_close(loaded.feature_weights, weights, equal_nan=True)
    assert loaded.config.feature_weights_info == {"num_examples": 3}


def test_set_feature_weights_rejects_bad_shapes_and_inf():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"shape \(47,\), expected \(48,\)"):
        sae.set_feature_weights(torch.zeros(47))
    with pytest.raises(ValueError, match="contain inf"):
        sae.set_feature_weights(torch.full((48,), math.inf))


def test_save_pretrained_writes_safetensors_and_auto_model_loads_it(tmp_path):
    sae = make_sae(input_scale=1.5)
    sae.feature_log_sparsity.fill_(-2.0)
    sae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    for loader in (SAEV.from_pretrained, AutoModel.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is SAEV
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor, equal_nan=True, rtol=0, atol=0)
        x = torch.randn(5, 16)
        assert torch.equal(loaded.encode(x), sae.encode(x))


def test_folder_without_an_sae_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(OSError, match=r"holds no SAE: looked for config.json \+ model.safetensors.*cfg.json"):
        SAEV.from_pretrained(tmp_path)


def test_folder_with_another_model_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    with pytest.raises(OSError, match=r"holds a 'llama' model, not an SAE-V"):
        SAEV.from_pretrained(tmp_path)


def test_d_in_that_does_not_match_the_weights_is_a_clear_error(tmp_path):
    make_sae().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"W_enc .* has shape \[16, 48\], but the config says d_in=32"):
        SAEV.from_pretrained(tmp_path, d_in=32)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"d_in": 16', '"d_in": 24'))
    with pytest.raises(ValueError, match=r"has shape \[16, 48\], but the config says d_in=24 and d_sae=48"):
        SAEV.from_pretrained(tmp_path)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match=r"The SAE-V folder .*does-not-exist. does not exist \(looked for "):
        SAEV.from_pretrained(tmp_path / "does-not-exist")
