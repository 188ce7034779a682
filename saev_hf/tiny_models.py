"""Tiny multimodal LLMs with real processors, built fully offline, and the means to train them on real digits.

Models come randomly initialised from `build_tiny_model`; `pretrain_tiny_model` trains one on image-caption
conversations about scikit-learn's handwritten digits (`digit_caption_examples`, `digit_text_examples`), so that
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

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = [
    "DIGIT_NAMES",
    "TINY_ARCHITECTURES",
    "TINY_IMAGE_POSITIONS",
    "TINY_IMAGE_SIZE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "digit_images",
    "register_tiny_processors",
    "save_tiny_model",
]

TINY_ARCHITECTURES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "chameleon",
    "qwen2_vl",
    "idefics3",
    "paligemma",
    "text",
)
"""Names accepted by [`build_tiny_model`] and [`save_tiny_model`]; ``"text"`` is a text-only Llama causal LM."""

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

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""English names of the digits 0-9, all in the tiny tokenizer's vocabulary (``DIGIT_NAMES[label]``)."""

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
_MAX_POSITIONS = 1024

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------
_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "<|end|>", "<unk>"
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# named (``tokenizer.user_token`` ...): named special tokens survive processors that replace the tokenizer's list of
# extra special tokens (Idefics3's does, on every construction and reload)
_ROLE_TOKEN_NAMES = {"system_token": "<|system|>", "user_token": "<|user|>", "assistant_token": "<|assistant|>"}
_BASE_SPECIAL_TOKENS = (_PAD, _BOS, _EOS, _UNK, *_ROLE_TOKENS)

_CORPUS = """
a handwritten digit zero . a handwritten digit one . a handwritten digit two . a handwritten digit three .
a handwritten digit four . a handwritten digit five . a handwritten digit six . a handwritten digit seven .
a handwritten digit eight . a handwritten digit nine .
0 1 2 3 4 5 6 7 8 9 10
what digit is this ? which number is shown in the image ? what number do you see in this picture ?
describe the image . describe this photo . read the digit . what is written here ? how many digits are there ?
is it an even or odd number ? is this digit larger than five ? answer with one word .
the answer is yes . no . it is the digit . this is a number written by hand . the image shows a handwritten number .
i see a digit . i think it is . i am not sure . maybe . sorry , i cannot tell . i do not know .
even odd small large big white black dark light gray grey color pixel pixels picture photo image images
correct wrong right true false good bad helpful harmless honest safe unsafe
please can you tell me about it , thank you ! hello hi user assistant system question answer caption
and or not of to for with on at by from as be are was were has have had that there here which who why when
where how my your our their its an the one two three four five six seven eight nine ten
"""

_PUNCTUATION = ".,;:!?'\"()[]-+=*/%"
_WORD_RE = re.compile(r"\w+|[^\w\s]|\n")


def _corpus_words() -> list[str]:
    """The corpus's distinct words, punctuation and newline, sorted so that ids never depend on hashing or order."""
    return sorted(set(_WORD_RE.findall(_CORPUS.lower())) | set(_PUNCTUATION) | {"\n"})


# ---------------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------------
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported role: ' ~ message['role'] ~ ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '__IMAGE__' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- if not loop.first and loop.previtem['type'] == 'text' -%}{{- ' ' -}}{%- endif -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)


_IMAGES_FIRST = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '__IMAGE__' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _chat_template(image_placeholder: str, images_first: bool = False) -> str:
    """The shared chat template.

    ``<|role|>content<|end|>`` per message, then ``<|assistant|>`` when ``add_generation_prompt``. An
    ``{"type": "image"}`` item is written as ``image_placeholder`` where it occurs or, with ``images_first``, all
    images go before the conversation (PaliGemma's layout: image tokens, then ``<s>``, then the text).
    """
    if images_first:
        return _IMAGES_FIRST.replace("__IMAGE__", image_placeholder) + _CHAT_TEMPLATE.replace("__IMAGE__", "")
    return _CHAT_TEMPLATE.replace("__IMAGE__", image_placeholder)


