"""Steering an MLLM with SAE-V features: clamp features to chosen values at decoder layer L and see what the model
does, the causal test of what a feature's examples suggest (as lmms-lab's multimodal SAE Space does).

Within [`steer`], layer L's output h becomes `h + sum_f (v_f - z_f(h)) W_dec[f] / input_scale` at the chosen
positions: each clamped feature's contribution to the SAE-V's reconstruction is replaced by the one it would make at
activation v_f, and everything else, the SAE-V's error term included, is kept. So steering with no feature leaves the
model's output unchanged, bit for bit, and a clamp to 0 ablates a feature. It works under `generate` (the image
positions are those of the prompt's forward; generated tokens are text), with a device map (the change is made on the
layer's own device) and in half precision (computed in the SAE-V's dtype, added in the model's).

```python
with steer(model, sae, {1234: 8.0}, positions="image"):
    output = model.generate(**inputs, max_new_tokens=20)
```
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..activations.reader import find_decoder_layers, image_token_id_of, layer_device
from ..data.images import load_image
from ..data.prompts import PromptFormat, prepare_inputs

POSITIONS = ("all", "image", "text")


def parse_clamps(text: str) -> dict[int, float]:
    """`"12=5.0,40=0"` as `{12: 5.0, 40: 0.0}` (the `--features` option of `saev steer`)."""
    clamps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        feature, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--features {text!r}: {item!r} has no value (FEATURE=VALUE, e.g. 12=5.0).")
        try:
            clamps[int(feature)] = float(value)
        except ValueError:
            raise ValueError(f"--features {text!r}: {item!r} is not FEATURE=VALUE (e.g. 12=5.0,40=0).") from None
    return clamps


def steering_delta(sae: Any, hidden: torch.Tensor, clamps: Mapping[int, float]) -> torch.Tensor:
    """`sum_f (v_f - z_f(hidden)) W_dec[f] / input_scale` for `hidden` `(..., d_in)`, in float32 on the SAE-V's
    device: what [`steer`] adds to layer L's output."""
    features = list(clamps)
    values = torch.tensor([clamps[f] for f in features], dtype=torch.float32, device=sae.W_enc.device)
    x = hidden.to(sae.W_enc.device)
    if sae.config.activation == "topk":  # not separable by feature: encode whole
        current = sae.encode(x)[..., features].float()
    else:
        pre = sae.pre_activations(x)  # (..., d_sae) in the SAE-V's dtype; only the clamped columns are used
        current = pre[..., features].float().relu()
    change = values - current
    return change @ (sae.W_dec[features].float() / sae.config.input_scale)


@contextmanager
def steer(model: nn.Module, sae: Any, clamps: Mapping[int, float], positions: str = "all", processor: Any = None,
          layers: Any = None) -> Iterator[None]:
    """
    Clamp SAE-V features at decoder layer `sae.config.hook_layer` of `model` while the block runs (see the module
    docstring).

    Args:
        clamps (`Mapping[int, float]`): feature index -> the activation it is held at (0 ablates it).
        positions (`str`): `"all"`, `"image"` (the image-token positions) or `"text"` (every other position).
        processor (*optional*): the model's processor, to find its image token (else read from the model's config).

    Raises:
        ValueError: an unknown feature or position kind, an SAE-V of another width, or image positions asked of a
            model without an image token.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} must be one of {POSITIONS}.")
    bad = [f for f in clamps if not 0 <= int(f) < sae.config.d_sae]
    if bad:
        raise ValueError(f"Features {bad} do not exist: the SAE-V has features 0..{sae.config.d_sae - 1}.")
    layer_index = sae.config.hook_layer
    if layer_index is None:
        raise ValueError("The SAE-V records no hook_layer: set sae.config.hook_layer to the layer it reads.")
    decoder_layers = find_decoder_layers(model, layers)
    image_token = image_token_id_of(model, processor)
    if positions != "all" and image_token is None:
        raise ValueError(f"positions={positions!r} needs image positions, but {type(model).__name__} has no image "
                         f"token: steer positions='all'.")
    if not clamps:  # nothing to clamp: the model runs as it is
        yield
        return
    current_ids: list[torch.Tensor | None] = [None]

    def remember_ids(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        current_ids[0] = ids if isinstance(ids, torch.Tensor) else None

    def change(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if hidden.shape[-1] != sae.config.d_in:
            raise ValueError(f"Layer {layer_index} outputs width {hidden.shape[-1]}, the SAE-V reads d_in="
                             f"{sae.config.d_in}: it was not made for this model.")
        delta = steering_delta(sae, hidden, clamps).to(hidden.device)
        if positions != "all":
            ids = current_ids[0]
            if ids is None or ids.shape != hidden.shape[:2]:
                raise ValueError("Steering image or text positions needs the input_ids of the forward (pass "
                                 "input_ids, not inputs_embeds).")
            mask = (ids == image_token) if positions == "image" else (ids != image_token)
            delta = delta * mask.to(hidden.device, delta.dtype).unsqueeze(-1)
        new = hidden + delta.to(hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    handles = [model.register_forward_pre_hook(remember_ids, with_kwargs=True),
               decoder_layers[layer_index].register_forward_hook(change)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class SteerArguments:
    """`saev steer`: generate from an image and a prompt with and without features clamped."""

    prompt: str = field(default="What is in this image?", metadata={"help": "The question asked about the image."})
    image: list[str] | None = field(default=None, metadata={"help": "Image file(s) the prompt is about."})
    features: str = field(default="", metadata={"help": "Clamps as FEATURE=VALUE,... (e.g. 12=5.0,40=0: feature 12 "
                                                        "held at 5, feature 40 ablated)."})
    positions: str = field(default="all", metadata={"help": "Where to clamp: all, image or text positions.",
                                                    "choices": POSITIONS})
    max_new_tokens: int = field(default=40, metadata={"help": "Tokens generated (greedy)."})

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} must be one of {POSITIONS}.")
        parse_clamps(self.features)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1.")


@torch.no_grad()
def generate_steered(model: nn.Module, processor: Any, sae: Any, args: SteerArguments,
                     images: list[Any] | None = None) -> dict[str, str]:
    """Greedy generations for `args`' image(s) (or `images`, PIL images, in their place) and prompt: `{"plain": ...,
    "steered": ...}` (the new text only)."""
    images = images if images is not None else [load_image(path, 0) for path in args.image or []]
    rows = {"prompt": [args.prompt], **({"images": [images]} if images else {})}
    prompt_format = PromptFormat(image_column="images" if images else None)
    inputs = prepare_inputs(processor, rows, prompt_format, image_token_id_of(model, processor))
    device = next(model.parameters()).device
    inputs = {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
              else v for k, v in inputs.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    start = inputs["input_ids"].shape[1]

    def generate() -> str:
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return tokenizer.decode(output[0, start:], skip_special_tokens=True)

    plain = generate()
    with steer(model, sae, parse_clamps(args.features), args.positions, processor):
        steered = generate()
    return {"plain": plain, "steered": steered}


def run_steering(sae_args: Any, model_args: Any, args: SteerArguments) -> dict[str, str]:
    """`saev steer`: load the SAE-V and the MLLM, generate with and without the clamps; returns both texts."""
    sae = sae_args.load()
    model, processor = model_args.load()
    sae.to(layer_device(model, sae.config.hook_layer))
    return generate_steered(model, processor, sae, args)
