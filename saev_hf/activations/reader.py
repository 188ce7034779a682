"""Reading an MLLM's residual stream at decoder layer L, with a modality for every position.

[`LayerReader`] wraps any model that `AutoModelForImageTextToText` (or, for the text-only baseline,
`AutoModelForCausalLM`) loads, and its processor or tokenizer. It finds the decoder layers without per-model code,
captures the output of layer L (`output_hidden_states[L + 1]` of a full forward) and stops the forward right there:
later layers, the final norm and the lm_head are never run. For the last layer the reader returns the residual stream
itself, where transformers' `output_hidden_states[-1]` has the final norm applied.

Every position gets a [`Modality`]: IMAGE (positions that carry image features: LLaVA's image tokens, LLaVA-NeXT's
tiles and newline tokens, Chameleon's VQ image tokens, Qwen2-VL's merged patches, Idefics3's image tokens), TEXT,
SPECIAL (BOS/EOS, role markers, image start/end markers: whatever the tokenizer marks special; counted as text or
not, as the caller chooses) and PAD, which never counts as anything.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from enum import IntEnum
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..data.prompts import PromptFormat, prepare_inputs

# Where decoder layers live, most common first. Anything else is found by searching for the one ModuleList of the
# text model's depth outside the vision tower.
DECODER_LAYER_PATHS = (
    "model.language_model.layers",  # LLaVA, LLaVA-NeXT, Qwen2-VL, PaliGemma, Gemma3, Mistral3, ...
    "model.text_model.layers",  # Idefics3, SmolVLM
    "model.layers",  # Chameleon and most causal LMs
    "model.language_model.model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "transformer.h",  # GPT-2 style
    "gpt_neox.layers",
    "model.decoder.layers",
)
_VISION_NAMES = ("vision", "visual", "vqmodel", "image", "encoder", "connector", "projector")


def layer_field(default: Any = MISSING) -> Any:
    """The `layer` option of every step that reads the MLLM (`saev train`, `cache`, `eval`): one name, one help."""
    return field(default=default, metadata={
        "help": "0-based index of the decoder layer whose output (residual stream) is read; the paper: 16 for "
                "LLaVA-NeXT-7B, 8 for Chameleon-7B. `saev eval` reads the SAE-V's own layer when it is not given."})


def include_special_tokens_field() -> Any:
    """The `include_special_tokens` option of training and caching: one name, one help."""
    return field(default=True, metadata={
        "help": "Read special/template tokens (BOS, role markers, image start/end) too: they are residual stream like "
                "any other position (padding never counts). A cache made without them cannot serve a training run "
                "that reads them."})


def special_as_text_field() -> Any:
    """The `special_as_text` option of every step that splits positions into text and image: one name, one help."""
    return field(default=True, metadata={
        "help": "Count special/template tokens (BOS, role markers, image start/end) as text positions, as the authors' "
                "code does; False leaves them out. Padding never counts."})


class Modality(IntEnum):
    """What a token position carries."""

    PAD = 0
    TEXT = 1
    IMAGE = 2
    SPECIAL = 3


def _attribute(root: nn.Module, path: str) -> Any:
    node: Any = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def text_config(model: nn.Module):
    """The config of the model's language part (the model's own config for a text-only model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module, layers: str | nn.ModuleList | None = None) -> nn.ModuleList:
    """
    The decoder layers of `model`'s language part, as a ModuleList.

    Args:
        model: an image-text-to-text model or a causal LM.
        layers: the ModuleList itself, or its dotted path in `model`, for models whose structure hides it.

    Raises:
        ValueError: naming the paths tried and how to pass `layers=` when they cannot be found.
    """
    if isinstance(layers, nn.ModuleList):
        return layers
    depth = getattr(text_config(model), "num_hidden_layers", None)
    paths = (layers,) if isinstance(layers, str) else DECODER_LAYER_PATHS
    for path in paths:
        found = _attribute(model, path)
        if isinstance(found, nn.ModuleList) and (depth is None or len(found) == depth):
            return found
    if layers is None and depth is not None:
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList)
            and len(module) == depth
            and not any(word in name.lower() for word in _VISION_NAMES)
        ]
        if len(candidates) == 1:
            return candidates[0][1]
    raise ValueError(
        f"Could not find the decoder layers of {type(model).__name__}: tried {list(paths)}"
        + (f" and a search for the one ModuleList of length num_hidden_layers={depth}" if layers is None else "")
        + ". Pass `layers=` with the dotted path of the decoder layers' nn.ModuleList in the model (e.g. "
        "'model.language_model.layers') or the ModuleList itself."
    )


def layer_device(model: nn.Module, layer: int | None = None, layers: str | nn.ModuleList | None = None) -> torch.device:
    """
    The device on which decoder layer `layer` of `model` hands out its hidden states: where the SAE-V that reads them
    belongs. For a model on one device, that device; for one spread by `device_map` (accelerate's hooks), the device
    that layer runs on (its `execution_device`). Without `layer`, the device of the model's first parameter.
    """
    module = model
    if layer is not None:
        decoder_layers = find_decoder_layers(model, layers)
        if 0 <= layer < len(decoder_layers):
            module = decoder_layers[layer]
    return _runs_on(module, model)


