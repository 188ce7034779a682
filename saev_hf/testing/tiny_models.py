"""Tiny multimodal LLMs with real processors, built fully offline: seven architectures, one builder.

Models come randomly initialised from `build_tiny_model`; `saev_hf.testing.tiny_pretraining.pretrain_tiny_model`
trains one on the conversations about scikit-learn's handwritten digits of `saev_hf.testing.digit_data`, so that
benchmarks and the demo read a model that has learned something.

Why this exists: SAE-V reads the residual stream of a vision-language model at image and text positions. Testing that
machinery (and the ``saev demo`` command, which trains a tiny MLLM on scikit-learn's handwritten digits) needs real
Hugging Face models and processors of each supported family, yet the Hugging Face Hub is not reachable from CI or
from the demo's sandbox. This module builds them from configs, with no download at all:

* a word-level tokenizer built locally with the `tokenizers` library from a small built-in corpus (digit captions,
  question and answer words, role words), wrapped in [`~transformers.PreTrainedTokenizerFast`], with ``<s>``,
  ``<|end|>`` (end of turn, used as EOS), ``<pad>`` and ``<unk>``, the role markers ``<|system|>``, ``<|user|>``,
  ``<|assistant|>`` as special tokens, each architecture's own image tokens, and a Jinja chat template that accepts
  the transformers multimodal message format;
* an image processor constructed from arguments (the ``*ImageProcessorPil`` classes: no torchvision needed) for
  32x32 images;
* a model with a 64-wide, 4-layer text decoder whose ``vocab_size`` equals ``len(tokenizer)``, initialised
  deterministically from ``seed``.

Every model runs ``model(**processor(images=[image], text=[prompt], return_tensors="pt"))``, single or batched with
padding, and round-trips through ``save_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` (``AutoModelForCausalLM`` / ``AutoTokenizer`` for ``"text"``) offline. The
Qwen2-VL and Chameleon processors are small subclasses defined here (see [`register_tiny_processors`]); a process that
loads them without having built a tiny model first must call [`register_tiny_processors`].

==============  =====================================  =====================================  ====================
arch            model class                            decoder layers                         image positions
==============  =====================================  =====================================  ====================
``llava``       ``LlavaForConditionalGeneration``      ``model.model.language_model.layers``  16 ``<image>``
``llava_next``  ``LlavaNextForConditionalGeneration``  ``model.model.language_model.layers``  36 ``<image>``
``chameleon``   ``ChameleonForConditionalGeneration``  ``model.model.layers``                 16 ``<image>``
``qwen2_vl``    ``Qwen2VLForConditionalGeneration``    ``model.model.language_model.layers``  16 ``<|image_pad|>``
``idefics3``    ``Idefics3ForConditionalGeneration``   ``model.model.text_model.layers``      20 ``<image>``
``paligemma``   ``PaliGemmaForConditionalGeneration``  ``model.model.language_model.layers``  16 ``<image>``
``text``        ``LlamaForCausalLM``                   ``model.model.layers``                 none
==============  =====================================  =====================================  ====================

Image positions per 32x32 image (see [`TINY_IMAGE_POSITIONS`]): the ids equal to ``model.config.image_token_id``
(Chameleon: ``vocabulary_map["<image>"]``; the model replaces those placeholders by the embeddings of the VQ codes'
``IMGIMG...Z`` tokens; the processor wraps them in ``<racm3:break>`` ... ``<eoss>``). LLaVA-NeXT's 36 are a 4x4 base
grid, a 4x4 high-resolution tile and 4 image-newline positions; Idefics3's 20 are 4 per tile for 2x2 tiles of the image
upscaled to 64x64 plus the global image.

This module itself imports torch, transformers, tokenizers, PIL and scikit-learn only inside its functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tiny_processing import (
    CHAMELEON_CODEBOOK,
    MAX_POSITIONS,
    TINY_ARCHITECTURES,
    build_tiny_tokenizer,
    check_arch,
    register_tiny_processors,
    tiny_chameleon_processor_class,
    tiny_qwen2_vl_processor_class,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = ["TINY_ARCHITECTURES", "TINY_IMAGE_POSITIONS", "TINY_IMAGE_SIZE", "build_tiny_clip", "build_tiny_model",
           "save_tiny_model"]

TINY_IMAGE_SIZE: int = 32
"""Side of the square images the tiny image processors produce (and [`digit_images`] returns)."""

TINY_IMAGE_POSITIONS: dict[str, int] = {
    "llava": 16,  # (32 / patch 8) ** 2, CLS dropped
    "llava_next": 36,  # 16 base + 16 for the one 32x32 tile + 4 newlines
    "chameleon": 16,  # (32 / 2 ** 3 VQ downsamplings) ** 2
    "qwen2_vl": 16,  # (32 / patch 4) ** 2 / merge 2 ** 2
    "idefics3": 20,  # 5 tiles x (32 / patch 8) ** 2 / scale factor 2 ** 2
    "paligemma": 16,  # (32 / patch 8) ** 2
    "text": 0,
}
"""Number of image-feature positions (image placeholder tokens) per 32x32 image, by architecture (read-only)."""

# ---------------------------------------------------------------------------------------------------------------------
# Model sizes. Small enough that every build takes well under a second, large enough that "layer L" has room.
# ---------------------------------------------------------------------------------------------------------------------
_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 4
_HEADS = 4
_KV_HEADS = 2
_VISION_HIDDEN = 32
_VISION_INTERMEDIATE = 64
_VISION_LAYERS = 2
_VISION_HEADS = 2


# ---------------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------------
def _text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Sizes and special token ids shared by every tiny text decoder."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _clip_vision_config(patch_size: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=_VISION_INTERMEDIATE,
        num_hidden_layers=_VISION_LAYERS,
        num_attention_heads=_VISION_HEADS,
        image_size=TINY_IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=_VISION_HIDDEN,
    )


def _build_llava():
    from transformers import (
        CLIPImageProcessorPil,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    patch = 8
    tokenizer = build_tiny_tokenizer("llava")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",  # drop the CLS position
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=tokenizer.chat_template,
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config(patch),
        text_config=LlamaConfig(**_text_kwargs(processor.tokenizer)),
        image_token_index=processor.image_token_id,
        image_seq_length=(TINY_IMAGE_SIZE // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration, config, processor


_LLAVA_NEXT_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _build_llava_next():
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    patch = 8
    tokenizer = build_tiny_tokenizer("llava_next")
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(patch),
        text_config=LlamaConfig(**_text_kwargs(processor.tokenizer)),
        image_token_index=processor.image_token_id,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=(TINY_IMAGE_SIZE // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaNextForConditionalGeneration, config, processor


def _build_chameleon():
    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        ChameleonImageProcessorPil,
        ChameleonVQVAEConfig,
    )

    channel_multiplier = [1, 1, 2, 2]  # 3 downsamplings: 32x32 pixels -> 4x4 codes
    image_seq_length = (TINY_IMAGE_SIZE // 2 ** (len(channel_multiplier) - 1)) ** 2
    tokenizer = build_tiny_tokenizer("chameleon")
    image_processor = ChameleonImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    processor = tiny_chameleon_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=tokenizer.chat_template,
    )
    vq_config = ChameleonVQVAEConfig(
        embed_dim=16,
        num_embeddings=CHAMELEON_CODEBOOK,
        latent_channels=16,
        resolution=TINY_IMAGE_SIZE,
        base_channels=32,  # GroupNorm(32 groups) needs a multiple of 32
        channel_multiplier=channel_multiplier,
        num_res_blocks=1,
        attn_resolutions=[],
    )
    text = _text_kwargs(processor.tokenizer)
    config = ChameleonConfig(**text, vq_config=vq_config.to_dict(), vocabulary_map=processor.tokenizer.get_vocab())
    return ChameleonForConditionalGeneration, config, processor


def _build_qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    patch, merge, temporal = 4, 2, 2
    tokenizer = build_tiny_tokenizer("qwen2_vl")
    image_processor = Qwen2VLImageProcessorPil(
        # min / max pixels: a 32x32 image stays 32x32, i.e. an 8x8 patch grid merged 2x2 into 16 image tokens
        size={"shortest_edge": TINY_IMAGE_SIZE**2, "longest_edge": (2 * TINY_IMAGE_SIZE) ** 2},
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=temporal,
    )
    processor = tiny_qwen2_vl_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    text = _text_kwargs(processor.tokenizer)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 3, 3],  # temporal, height, width: must sum to head_dim / 2 = 64 / 4 heads / 2 = 8
    }
    tok = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": _VISION_LAYERS,
            "embed_dim": _VISION_HIDDEN,
            "hidden_size": _HIDDEN,  # output of the patch merger = text hidden size
            "num_heads": _VISION_HEADS,
            "mlp_ratio": 2,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": temporal,
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2VLForConditionalGeneration, config, processor


def _build_idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    patch, scale_factor = 8, 2
    tile = TINY_IMAGE_SIZE
    image_seq_len = (tile // patch) ** 2 // scale_factor**2
    tokenizer = build_tiny_tokenizer("idefics3")
    image_processor = Idefics3ImageProcessorPil(
        # a 32x32 image is resized to 64x64, split into 2x2 tiles of 32x32, plus the whole image as a global tile
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=tokenizer.chat_template,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": _VISION_HIDDEN,
            "intermediate_size": _VISION_INTERMEDIATE,
            "num_hidden_layers": _VISION_LAYERS,
            "num_attention_heads": _VISION_HEADS,
            "image_size": tile,
            "patch_size": patch,
        },
        text_config=LlamaConfig(**_text_kwargs(processor.tokenizer)),
        image_token_id=processor.image_token_id,
        scale_factor=scale_factor,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return Idefics3ForConditionalGeneration, config, processor


def _build_paligemma():
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    patch = 8
    image_seq_length = (TINY_IMAGE_SIZE // patch) ** 2
    tokenizer = build_tiny_tokenizer("paligemma")
    image_processor = SiglipImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_seq_length=image_seq_length
    )
    # the processor adds PaliGemma's 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer and stops it adding
    # <s> (PaliGemma puts <s> after the image tokens itself)
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    text = _text_kwargs(processor.tokenizer)
    text["head_dim"] = _HIDDEN // _HEADS
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=_VISION_HIDDEN,
            intermediate_size=_VISION_INTERMEDIATE,
            num_hidden_layers=_VISION_LAYERS,
            num_attention_heads=_VISION_HEADS,
            image_size=TINY_IMAGE_SIZE,
            patch_size=patch,
        ),
        text_config=GemmaConfig(**text),
        image_token_index=processor.image_token_id,
        vocab_size=len(processor.tokenizer),
        projection_dim=_HIDDEN,
        hidden_size=_HIDDEN,
        tie_word_embeddings=False,
    )
    return PaliGemmaForConditionalGeneration, config, processor


def _build_text():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer("text")
    return LlamaForCausalLM, LlamaConfig(**_text_kwargs(tokenizer)), tokenizer


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "chameleon": _build_chameleon,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
    "paligemma": _build_paligemma,
    "text": _build_text,
}


def build_tiny_model(arch: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerFast]:
    """Build a tiny randomly initialised model of architecture ``arch`` and its processor, offline.

    Args:
        arch: one of [`TINY_ARCHITECTURES`].
        seed: seed of the weight initialisation; the same seed gives the same weights (the global torch RNG state
            is restored afterwards).

    Returns:
        ``(model, processor)``: the model in eval mode (float32, on CPU) and its processor; for ``"text"`` the
        processor is the tokenizer.

    Raises:
        ValueError: if ``arch`` is not one of [`TINY_ARCHITECTURES`].
    """
    check_arch(arch)
    import torch

    register_tiny_processors()
    model_class, config, processor = _BUILDERS[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval()
    return model, processor


def save_tiny_model(arch: str, path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model ``arch`` (see [`build_tiny_model`]) and save it with its processor to ``path``.

    The directory reloads offline with ``AutoModelForImageTextToText`` and ``AutoProcessor`` (``AutoModelForCausalLM``
    and ``AutoTokenizer`` for ``"text"``); for ``"qwen2_vl"`` and ``"chameleon"``, a process that did not build a
    tiny model calls [`register_tiny_processors`] first. Returns ``path`` as a `Path`.
    """
    model, processor = build_tiny_model(arch, seed=seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_clip(seed: int = 0, max_text_tokens: int = 16) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny randomly initialised CLIP (`CLIPModel`, 32x32 images, text cut at `max_text_tokens`) and its processor,
    built offline (the tiny word-level tokenizer), for `clip_score`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = build_tiny_tokenizer("text")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_text_tokens, projection_dim=16,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                                            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