# ---------------------------------------------------------------------------------------------------------------------
# Per-architecture special tokens
# ---------------------------------------------------------------------------------------------------------------------
_IDEFICS3_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))

# Chameleon's VQ codebook
_CHAMELEON_CODEBOOK = 32


def _chameleon_image_token_name(code: int) -> str:
    """Name of the vocabulary entry of VQ code ``code``: ``IMGIMG`` + the code's digits as letters A-J + ``Z``.

    `ChameleonImageVocabularyMapping` finds the image tokens as the vocabulary entries starting with ``IMGIMG`` and
    decodes the code from the letters between the prefix and the final character.
    """
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


# named special tokens of each architecture: attribute name on the tokenizer -> token
_NAMED_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "paligemma": {"image_token": "<image>"},
    "idefics3": {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    },
    "chameleon": {
        "image_token": "<image>",
        "boi_token": "<racm3:break>",
        "eoi_token": "<eoss>",
        "sep_token": "<reserved08706>",
    },
    "qwen2_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "text": {},
}

# further special tokens (no attribute name) of each architecture
_EXTRA_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "idefics3": _IDEFICS3_ROW_COL,
}

# what the chat template writes for {"type": "image"}
_IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "llava_next": "<image>",
    "paligemma": "<image>",
    "idefics3": "<image>",
    "chameleon": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "text": "",  # a text-only model ignores images in a conversation
}


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {arch!r}; valid names are: {', '.join(TINY_ARCHITECTURES)}.")


