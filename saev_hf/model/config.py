"""`SAEVConfig`: everything that makes an SAE-V checkpoint self-describing.

An SAE-V reads the residual stream of one decoder layer of a multimodal LLM. The config says which model, which
revision, which layer and hook point, how wide the dictionary is, how it was trained (L1 coefficient, input scaling)
and how its features are used for data scoring (the co-occurrence bound delta). Defaults are the paper's
(ICML 2025, LLaVA-NeXT-7B recipe; see ``docs`` in the repository and the method page).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

ACTIVATIONS = ("relu", "topk")
HOOK_POINTS = ("resid_post",)


class SAEVConfig(PretrainedConfig):
    r"""
    Configuration of an [`SAEV`] sparse autoencoder.

    Args:
        d_in (`int`, *optional*, defaults to 4096):
            Width of the hidden states the SAE reads: the base model's text hidden size.
        d_sae (`int`, *optional*):
            Number of dictionary features. Give either `d_sae` or `expansion_factor` (then `d_sae = d_in *
            expansion_factor`). If both are given they must agree.
        expansion_factor (`int`, *optional*):
            Ratio `d_sae / d_in`. The paper uses 16 for LLaVA-NeXT-7B and 32 for Chameleon-7B.
        activation (`str`, *optional*, defaults to `"relu"`):
            `"relu"` (the paper: ReLU with an L1 penalty weighted by decoder norms) or `"topk"` (keep the `k` largest
            pre-activations per token, no L1 penalty).
        k (`int`, *optional*):
            Number of active features per token; required for, and only allowed with, `activation="topk"`.
        hook_layer (`int`, *optional*):
            Index of the decoder layer whose output (residual stream after the layer) the SAE reads, 0-based, as in
            `output_hidden_states[hook_layer + 1]`. The paper uses 16 for LLaVA-NeXT-7B and 8 for Chameleon-7B.
        hook_point (`str`, *optional*, defaults to `"resid_post"`):
            Where in the layer the SAE reads. Only `"resid_post"` (the decoder layer's output) is supported.
        base_model_name_or_path (`str`, *optional*):
            Hub repo id or path of the multimodal LLM the SAE was trained on, e.g.
            `"llava-hf/llava-v1.6-mistral-7b-hf"`.
        base_model_revision (`str`, *optional*):
            Revision (branch, tag or commit sha) of the base model, so that the hidden states are reproducible.
        cooccurrence_threshold (`float`, *optional*, defaults to 1.0):
            The activation bound delta: a feature co-occurs in an example when its activation exceeds delta at some
            text position and at some image position. The authors' code uses 1.0, a constant made for LLaVA-NeXT-7B's
            activations: an SAE-V whose activations stay below it has no co-occurring feature, and every score is 0.
            Set it, or calibrate it on data (`WeightingArguments.threshold_quantile`); `cooccurrence_threshold_info`
            records where it came from.
        cooccurrence_threshold_info (`dict`, *optional*):
            Provenance of `cooccurrence_threshold` when it was set or calibrated after creation (how, from what data,
            the previous value). `None`: the value given at creation (the paper's constant by default).
        l1_coefficient (`float`, *optional*, defaults to 5.0):
            Weight lambda of the sparsity penalty `sum_f z_f * ||W_dec[f]||_2` in the training loss (ReLU only).
        input_scale (`float`, *optional*, defaults to 1.0):
            Inputs are multiplied by this factor before encoding and reconstructions divided by it after decoding.
            Training estimates it as `sqrt(d_in) / E||x||`; saving for release folds it into the weights (see
            [`SAEV.fold_input_scale`]), leaving 1.0.
        apply_b_dec_to_input (`bool`, *optional*, defaults to `False`):
            Whether `b_dec` is subtracted from the input before encoding. The paper does not (False); SAELens
            checkpoints may, and loading one keeps its setting.
        dataset_name (`str`, *optional*):
            Name (and config) of the data the SAE was trained on, e.g. `"HuggingFaceM4/OBELICS"`.
        training_tokens (`int`, *optional*):
            Number of tokens the SAE was trained on.
        feature_weights_info (`dict`, *optional*):
            How the per-feature cross-modal weights stored in the model were computed (dataset, number of examples,
            top-k sizes, ...). `None` means they were never computed; every feature then has no weight.
    """

    model_type = "saev"

    def __init__(
        self,
        d_in: int = 4096,
        d_sae: int | None = None,
        expansion_factor: int | None = None,
        activation: str = "relu",
        k: int | None = None,
        hook_layer: int | None = None,
        hook_point: str = "resid_post",
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        cooccurrence_threshold: float = 1.0,
        cooccurrence_threshold_info: dict[str, Any] | None = None,
        l1_coefficient: float = 5.0,
        input_scale: float = 1.0,
        apply_b_dec_to_input: bool = False,
        dataset_name: str | None = None,
        training_tokens: int | None = None,
        feature_weights_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # one line per documented field, as transformers configs do: long by design, not by mixing concerns
        _check_positive_int("d_in", d_in)
        if d_sae is None and expansion_factor is None:
            expansion_factor = 16
        if expansion_factor is not None:
            _check_positive_int("expansion_factor", expansion_factor)
        if d_sae is None:
            d_sae = d_in * expansion_factor
        _check_positive_int("d_sae", d_sae)
        if expansion_factor is not None and d_sae != d_in * expansion_factor:
            raise ValueError(
                f"d_sae={d_sae} does not equal d_in * expansion_factor = {d_in} * {expansion_factor} = "
                f"{d_in * expansion_factor}. Give only one of d_sae and expansion_factor."
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported. Use one of {ACTIVATIONS}.")
        if activation == "topk":
            if k is None:
                raise ValueError("activation='topk' needs k, the number of active features per token, e.g. k=64.")
            _check_positive_int("k", k)
            if k > d_sae:
                raise ValueError(f"k={k} is larger than d_sae={d_sae}. Use k <= d_sae.")
        elif k is not None:
            raise ValueError(f"k={k} is only used with activation='topk'; remove k or set activation='topk'.")
        if hook_layer is not None and (not _is_int(hook_layer) or hook_layer < 0):
            raise ValueError(
                f"hook_layer={hook_layer!r} must be a non-negative integer: the 0-based index of the decoder layer."
            )
        if hook_point not in HOOK_POINTS:
            raise ValueError(
                f"hook_point={hook_point!r} is not supported. Use one of {HOOK_POINTS} (the decoder layer's output)."
            )
        _check_finite("cooccurrence_threshold", cooccurrence_threshold, minimum=0.0)
        _check_finite("l1_coefficient", l1_coefficient, minimum=0.0)
        _check_finite("input_scale", input_scale, minimum=0.0, strict=True)
        if not isinstance(apply_b_dec_to_input, bool):
            raise ValueError(f"apply_b_dec_to_input={apply_b_dec_to_input!r} must be True or False.")
        if training_tokens is not None and (not _is_int(training_tokens) or training_tokens < 0):
            raise ValueError(f"training_tokens={training_tokens!r} must be a non-negative integer or None.")
        if cooccurrence_threshold_info is not None and not isinstance(cooccurrence_threshold_info, dict):
            raise ValueError(
                f"cooccurrence_threshold_info must be a dict saying where delta came from, or None; got "
                f"{type(cooccurrence_threshold_info).__name__}."
            )
        if feature_weights_info is not None and not isinstance(feature_weights_info, dict):
            raise ValueError(
                f"feature_weights_info must be a dict describing how the weights were computed, or None; "
                f"got {type(feature_weights_info).__name__}."
            )

        self.d_in = d_in
        self.d_sae = d_sae
        self.expansion_factor = expansion_factor if expansion_factor is not None else None
        self.activation = activation
        self.k = k
        self.hook_layer = hook_layer
        self.hook_point = hook_point
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.cooccurrence_threshold = float(cooccurrence_threshold)
        self.cooccurrence_threshold_info = cooccurrence_threshold_info
        self.l1_coefficient = float(l1_coefficient)
        self.input_scale = float(input_scale)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.dataset_name = dataset_name
        self.training_tokens = training_tokens
        self.feature_weights_info = feature_weights_info
        super().__init__(**kwargs)

    @property
    def hook_name(self) -> str | None:
        """The hook in TransformerLens/SAELens naming, e.g. `"blocks.16.hook_resid_post"` (None without a layer)."""
        if self.hook_layer is None:
            return None
        return f"blocks.{self.hook_layer}.hook_{self.hook_point}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def _check_finite(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}.")