def _runs_on(module: nn.Module, model: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device, else that of its first parameter
    (of `model`'s when it has none)."""
    execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)
    parameter = next(module.parameters(), None)
    return (parameter if parameter is not None else next(model.parameters())).device


def check_same_device(sae: Any, device: torch.device, what: str) -> None:
    """
    Refuse an SAE-V that is not on `device`, where `what` (the hidden states it would encode) lives, instead of
    moving every batch to it: an SAE-V left on the CPU beside a model on a GPU would otherwise encode on the CPU.

    Raises:
        ValueError: naming both devices and the fix.
    """
    sae_device = sae.W_enc.device
    if _canonical(sae_device) != _canonical(torch.device(device)):
        raise ValueError(
            f"The SAE-V is on {sae_device}, but {what} is on {device}: saev-hf encodes where the hidden states are "
            f"and does not move them. Put the SAE-V on the model's device first: sae.to({str(device)!r})."
        )


def _canonical(device: torch.device) -> torch.device:
    """`cuda` and `cuda:<current>` are the same device."""
    if device.type != "cpu" and device.type != "meta" and device.index is None:
        module = getattr(torch, device.type, None)
        index = module.current_device() if module is not None and hasattr(module, "current_device") else 0
        return torch.device(device.type, index)
    return device


def image_token_id_of(model: nn.Module, processor: Any) -> int | None:
    """The id of the token that marks image-feature positions in `input_ids`, or None for a text-only model."""
    for owner, name in ((processor, "image_token_id"), (model.config, "image_token_id"), (model.config, "image_token_index")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    return None


def special_token_ids(processor: Any, image_token_id: int | None) -> torch.Tensor:
    """Ids the tokenizer marks special (BOS/EOS, role and image markers, ...), excluding the image token itself."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set(getattr(tokenizer, "all_special_ids", []))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    ids.discard(image_token_id)
    return torch.tensor(sorted(ids), dtype=torch.long)


def text_and_image(modality: torch.Tensor, special_as_text: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image position masks from [`Modality`] values; special/template tokens count as text when
    `special_as_text` (as the authors' code does). Padding is in neither.

    The one definition of "which positions count" that the weighting, the scores, the inspection, the patch filter,
    the evaluation and the activation buffer share; their union is [`scored_positions`]."""
    text = modality == Modality.TEXT
    if special_as_text:
        text = text | (modality == Modality.SPECIAL)
    return text, modality == Modality.IMAGE


def scored_positions(modality: torch.Tensor, special_as_text: bool = True) -> torch.Tensor:
    """The positions that count: text and image ones (see [`text_and_image`]); with `special_as_text`, every real
    position."""
    text, image = text_and_image(modality, special_as_text)
    return text | image


@dataclass
class LayerActivations:
    """
    Hidden states of one decoder layer for a right-padded batch, with each position's modality.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch, tokens, d_model)`): the residual stream after layer `layer`.
        modality (`torch.Tensor` of shape `(batch, tokens)`, int8): a [`Modality`] per position.
        input_ids (`torch.Tensor` of shape `(batch, tokens)`): the tokens.
        layer (`int`): the decoder layer read.
        embeddings (`torch.Tensor` of shape `(batch, tokens, d_model)`, *optional*): what the first decoder layer
            reads (the token embeddings, with the projected image features at the image positions), when asked.
        logits (`torch.Tensor` of shape `(batch, tokens, vocab)`, *optional*): the model's output, when asked (the
            forward then runs to the end).
    """

    hidden_states: torch.Tensor
    modality: torch.Tensor
    input_ids: torch.Tensor
    layer: int
    embeddings: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def image_mask(self) -> torch.Tensor:
        """`(batch, tokens)` bool: positions that carry image features."""
        return text_and_image(self.modality)[1]

    def text_mask(self, include_special: bool = True) -> torch.Tensor:
        """`(batch, tokens)` bool: text positions, with or without special/template tokens. Never padding."""
        return text_and_image(self.modality, include_special)[0]

    def scored_mask(self, special_as_text: bool = True) -> torch.Tensor:
        """`(batch, tokens)` bool: text and image positions, special/template tokens with `special_as_text`."""
        return scored_positions(self.modality, special_as_text)

    @property
    def token_mask(self) -> torch.Tensor:
        """`(batch, tokens)` bool: every real (non-padding) position."""
        return self.modality != Modality.PAD

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states `(n, d_model)` and modalities `(n,)` of example `index`, without padding."""
        keep = self.token_mask[index]
        return self.hidden_states[index][keep], self.modality[index][keep]


class _StopForward(Exception):
    """Raised by the capture hook to end the forward once layer L has run."""


class LayerReader:
    """
    Reads decoder layer `layer` of an MLLM (or a text-only causal LM) from dataset rows or prepared inputs.

    Example:

    ```python
    reader = LayerReader(model, processor, layer=16)
    acts = reader.read({"images": [image], "prompt": ["What is in the picture?"]})
    acts.hidden_states[acts.image_mask]  # image-token states
    ```

    Args:
        model: any `AutoModelForImageTextToText` / `AutoModelForCausalLM` model.
        processor: its processor (or tokenizer for a text-only model).
        layer (`int`): 0-based index of the decoder layer whose output is read.
        prompt_format ([`PromptFormat`], *optional*): which columns hold images, prompt and response. Defaults to
            TRL's `images`/`prompt` columns (no image column for a text-only model).
        layers (`str` or `nn.ModuleList`, *optional*): where the decoder layers are, when they cannot be found.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        layer: int,
        prompt_format: PromptFormat | None = None,
        layers: str | nn.ModuleList | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.layers = find_decoder_layers(model, layers)
        num_layers = len(self.layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(
                f"layer={layer!r} does not exist: {type(model).__name__} has {num_layers} decoder layers, numbered "
                f"0 to {num_layers - 1}."
            )
        self.layer = layer
        self.image_token_id = image_token_id_of(model, processor)
        if prompt_format is None:
            prompt_format = PromptFormat(image_column="images" if self.image_token_id is not None else None)
        self.prompt_format = prompt_format
        self.special_ids = special_token_ids(processor, self.image_token_id)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream read (the language model's hidden size)."""
        return text_config(self.model).hidden_size

    @property
    def device(self) -> torch.device:
        """Where layer L's hidden states come out (see [`layer_device`]): where the SAE-V that reads them must be."""
        return _runs_on(self.layers[self.layer], self.model)

    def check_sae(self, sae: Any) -> None:
        """Raise a clear `ValueError` when `sae` was not made for this model's hidden size and layer, or is not on the
        device where that layer's hidden states come out."""
        if sae.config.d_in != self.hidden_size:
            raise ValueError(
                f"The SAE-V reads d_in={sae.config.d_in} but {type(self.model).__name__} has hidden size "
                f"{self.hidden_size}. Use an SAE-V trained on this model (its config names "
                f"{sae.config.base_model_name_or_path!r}, layer {sae.config.hook_layer})."
            )
        if sae.config.hook_layer is not None and sae.config.hook_layer != self.layer:
            raise ValueError(
                f"The SAE-V was trained on layer {sae.config.hook_layer} but this reader reads layer {self.layer}. "
                f"Create the reader with layer={sae.config.hook_layer}."
            )
        check_same_device(sae, self.device, f"layer {self.layer} of {type(self.model).__name__} (what it reads)")

    def prepare(self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                first_row: int | Sequence[int] = 0):
        """Right-padded model inputs for `rows` (see [`prepare_inputs`]); `first_row` is the dataset index of the first
        row, or of every row, for errors."""
        return prepare_inputs(self.processor, rows, self.prompt_format, self.image_token_id, first_row)

    def modality(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [`Modality`] of every position, `(batch, tokens)` int8."""
        modality = torch.full_like(input_ids, Modality.TEXT, dtype=torch.int8)
        modality[torch.isin(input_ids, self.special_ids.to(input_ids.device))] = Modality.SPECIAL
        if self.image_token_id is not None:
            modality[input_ids == self.image_token_id] = Modality.IMAGE
        modality[attention_mask == 0] = Modality.PAD
        return modality

    @torch.no_grad()
    def read_inputs(self, inputs: Mapping[str, Any], embeddings: bool = False, logits: bool = False
                    ) -> LayerActivations:
        """Run the model on prepared `inputs` up to layer L, stop there, and return its hidden states and modalities;
        with `embeddings`, also what the first decoder layer reads; with `logits`, the forward runs to the end (one
        forward for the layer's states and the output) and the logits come too."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        model_inputs = {
            name: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
            if isinstance(value, torch.Tensor)
            else value
            for name, value in inputs.items()
        }
        captured: list[torch.Tensor] = []
        embedded: list[torch.Tensor] = []
        output_logits = None

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            if not logits:
                raise _StopForward

        def capture_input(module, args, kwargs):
            embedded.append(args[0] if args else kwargs["hidden_states"])

        handles = [self.layers[self.layer].register_forward_hook(capture)]
        if embeddings:
            handles.append(self.layers[0].register_forward_pre_hook(capture_input, with_kwargs=True))
        try:
            output_logits = self.model(**model_inputs, use_cache=False).logits
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise RuntimeError(
                f"Decoder layer {self.layer} of {type(self.model).__name__} never ran: the model does not use the "
                f"ModuleList found as its decoder layers. Pass `layers=` pointing at the ones its forward runs."
            )
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return LayerActivations(
            hidden_states=captured[0],
            modality=self.modality(input_ids, attention_mask).to(captured[0].device),
            input_ids=input_ids,
            layer=self.layer,
            embeddings=embedded[0] if embedded else None,
            logits=output_logits,
        )

    def read(
        self, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], first_row: int | Sequence[int] = 0
    ) -> LayerActivations:
        """Hidden states of layer L and modalities for a batch of dataset rows."""
        return self.read_inputs(self.prepare(rows, first_row))
