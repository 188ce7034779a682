"""Tokenizer and processors of the tiny offline MLLMs: what `build_tiny_model` puts next to each model.

* [`build_tiny_tokenizer`]: a word-level tokenizer built locally with the `tokenizers` library from a small built-in
  corpus (digit captions, question and answer words, role words), wrapped in [`~transformers.PreTrainedTokenizerFast`],
  with ``<s>``, ``<|end|>`` (end of turn, used as EOS), ``<pad>`` and ``<unk>``, the role markers ``<|system|>``,
  ``<|user|>``, ``<|assistant|>`` as special tokens, each architecture's own image tokens, and a Jinja chat template
  that accepts the transformers multimodal message format;
* two processor subclasses, for the architectures whose own processor cannot be used offline as it is:
  ``TinyQwen2VLProcessor`` (Qwen2-VL's needs a torchvision video processor) and ``TinyChameleonProcessor``
  (Chameleon's drops its chat template on reload). [`register_tiny_processors`] makes `AutoProcessor` find them; the
  library never calls it (a real model has nothing to do with them): code that loads a saved tiny Qwen2-VL or
  Chameleon folder without having built a tiny model in the same process calls it first.

This module imports transformers and tokenizers only inside its functions.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = ["TINY_ARCHITECTURES", "build_tiny_tokenizer", "register_tiny_processors"]

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

MAX_POSITIONS = 1024
"""Longest sequence of a tiny model (its ``max_position_embeddings`` and its tokenizer's ``model_max_length``)."""

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------
_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "<|end|>", "<unk>"
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# named (``tokenizer.user_token`` ...): named special tokens survive processors that replace the tokenizer's list of
# extra special tokens (Idefics3's does, on every construction and reload)
ROLE_TOKEN_NAMES = {"system_token": "<|system|>", "user_token": "<|user|>", "assistant_token": "<|assistant|>"}
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
    "__BOS__"
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

    ``<s>``, then ``<|role|>content<|end|>`` per message, then ``<|assistant|>`` when ``add_generation_prompt``. The
    template writes the BOS token itself, as Llama's and Gemma's do, so that TRL (which tokenizes the rendered text
    without adding special tokens) trains on the same tokens the reader and the processor give the model. An
    ``{"type": "image"}`` item is written as ``image_placeholder`` where it occurs or, with ``images_first``, all
    images go before the conversation (PaliGemma's layout: image tokens, then ``<s>``, then the text).
    """
    if images_first:  # PaliGemma's processor puts <s> after the images itself
        return (_IMAGES_FIRST.replace("__IMAGE__", image_placeholder)
                + _CHAT_TEMPLATE.replace("__IMAGE__", "").replace("__BOS__", ""))
    return _CHAT_TEMPLATE.replace("__IMAGE__", image_placeholder).replace("__BOS__", "{{- bos_token -}}")


# ---------------------------------------------------------------------------------------------------------------------
# Per-architecture special tokens
# ---------------------------------------------------------------------------------------------------------------------
_IDEFICS3_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))

# Chameleon's VQ codebook
CHAMELEON_CODEBOOK = 32


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


def check_arch(arch: str) -> None:
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
    check_arch(arch)
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = _NAMED_TOKENS[arch]
    extra = _EXTRA_SPECIAL_TOKENS.get(arch, ())
    arch_special = [*named.values(), *extra]
    regular = _corpus_words() if words is None else sorted(set(words) | set(_PUNCTUATION) | {"\n"})
    if arch == "chameleon":
        regular += [_chameleon_image_token_name(code) for code in range(CHAMELEON_CODEBOOK)]

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
        model_max_length=MAX_POSITIONS,
        chat_template=_chat_template(_IMAGE_PLACEHOLDER[arch], images_first=arch == "paligemma"),
        **ROLE_TOKEN_NAMES,
        **named,
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Processor subclasses: Qwen2-VL without its video processor, Chameleon with a chat template
# ---------------------------------------------------------------------------------------------------------------------
_PROCESSOR_CLASSES: dict[str, type] = {}


def tiny_qwen2_vl_processor_class() -> type:
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


def tiny_chameleon_processor_class() -> type:
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
    "TinyQwen2VLProcessor": tiny_qwen2_vl_processor_class,
    "TinyChameleonProcessor": tiny_chameleon_processor_class,
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
