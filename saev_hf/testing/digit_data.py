"""Real handwritten digits (scikit-learn's `load_digits`, shipped inside the package: no download) as images and as
image-caption and text-only conversations, every word in the tiny tokenizer's vocabulary.

This module imports numpy, PIL and scikit-learn only inside its functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .tiny_models import TINY_IMAGE_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = ["DIGIT_CAPTIONS", "DIGIT_IMAGE_QUESTIONS", "DIGIT_NAMES", "digit_caption_examples", "digit_images",
           "digit_text_examples"]

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""English names of the digits 0-9, all in the tiny tokenizer's vocabulary (``DIGIT_NAMES[label]``)."""


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