def build_tiny_tokenizer(arch: str = "text", words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny word-level tokenizer of architecture ``arch`` (see [`TINY_ARCHITECTURES`]), offline.

    The vocabulary is, in this order: ``<pad>`` (0), ``<s>`` (1), ``<|end|>`` (2, the EOS and end-of-turn token),
    ``<unk>`` (3), the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, the words, punctuation marks
    and newline of a built-in corpus (so word ids are the same for every architecture; the digit names
    [`DIGIT_NAMES`] are among them), for Chameleon its VQ codebook entries ``IMGIMG...Z``, then the architecture's
    image tokens (all special). Text is lower-cased and split into words, single punctuation marks and newlines;
    other whitespace only separates; unknown words become ``<unk>``. The tokenizer prepends ``<s>`` (PaliGemma's
    processor turns that off and puts ``<s>`` after the image tokens itself) and pads on the right. Its chat template
    renders ``<|role|>content<|end|>`` per message and ``<|assistant|>`` for ``add_generation_prompt``.

    Processors can add more tokens when they are constructed (PaliGemma adds 1152 ``<loc>``/``<seg>`` tokens), so
    size a model on ``len(tokenizer)`` after building its processor, as [`build_tiny_model`] does.

    ``words`` replaces the built-in corpus with another vocabulary (lower-case words; punctuation and newline are
    always in), for a task of its own such as the demo's scenes.
    """
    _check_arch(arch)
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = _NAMED_TOKENS[arch]
    extra = _EXTRA_SPECIAL_TOKENS.get(arch, ())
    arch_special = [*named.values(), *extra]
    regular = _corpus_words() if words is None else sorted(set(words) | set(_PUNCTUATION) | {"\n"})
    if arch == "chameleon":
        regular += [_chameleon_image_token_name(code) for code in range(_CHAMELEON_CODEBOOK)]

    vocab: dict[str, int] = {}
    for token in (*_BASE_SPECIAL_TOKENS, *regular, *arch_special):
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    # words, single punctuation marks and newlines are tokens; other whitespace only separates them
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_RE.pattern), behavior="removed", invert=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        unk_token=_UNK,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        extra_special_tokens=list(extra),
        model_max_length=_MAX_POSITIONS,
        chat_template=_chat_template(_IMAGE_PLACEHOLDER[arch], images_first=arch == "paligemma"),
        **_ROLE_TOKEN_NAMES,
        **named,
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Processor subclasses: Qwen2-VL without its video processor, Chameleon with a chat template
# ---------------------------------------------------------------------------------------------------------------------
_PROCESSOR_CLASSES: dict[str, type] = {}


def _tiny_qwen2_vl_processor_class() -> type:
    """Create (once) the image-only Qwen2-VL processor class ``TinyQwen2VLProcessor``."""
    if "TinyQwen2VLProcessor" in _PROCESSOR_CLASSES:
        return _PROCESSOR_CLASSES["TinyQwen2VLProcessor"]
    from transformers import ProcessorMixin
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class TinyQwen2VLProcessor(Qwen2VLProcessor):
        """[`~transformers.Qwen2VLProcessor`] with an image processor and a tokenizer but no video processor.

        Qwen2-VL's video processor needs torchvision, which the offline test machines cannot install; without it
        `Qwen2VLProcessor` can be neither constructed nor loaded. Images and text are processed exactly as by the
        parent class.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return _finish_processor_class(TinyQwen2VLProcessor)


def _tiny_chameleon_processor_class() -> type:
    """Create (once) the Chameleon processor class ``TinyChameleonProcessor`` that keeps its chat template."""
    if "TinyChameleonProcessor" in _PROCESSOR_CLASSES:
        return _PROCESSOR_CLASSES["TinyChameleonProcessor"]
    from transformers import ChameleonProcessor

    class TinyChameleonProcessor(ChameleonProcessor):
        """[`~transformers.ChameleonProcessor`] that accepts, saves and reloads a chat template.

        `ChameleonProcessor.__init__` takes no ``chat_template``, so a template saved next to it is dropped on
        reload and ``apply_chat_template`` fails. Everything else is inherited unchanged.
        """

        def __init__(
            self,
            image_processor,
            tokenizer,
            image_seq_length: int = 1024,
            image_token: str = "<image>",
            chat_template=None,
            **kwargs,
        ):
            super().__init__(image_processor, tokenizer, image_seq_length=image_seq_length, image_token=image_token)
            self.chat_template = chat_template

    return _finish_processor_class(TinyChameleonProcessor)


def _finish_processor_class(cls: type) -> type:
    """Give a processor subclass this module's name (for pickle and error messages) and cache it."""
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    _PROCESSOR_CLASSES[cls.__name__] = cls
    return cls


_PROCESSOR_FACTORIES = {
    "TinyQwen2VLProcessor": _tiny_qwen2_vl_processor_class,
    "TinyChameleonProcessor": _tiny_chameleon_processor_class,
}


def __getattr__(name: str) -> Any:
    # the processor subclasses subclass transformers classes: create them on first access, so that importing this
    # module stays cheap and pickle still finds them by their qualified names
    if name in _PROCESSOR_FACTORIES:
        return _PROCESSOR_FACTORIES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REGISTERED = False


def register_tiny_processors() -> None:
    """Make ``AutoProcessor.from_pretrained`` able to load the processors saved by [`save_tiny_model`].

    Two tiny architectures save a processor subclass defined here: ``"qwen2_vl"`` (``TinyQwen2VLProcessor``:
    Qwen2-VL's own processor requires a torchvision video processor) and ``"chameleon"`` (``TinyChameleonProcessor``:
    Chameleon's own processor drops its chat template on reload). ``AutoProcessor`` finds a saved processor by the
    class name in ``processor_config.json`` among the registered classes, so these are registered with it, each under
    a private stand-in config class: real Qwen2-VL and Chameleon checkpoints still get their own processors.
    [`build_tiny_model`] and [`save_tiny_model`] call this; a process that only loads saved tiny Qwen2-VL or
    Chameleon directories must call it first. Idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoProcessor

    for name, factory in _PROCESSOR_FACTORIES.items():
        key = type(f"_{name}RegistrationKey", (), {"__doc__": f"Stand-in config class for registering {name}."})
        AutoProcessor.register(key, factory(), exist_ok=True)
    _REGISTERED = True


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
        "max_position_embeddings": _MAX_POSITIONS,
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
    processor = _tiny_chameleon_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=tokenizer.chat_template,
    )
    vq_config = ChameleonVQVAEConfig(
        embed_dim=16,
        num_embeddings=_CHAMELEON_CODEBOOK,
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
    processor = _tiny_qwen2_vl_processor_class()(
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
    _check_arch(arch)
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


def digit_images(n: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """``n`` real handwritten digits from scikit-learn's ``load_digits``, as ``(image, label)`` pairs.

    The 8x8 scans (1797 of them, shipped inside scikit-learn, so no download) are drawn without replacement in an
    order fixed by ``seed`` and upscaled to [`TINY_IMAGE_SIZE`]-pixel square RGB PIL images, dark ink on white.
    ``label`` is the digit (0-9; its word is ``DIGIT_NAMES[label]``).

    Raises:
        ValueError: if ``n`` is negative or larger than the 1797 available digits.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    total = len(digits.target)
    if not 0 <= n <= total:
        raise ValueError(f"n must be between 0 and {total} (the number of scikit-learn digits), got {n}.")
    order = np.random.default_rng(seed).permutation(total)[:n]
    pairs = []
    for index in order:
        ink = digits.images[index] / 16.0  # 0 (blank) .. 1 (full ink)
        gray = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
        image = Image.fromarray(gray).resize((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), Image.Resampling.NEAREST)
        pairs.append((image.convert("RGB"), int(digits.target[index])))
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Teaching a tiny model the handwritten digits
# ---------------------------------------------------------------------------------------------------------------------
# A randomly initialised model has no structure for an SAE to find: its residual stream is noise of the input. The
# SAE vs SAE-V benchmark and the demo need a tiny MLLM that has learned something from real image-text data, so these
# helpers turn scikit-learn's digits into captioning conversations and train on them. Every word below is in the tiny
# tokenizer's vocabulary (no <unk>).

DIGIT_IMAGE_QUESTIONS: tuple[str, ...] = (
    "what digit is this ?",
    "which number is shown in the image ?",
    "what number do you see in this picture ?",
    "read the digit .",
    "describe the image .",
    "what is written here ?",
    "can you tell me what digit this is ?",
)
"""User questions asked with a digit image by [`digit_caption_examples`]."""

DIGIT_CAPTIONS: tuple[str, ...] = (
    "a handwritten digit {name} .",
    "it is the digit {name} .",
    "the image shows a handwritten {name} .",
    "i see a {name} .",
    "this is a {name} written by hand .",
    "the answer is {name} .",
    "i think it is {name} .",
    "it is a {numeral} .",
)
"""Assistant captions naming a digit (``{name}``: its word, ``{numeral}``: its figure); the first is the canonical one
that [`digit_accuracy`] scores."""

_DIGIT_TEXT_QUESTIONS = (
    "what number is {numeral} ?",
    "read the digit {numeral} .",
    "which digit is {numeral} ?",
    "what is written here : {numeral} ?",
)
_PARITY_ANSWERS = ("it is {parity} .", "{name} is {parity} .", "the answer is {parity} .")
_LARGER_ANSWERS = {True: ("yes .", "yes , it is .", "yes , {name} is larger than five ."),
                   False: ("no .", "no , it is not .", "no , {name} is not larger than five .")}
_NUMERAL_ANSWERS = ("it is {numeral} .", "the answer is {numeral} .")


def _format(template: str, digit: int, **extra: str) -> str:
    return template.format(name=DIGIT_NAMES[digit], numeral=str(digit), **extra)


def digit_caption_examples(digits: list[tuple[Image.Image, int]], seed: int = 0) -> list[dict[str, Any]]:
    """Image-captioning conversations, one per ``(image, label)`` pair of [`digit_images`].

    Each row is ``{"images": [image], "prompt": question, "response": caption, "digit": label}``: a question drawn
    from [`DIGIT_IMAGE_QUESTIONS`] and a caption from [`DIGIT_CAPTIONS`] naming the digit, both chosen by ``seed``.
    The columns suit [`~saev_hf.PromptFormat`] with ``response_column="response"`` (and ``datasets.Dataset.from_list``).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for image, label in digits:
        question = DIGIT_IMAGE_QUESTIONS[rng.integers(len(DIGIT_IMAGE_QUESTIONS))]
        caption = _format(DIGIT_CAPTIONS[rng.integers(len(DIGIT_CAPTIONS))], label)
        rows.append({"images": [image], "prompt": question, "response": caption, "digit": int(label)})
    return rows


def digit_text_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` text-only conversations about digits (no image), for training and probing the text side of a model.

    Each row is ``{"prompt": question, "response": answer, "digit": d}``, a digit ``d`` and one of four tasks drawn
    by ``seed``: name the figure ``d`` (answered with a caption of [`DIGIT_CAPTIONS`]), give the figure of the word,
    say whether ``d`` is even or odd, and whether it is larger than five.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        digit, task = int(rng.integers(10)), int(rng.integers(4))
        name = DIGIT_NAMES[digit]

        def pick(options: tuple[str, ...]) -> str:
            return options[rng.integers(len(options))]

        if task == 0:
            prompt, response = _format(pick(_DIGIT_TEXT_QUESTIONS), digit), _format(pick(DIGIT_CAPTIONS), digit)
        elif task == 1:
            prompt, response = f"what number is {name} ?", _format(pick(_NUMERAL_ANSWERS), digit)
        elif task == 2:
            parity = "even" if digit % 2 == 0 else "odd"
            prompt = f"is {name} an even or odd number ?"
            response = _format(pick(_PARITY_ANSWERS), digit, parity=parity)
        else:
            prompt, response = f"is {name} larger than five ?", _format(pick(_LARGER_ANSWERS[digit > 5]), digit)
        rows.append({"prompt": prompt, "response": response, "digit": digit})
    return rows


def _response_inputs(model, processor, rows: list[dict[str, Any]]):
    """Right-padded inputs for rows with a response, and labels that are -100 except on the assistant's tokens."""
    import torch

    from .activations import image_token_id_of
    from .prompts import PromptFormat, prepare_inputs

    has_images = bool(rows[0].get("images"))
    if has_images and image_token_id_of(model, processor) is None:
        raise ValueError(f"Rows with images were given to the text-only model {type(model).__name__}: give it rows "
                         f"without an 'images' column (e.g. digit_text_examples).")
    prompt_format = PromptFormat(image_column="images" if has_images else None, response_column="response")
    inputs = prepare_inputs(processor, rows, prompt_format)
    tokenizer = getattr(processor, "tokenizer", processor)
    assistant_id = tokenizer.convert_tokens_to_ids(_ROLE_TOKEN_NAMES["assistant_token"])
    input_ids = inputs["input_ids"]
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    # the response starts after the last <|assistant|> marker; its closing <|end|> is learned too
    response_start = torch.where(input_ids == assistant_id, positions, -1).max(dim=1, keepdim=True).values + 1
    if (response_start == 0).any():
        raise ValueError("A row rendered without an <|assistant|> turn: every row needs a 'response'.")
    keep = (positions >= response_start) & (inputs["attention_mask"] == 1)
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, -100))
    return inputs, labels


