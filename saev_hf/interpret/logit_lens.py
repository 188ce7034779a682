"""What a feature writes: its decoder direction read through the model's unembedding (the "logit lens" of SAE
dashboards: SAE-Dashboard's and Neuronpedia's top positive and negative logits).

For feature f, the direction it adds to the residual stream is `W_dec[f] / input_scale` (in the units of the hidden
states). [`feature_logits`] scales it elementwise by the final norm's weight (an RMSNorm or LayerNorm `weight`; `1 +
weight` for Gemma's, when the model has one beside its decoder layers) and multiplies it by the output embedding (`lm_head`): the change in each
token's logit per unit of activation, were the direction the only input to the final norm. The normalisation itself
(dividing by the residual's norm) and every layer after L are left out: a documented approximation, as the
dashboards make it; the tokens it ranks first are the ones the feature pushes the prediction towards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..activations.reader import find_decoder_layers


@dataclass
class FeatureLogits:
    """A feature's logit lens: its `top_k` most promoted and most suppressed tokens, `(token, logit change)`."""

    feature: int
    positive: list[tuple[str, float]] = field(default_factory=list)
    negative: list[tuple[str, float]] = field(default_factory=list)


def final_norm(model: nn.Module, layers: Any = None) -> nn.Module | None:
    """The norm applied after the decoder layers: the `norm` (or `final_layernorm`, `ln_f`) module beside them."""
    decoder_layers = find_decoder_layers(model, layers)
    for module in model.modules():
        if any(child is decoder_layers for child in module.children()):
            for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
                norm = getattr(module, name, None)
                if isinstance(norm, nn.Module):
                    return norm
    return None


@torch.no_grad()
def feature_logits(sae: Any, model: nn.Module, tokenizer: Any, features: Sequence[int], top_k: int = 10,
                   layers: Any = None) -> dict[int, FeatureLogits]:
    """
    The logit lens of `features` (see the module docstring): for each, its `top_k` most promoted and most suppressed
    tokens with the logit change per unit of activation.

    Raises:
        ValueError: the model has no output embedding, or its width is not the SAE-V's `d_in`.
    """
    unembedding = model.get_output_embeddings()
    if unembedding is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head): the logit lens reads features "
                         f"through it. Load the model with its language-modelling head (AutoModelForImageTextToText).")
    weight = unembedding.weight
    if weight.shape[1] != sae.config.d_in:
        raise ValueError(f"The model's output embedding reads width {weight.shape[1]}, the SAE-V writes d_in="
                         f"{sae.config.d_in}: they are not the same model's.")
    directions = sae.W_dec[list(features)].float() / sae.config.input_scale
    norm = final_norm(model, layers)
    scale = getattr(norm, "weight", None)
    if isinstance(scale, torch.Tensor) and scale.shape == directions.shape[1:]:
        scale = scale.float().to(directions.device)
        if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by 1 + weight
            scale = 1 + scale
        directions = directions * scale
    logits = directions.to(weight.device) @ weight.float().T
    k = min(top_k, logits.shape[1])
    out = {}
    for row, feature in enumerate(features):
        top, bottom = logits[row].topk(k), (-logits[row]).topk(k)
        out[int(feature)] = FeatureLogits(
            int(feature),
            positive=[(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(top.values, top.indices)],
            negative=[(tokenizer.convert_ids_to_tokens(int(i)), -float(v))
                      for v, i in zip(bottom.values, bottom.indices)])
    return out
