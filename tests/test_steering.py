"""Steering with SAE-V features: with no clamp the model is unchanged bit for bit; a clamp adds exactly
(v - z_f) W_dec[f] / s at the chosen positions; it works under generate, in bfloat16, and from `saev steer`."""

import copy

import pytest
import torch

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality
from saev_hf.cli import main
from saev_hf.interpret.steering import parse_clamps, steer
from saev_hf.testing.digit_data import digit_images

ROWS = {"images": [[image] for image, _ in digit_images(2, seed=1)], "prompt": ["what digit is this?", "is it a two?"]}


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    llava = tiny_model_factory("llava")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, input_scale=2.0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    return llava, sae, reader, reader.prepare(ROWS)


def layer_outputs(model, inputs, layers):
    """The logits and what layers 1 and 2 put out, in one forward."""
    captured = {}
    handles = [layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o[0] if isinstance(
        o, (tuple, list)) else o)) for i in (1, 2)]
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def test_no_clamp_leaves_the_model_unchanged_bit_for_bit(setup):
    llava, sae, reader, inputs = setup
    plain, _ = layer_outputs(llava.model, inputs, reader.layers)
    with steer(llava.model, sae, {}):
        steered, _ = layer_outputs(llava.model, inputs, reader.layers)
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("positions", ["all", "image", "text"])
def test_a_clamp_adds_exactly_the_features_change_at_the_chosen_positions(setup, positions):
    llava, sae, reader, inputs = setup
    _, before = layer_outputs(llava.model, inputs, reader.layers)
    clamps = {5: 3.0, 17: 0.0}
    with steer(llava.model, sae, clamps, positions=positions):
        logits, after = layer_outputs(llava.model, inputs, reader.layers)
    h = before[1]
    with torch.no_grad():
        z = sae.encode(h)
    expected = sum((value - z[..., f:f + 1]) * sae.W_dec[f] / sae.config.input_scale for f, value in clamps.items())
    modality = reader.modality(inputs["input_ids"], inputs["attention_mask"])
    mask = {"all": torch.ones_like(modality, dtype=torch.bool), "image": modality == Modality.IMAGE,
            "text": modality != Modality.IMAGE}[positions]
    torch.testing.assert_close(after[1], h + expected * mask.unsqueeze(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(after[1][~mask], h[~mask])  # untouched elsewhere, bit for bit
    assert not torch.equal(after[2], before[2])  # and it changes what follows


def test_steering_works_under_generate_and_in_bfloat16(setup):
    llava, sae, reader, inputs = setup
    model = copy.deepcopy(llava.model).to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    plain = model.generate(**half, max_new_tokens=6, do_sample=False)
    with steer(model, sae, {}, positions="image"):
        unchanged = model.generate(**half, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, unchanged)
    with steer(model, sae, {f: 500.0 for f in range(0, 96, 8)}, positions="all"):
        steered = model.generate(**half, max_new_tokens=6, do_sample=False)
    assert steered.shape[1] > inputs["input_ids"].shape[1] and not torch.equal(plain, steered)


def test_bad_steering_requests_say_what_to_fix(setup):
    llava, sae, _, _ = setup
    with pytest.raises(ValueError, match=r"Features \[400\] do not exist: the SAE-V has features 0..95"):
        with steer(llava.model, sae, {400: 1.0}):
            pass
    with pytest.raises(ValueError, match="positions='patches' must be one of"):
        with steer(llava.model, sae, {1: 1.0}, positions="patches"):
            pass
    assert parse_clamps("12=5.0, 40=0") == {12: 5.0, 40: 0.0}
    with pytest.raises(ValueError, match=r"'12' has no value"):
        parse_clamps("12")


def test_saev_steer_prints_the_plain_and_the_steered_generation(setup, tmp_path, capsys):
    llava, sae, _, _ = setup
    sae.save_pretrained(tmp_path / "sae")
    ROWS["images"][0][0].save(tmp_path / "digit.png")
    assert main(["steer", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(llava.path),
                 "--image", str(tmp_path / "digit.png"), "--prompt", "what digit is this?", "--features",
                 ",".join(f"{f}=500" for f in range(0, 96, 8)), "--max_new_tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    plain = out.split("Without steering: ")[1].split("\n")[0]
    steered = out.split("positions): ")[1].split("\n")[0]
    assert "With 0=500" in out and plain != steered