def _response_log_likelihoods(model, processor, rows: list[dict[str, Any]]):
    """Per row: summed log-probability of its response tokens and their count (model in its current mode)."""
    import torch
    import torch.nn.functional as F

    inputs, labels = _response_inputs(model, processor, rows)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (log_probs * mask).sum(1), mask.sum(1)


def _group_by_modality(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows with images and rows without, as separate groups (a batch holds one kind only)."""
    groups = ([row for row in rows if row.get("images")], [row for row in rows if not row.get("images")])
    return [group for group in groups if group]


def answer_loss(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    rows: list[dict[str, Any]],
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy of ``model`` on the answer tokens of ``rows`` (what [`pretrain_tiny_model`] fits).

    ``rows`` are conversations ``{"prompt", "response"}`` plus ``"images"`` for image rows (e.g. from
    [`digit_caption_examples`]); the answer tokens are the response and its closing ``<|end|>``. The model is run as
    it is (call ``model.eval()`` first; forward hooks on it apply, e.g. an SAE spliced into a layer).
    """
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for group in _group_by_modality(rows):
            for start in range(0, len(group), batch_size):
                log_likelihood, tokens = _response_log_likelihoods(model, processor, group[start : start + batch_size])
                total -= float(log_likelihood.double().sum())
                count += int(tokens.sum())
    return total / max(count, 1)


def digit_accuracy(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    digits: list[tuple[Image.Image | None, int]],
    batch_size: int = 8,
) -> float:
    """Fraction of ``digits`` the model names correctly, ranking the ten candidate captions by log-likelihood.

    For each ``(image, label)`` the model is asked ``"what digit is this ?"`` with the image (or, when ``image`` is
    None, ``"what number is <label> ?"`` in text: the way to ask a text-only model), and each of the ten captions
    ``"a handwritten digit <name> ."`` (the first of [`DIGIT_CAPTIONS`]) is scored by the summed log-probability of its
    tokens; the prediction is the best-scoring digit. Chance is 10%. ``batch_size`` counts digits (10 rows each).
    """
    import torch

    if not digits:
        raise ValueError("digit_accuracy needs at least one (image, label) pair.")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(digits), batch_size):
            chunk = digits[start : start + batch_size]
            rows = []
            for image, label in chunk:
                if image is not None:
                    row = {"images": [image], "prompt": "what digit is this ?"}
                else:
                    row = {"prompt": f"what number is {label} ?"}
                rows.extend({**row, "response": _format(DIGIT_CAPTIONS[0], candidate)} for candidate in range(10))
            if len({bool(row.get("images")) for row in rows}) > 1:  # mixed chunk: score the two kinds separately
                scores = torch.cat([_response_log_likelihoods(model, processor, [r])[0] for r in rows])
            else:
                scores = _response_log_likelihoods(model, processor, rows)[0]
            predictions = scores.view(len(chunk), 10).argmax(dim=1)
            correct += sum(int(p) == label for p, (_, label) in zip(predictions.tolist(), chunk))
    model.train(was_training)
    return correct / len(digits)


