"""Loading the MLLM an SAE-V reads: an image-text-to-text model with its processor, or a text-only causal LM with its
tokenizer, placed as the caller says. [`saev_hf.arguments.ModelArguments`] names what to load; this is its loader."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..runtime.folders import check_local_path

MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The dtypes a base model can be loaded in: 'auto' is transformers' `dtype="auto"`, the checkpoint's own dtype."""


def check_model_dtype(dtype: str, option: str = "model_dtype") -> None:
    """Refuse a dtype outside [`MODEL_DTYPES`], naming the option it was given to."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{option}={dtype!r} is not supported; use one of {MODEL_DTYPES}.")


def load_model_and_processor(
    name_or_path: str, revision: str | None = None, dtype: str = "auto", device: torch.device | str | None = None,
    device_map: str | dict | None = None,
):
    """
    Load a base model for reading: an image-text-to-text model with its processor, or a causal LM with its tokenizer.

    The model is chosen by its config: architectures that `AutoModelForImageTextToText` knows load with it and
    `AutoProcessor`; every other model loads with `AutoModelForCausalLM` and `AutoTokenizer`. The model is put in
    eval mode.

    Args:
        dtype (`str`): one of [`MODEL_DTYPES`]; 'auto' (the default, as transformers') is the checkpoint's own dtype.
        device (*optional*): the device the whole model is moved to after loading (None: where it loaded, the CPU).
        device_map (*optional*): passed to `from_pretrained(device_map=...)` ('auto' spreads a large model over the
            GPUs, 'cuda:0', 'cpu', or a dict); the model is then placed while it loads. Give `device` or
            `device_map`, not both.
    """

    check_local_path(name_or_path, "model")
    check_model_dtype(dtype, "dtype")
    if device is not None and device_map is not None:
        raise ValueError(f"Give either device={str(device)!r} (the whole model, moved after loading) or "
                         f"device_map={device_map!r} (placed while loading), not both.")
    placement = {} if device_map is None else {"device_map": device_map}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype,
                                                            **placement)
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        check_multimodal_processor(processor, name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype, **placement)
        processor = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if device is not None:
        model.to(device)
    return model.eval(), processor


def check_multimodal_processor(processor, name_or_path: str) -> None:
    """
    Refuse a tokenizer where an image-text model's processor was expected. `AutoProcessor` falls back to the tokenizer,
    without a word, when `processor_config.json` names a processor class it does not know (a subclass defined in user
    code and not registered in this process); the images would then never reach the model.
    """
    if hasattr(processor, "image_processor"):
        return
    raise ValueError(
        f"AutoProcessor loaded a {type(processor).__name__} (a tokenizer, with no image processor) from "
        f"{name_or_path!r}, whose model reads images: its processor class is not known to transformers in this "
        f"process. "
        f"Register it first (AutoProcessor.register(<config class>, <processor class>)); the tiny Qwen2-VL and "
        f"Chameleon folders of saev_hf.demo need saev_hf.testing.tiny_processing.register_tiny_processors()."
    )
