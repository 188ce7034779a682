"""SAEVConfig: defaults are the paper's, every invalid value is a ValueError that names it and says what to do."""

import pytest
from transformers import AutoConfig

from saev_hf import SAEVConfig


def test_defaults_are_the_papers_llava_next_recipe():
    config = SAEVConfig()
    assert (config.d_in, config.d_sae, config.expansion_factor) == (4096, 65536, 16)
    assert config.activation == "relu" and config.k is None
    assert config.l1_coefficient == 5.0
    assert config.cooccurrence_threshold == 1.0
    assert config.input_scale == 1.0
    assert config.apply_b_dec_to_input is False
    assert config.feature_weights_info is None


def test_d_sae_from_expansion_factor_and_hook_name():
    config = SAEVConfig(d_in=64, expansion_factor=8, hook_layer=3)
    assert config.d_sae == 512
    assert config.hook_name == "blocks.3.hook_resid_post"
    assert SAEVConfig(d_in=64, d_sae=100).hook_name is None


def test_config_round_trips_through_auto_config(tmp_path):
    config = SAEVConfig(
        d_in=32, d_sae=96, activation="topk", k=8, hook_layer=2, base_model_name_or_path="org/mllm",
        base_model_revision="abc123", cooccurrence_threshold=0.5, input_scale=2.5, dataset_name="org/data",
        training_tokens=1000, feature_weights_info={"examples": 10},
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SAEVConfig)
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
        k: v for k, v in config.to_dict().items() if k not in ignore
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_in": 0}, "d_in=0 must be a positive integer"),
        ({"d_in": 16.5}, "d_in=16.5 must be a positive integer"),
        ({"d_in": 16, "d_sae": -3}, "d_sae=-3 must be a positive integer"),
        ({"d_in": 16, "expansion_factor": 0}, "expansion_factor=0 must be a positive integer"),
        ({"d_in": 16, "d_sae": 50, "expansion_factor": 4}, "Give only one of d_sae and expansion_factor"),
        ({"d_in": 16, "activation": "gelu"}, "activation='gelu' is not supported"),
        ({"d_in": 16, "activation": "topk"}, "needs k"),
        ({"d_in": 16, "activation": "topk", "k": 0}, "k=0 must be a positive integer"),
        ({"d_in": 16, "d_sae": 32, "activation": "topk", "k": 33}, "k=33 is larger than d_sae=32"),
        ({"d_in": 16, "k": 4}, "only used with activation='topk'"),
        ({"d_in": 16, "hook_layer": -1}, "hook_layer=-1 must be a non-negative integer"),
        ({"d_in": 16, "hook_point": "resid_pre"}, "hook_point='resid_pre' is not supported"),
        ({"d_in": 16, "cooccurrence_threshold": -0.1}, "cooccurrence_threshold=-0.1 must be a finite number >= 0"),
        ({"d_in": 16, "l1_coefficient": float("nan")}, "l1_coefficient=nan must be a finite number"),
        ({"d_in": 16, "input_scale": 0.0}, "input_scale=0.0 must be a finite number > 0"),
        ({"d_in": 16, "input_scale": float("inf")}, "input_scale=inf must be a finite number"),
        ({"d_in": 16, "apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input='yes' must be True or False"),
        ({"d_in": 16, "training_tokens": -5}, "training_tokens=-5 must be a non-negative integer"),
        ({"d_in": 16, "feature_weights_info": [1, 2]}, "feature_weights_info must be a dict"),
    ],
)
def test_invalid_values_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAEVConfig(**kwargs)