def load_text_model_weights(model: PreTrainedModel, text_model: PreTrainedModel) -> PreTrainedModel:
    """Initialise the language model of a tiny MLLM from a tiny text-only model, in place, and return the MLLM.

    A real LLaVA starts from a pretrained LLM and learns images on top of it. Doing the same here (train the
    ``"text"`` model on text, copy it into a ``"llava"``, then train that on images) makes the MLLM's language model a
    fine-tuned copy of the text model, so that an SAE trained on one can be evaluated on the other (the paper's
    transfer experiment), and it lets the MLLM learn the images faster. Decoder layers and final norm are copied
    whole; the embedding and ``lm_head`` rows are copied for the text model's token ids, which every tiny tokenizer
    shares (the MLLM's own image tokens come after them and keep their initialisation).

    Works for the tiny architectures whose language model is a Llama decoder: ``"llava"``, ``"llava_next"``,
    ``"idefics3"``.

    Raises:
        ValueError: if the two language models are not of the same type with the same parameters (names, shapes).
    """
    import torch

    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    source = text_model.model.state_dict()
    target = language_model.state_dict() if language_model is not None else {}
    mismatched = sorted(
        name for name in set(source) | set(target)
        if name not in source or name not in target
        or source[name].shape[1:] != target[name].shape[1:] or source[name].shape[0] > target[name].shape[0]
    )
    head, text_head = getattr(model, "lm_head", None), getattr(text_model, "lm_head", None)
    kind, text_kind = model.config.get_text_config().model_type, text_model.config.model_type
    if kind != text_kind:  # e.g. Gemma has Llama's parameter shapes but not its arithmetic
        mismatched.insert(0, f"model_type {kind!r} vs {text_kind!r}")
    if mismatched or head is None or text_head is None or text_head.weight.shape[0] > head.weight.shape[0]:
        raise ValueError(
            f"Cannot copy {type(text_model).__name__} into the language model of {type(model).__name__}: their "
            f"parameters differ ({mismatched[:5] or 'lm_head'}). Use a tiny 'text' model and a tiny 'llava', "
            f"'llava_next' or 'idefics3' built by build_tiny_model."
        )
    with torch.no_grad():
        for name, value in source.items():
            target[name][: value.shape[0]].copy_(value)
        head.weight[: text_head.weight.shape[0]].copy_(text_head.weight)
    return model


def _is_vision_encoder(name: str) -> bool:
    """Whether parameter ``name`` belongs to a vision encoder (not to the projector/merger that feeds the LM)."""
    if any(part in name for part in ("vision_tower.", "vision_model.", "vqmodel.")):
        return True
    return "visual." in name and "merger" not in name


def pretrain_tiny_model(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    examples: list[dict[str, Any]],
    *,
    steps: int = 400,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    train_vision_tower: bool = False,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    eval_examples: list[dict[str, Any]] | None = None,
    eval_digits: list[tuple[Image.Image | None, int]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a tiny model (see [`build_tiny_model`]) in place on conversations, with next-token loss on the answers.

    As in LLaVA's recipe the vision encoder stays frozen (``train_vision_tower=False``: on these digits it also learns
    faster that way) and the projector and the language model are trained, with AdamW, a linear warm-up, a cosine
    decay to a tenth of ``learning_rate``, and gradient clipping. The loss is the cross-entropy of the assistant's
    tokens only (the response and its closing ``<|end|>``); the user turn, the image tokens, the template and padding
    are labelled -100. Rows with images and rows without go in separate batches, drawn in a random order, so an MLLM
    can learn from image captions and text-only conversations together; a text-only model (``"text"``) takes rows
    without images only.

    Deterministic given ``seed`` (on one CPU thread: batches, their order and any randomness in the model are seeded;
    the global RNG state is restored afterwards). With the defaults, the tiny LLaVA trained on the
    [`digit_caption_examples`] of 1000 digits (about 25 s on one CPU thread) names about 70% of held-out digits
    correctly ([`digit_accuracy`]; 12% before). Starting its language model from a trained ``"text"`` model
    ([`load_text_model_weights`]) and mixing in [`digit_text_examples`] keeps it able to answer text-only questions;
    ``benchmarks/sae_vs_saev.py`` does that (1000 steps at ``learning_rate=1e-3``: about 85%).

    Example:

    ```python
    >>> from saev_hf.tiny_models import build_tiny_model, digit_caption_examples, digit_images, pretrain_tiny_model
    >>> digits = digit_images(68, seed=0)
    >>> model, processor = build_tiny_model("llava", seed=0)
    >>> summary = pretrain_tiny_model(model, processor, digit_caption_examples(digits[:64]), steps=5, batch_size=8,
    ...                               eval_digits=digits[64:])
    >>> summary["final_loss"] < summary["initial_loss"]
    True

    ```

    Args:
        model: the tiny model to train, in place (left in eval mode).
        processor: its processor (the tokenizer for ``"text"``).
        examples: rows ``{"prompt", "response"}`` plus ``"images"`` (a list of images) for image rows, e.g. from
            [`digit_caption_examples`] and [`digit_text_examples`].
        steps: optimizer steps. batch_size: rows per step.
        learning_rate, weight_decay, max_grad_norm: AdamW's settings and the clipping norm.
        train_vision_tower: train the vision encoder too (its parameters are otherwise left as they are).
        warmup_steps: linear warm-up length; default 5% of ``steps``.
        seed: seeds the batch order.
        eval_examples: rows whose mean answer-token loss is reported before and after training (default: up to 256
            of ``examples``).
        eval_digits: ``(image, label)`` pairs (``image`` None for text-only questions) for [`digit_accuracy`],
            reported before and after training.
        progress: show a tqdm progress bar.

    Returns:
        A dict: ``steps``, ``examples``, ``initial_loss`` and ``final_loss`` (mean cross-entropy per answer token on
        ``eval_examples``), ``train_loss_first`` and ``train_loss_last`` (mean training loss of the first and last 10%
        of steps), ``digit_accuracy_before`` and ``digit_accuracy_after`` (None without ``eval_digits``) and
        ``seconds``.
    """
    import math
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive.")
    if not examples:
        raise ValueError("pretrain_tiny_model needs examples: rows with 'prompt' and 'response' (and 'images').")
    missing = [i for i, row in enumerate(examples) if row.get("prompt") is None or row.get("response") is None]
    if missing:
        raise ValueError(f"Rows {missing[:5]} lack a 'prompt' or a 'response'; every training row needs both.")
    started = time.perf_counter()
    groups = _group_by_modality(list(examples))
    if eval_examples is None:
        rng = np.random.default_rng(seed)
        eval_examples = [examples[i] for i in sorted(rng.permutation(len(examples))[:256].tolist())]
    warmup = max(1, round(0.05 * steps)) if warmup_steps is None else warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    # batches: each group is shuffled per epoch and cut into batches; the batches of all groups interleave randomly
    rng = np.random.default_rng(seed)

    def batches():
        while True:
            epoch = []
            for group in groups:
                order = rng.permutation(len(group))
                epoch += [[group[i] for i in order[s : s + batch_size]] for s in range(0, len(group), batch_size)]
            for index in rng.permutation(len(epoch)):
                yield epoch[index]

    initial_loss = answer_loss(model, processor, eval_examples, batch_size)
    accuracy_before = digit_accuracy(model, processor, eval_digits) if eval_digits else None
    parameters = [p for n, p in model.named_parameters()
                  if p.requires_grad and (train_vision_tower or not _is_vision_encoder(n))]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not train_vision_tower
              and _is_vision_encoder(n)]
    model.train()
    try:
        for p in frozen:  # no gradient is computed for the frozen encoder at all
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stream = batches()
            for _ in tqdm(range(steps), desc="Pretraining tiny model", unit="step", disable=not progress):
                inputs, labels = _response_inputs(model, processor, next(stream))
                logits = model(**inputs, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    tenth = max(1, steps // 10)
    return {
        "steps": steps,
        "examples": len(examples),
        "initial_loss": initial_loss,
        "final_loss": answer_loss(model, processor, eval_examples, batch_size),
        "train_loss_first": float(np.mean(losses[:tenth])),
        "train_loss_last": float(np.mean(losses[-tenth:])),
        "digit_accuracy_before": accuracy_before,
        "digit_accuracy_after": digit_accuracy(model, processor, eval_digits) if eval_digits else None,
        "seconds": time.perf_counter() - started,
    }


__all__ += [
    "DIGIT_CAPTIONS",
    "DIGIT_IMAGE_QUESTIONS",
    "answer_loss",
    "digit_accuracy",
    "digit_caption_examples",
    "digit_text_examples",
    "load_text_model_weights",
    "pretrain_tiny_model",
]
