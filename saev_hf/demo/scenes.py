"""A grounded task from real data: scenes of 1-3 coloured handwritten digits, and questions that need the image.

Each scene is a 24x24 RGB image on a 3x3 grid of 8x8 cells; 1-3 cells hold one of scikit-learn's real handwritten
digit scans (8x8, shipped inside the package, so no download), each in its own colour on black, every digit and colour
at most once per scene. The questions need the image:

==============  ===============================  =====================================================
kind            question                         faithful answer
==============  ===============================  =====================================================
``which``       ``which digit is red ?``         the digit (``3``), or ``none`` when nothing is red
``colour``      ``what colour is the 3 ?``       the colour (``red``), or ``none`` when there is no 3
``where``       ``where is the 3 ?``             its cell (``top left`` ... ``bottom right``) or ``none``
``exists``      ``is there a 3 ?``               ``yes`` / ``no``
``count``       ``how many digits are there ?``  ``one`` / ``two`` / ``three``
==============  ===============================  =====================================================

A question about an object the scene does not hold ("absent") has the answer a faithful model gives (``none``,
``no``); its confident alternative is a hallucination. Scans are split once into a training and a held-out part
([`DigitScans`]): held-out scenes use digit scans never seen in training. Digits are written as figures (``3``) and
counts as words (``three``), so that a digit's token never doubles as a count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40),
    "green": (40, 220, 40),
    "blue": (60, 90, 255),
    "yellow": (240, 220, 30),
    "white": (235, 235, 235),
}
"""Ink colours (RGB at full ink) of the scene objects."""

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
GRID = 3
CELL = 8
SCENE_SIZE = GRID * CELL
"""Side of a scene image in pixels (the image processor keeps it as it is: one 8x8 patch per cell)."""

POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                              "bottom left", "bottom", "bottom right")
"""Name of each cell, row by row."""

COUNTS: tuple[str, ...] = ("zero", "one", "two", "three")
QUESTION_KINDS: tuple[str, ...] = ("which", "colour", "where", "exists", "count")
CONCEPTS: tuple[str, ...] = (*DIGITS, *COLOURS)
"""The words a question can name and a cell can show: the digits and the colours."""

ANSWERS: dict[str, tuple[str, ...]] = {
    "which": (*DIGITS, "none"),
    "colour": (*COLOURS, "none"),
    "where": (*POSITIONS, "none"),
    "exists": ("yes", "no"),
    "count": COUNTS[1:],
}
"""Every answer of each question kind: a model's answer is the candidate it finds most likely."""

EMPTY = "empty"
SCENE_PREFIX = "scene :"
VOCABULARY: tuple[str, ...] = tuple(sorted(set(
    " ".join([*CONCEPTS, *POSITIONS, *COUNTS, EMPTY, SCENE_PREFIX, "none yes no , . ?",
              "which digit is what colour the where is there a how many digits are"]).split())))
"""Every word of the task (questions, answers, scene descriptions): the tiny tokenizer's vocabulary."""


@dataclass(frozen=True)
class SceneObject:
    """One handwritten digit in a scene: its label, colour, cell (0-8, row by row) and scan (index into the scans)."""

    digit: int
    colour: str
    cell: int
    scan: int


@dataclass(frozen=True)
class Scene:
    """1-3 [`SceneObject`]s on the 3x3 grid, each digit, colour and cell at most once."""

    objects: tuple[SceneObject, ...]

    def image(self, scans: DigitScans) -> Image.Image:
        """The scene as a `SCENE_SIZE`-pixel RGB image: each object's scan in its colour, on black."""
        pixels = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), dtype=np.float32)
        for obj in self.objects:
            row, col = divmod(obj.cell, GRID)
            ink = scans.images[obj.scan] / 16.0
            pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = ink[..., None] * COLOURS[obj.colour]
        return Image.fromarray(np.round(pixels).astype(np.uint8))

    def describe(self) -> str:
        """The scene in words, cell by cell: ``"red 3 top left , blue 7 centre ."``."""
        parts = [f"{o.colour} {o.digit} {POSITIONS[o.cell]}" for o in sorted(self.objects, key=lambda o: o.cell)]
        return " , ".join(parts) + " ."

    def cell_words(self) -> list[tuple[str, ...]]:
        """For each cell (row by row) the words of what it shows: ``(colour, digit)`` or ``("empty",)``."""
        words: list[tuple[str, ...]] = [(EMPTY,)] * (GRID * GRID)
        for obj in self.objects:
            words[obj.cell] = (obj.colour, str(obj.digit))
        return words

    @property
    def concepts(self) -> set[str]:
        """The digits (as figures) and colours in the scene."""
        return {str(o.digit) for o in self.objects} | {o.colour for o in self.objects}


class DigitScans:
    """scikit-learn's 1797 handwritten digit scans, split once into a training and a held-out part.

    Args:
        held_out_fraction: share of the scans kept for held-out scenes (never drawn by ``split="train"``).
        seed: seed of the split.
    """

    def __init__(self, held_out_fraction: float = 0.3, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction={held_out_fraction} must be in (0, 1).")
        digits = load_digits()
        self.images = digits.images.astype(np.float32)  # 0 (blank) .. 16 (full ink)
        self.labels = digits.target.astype(int)
        order = np.random.default_rng(seed).permutation(len(self.labels))
        cut = int(round(len(order) * (1 - held_out_fraction)))
        self.splits = {"train": np.sort(order[:cut]), "held_out": np.sort(order[cut:])}

    @cached_property
    def _by_digit(self) -> dict[str, list[np.ndarray]]:
        return {name: [index[self.labels[index] == d] for d in range(10)] for name, index in self.splits.items()}

    def scans_of(self, digit: int, split: str) -> np.ndarray:
        """Indices of the scans of `digit` in `split` (``"train"`` or ``"held_out"``)."""
        if split not in self.splits:
            raise ValueError(f"split={split!r} must be one of {sorted(self.splits)}.")
        return self._by_digit[split][digit]


def random_scene(rng: np.random.Generator, scans: DigitScans, split: str, avoid: set[str] | None = None) -> Scene:
    """A scene of 1-3 objects with distinct digits, colours and cells, drawn by `rng` from the scans of `split`;
    with `avoid`, none of those concepts (digit figures or colours) appears in it."""
    digits = [d for d in range(10) if str(d) not in (avoid or ())]
    colours = [c for c in COLOURS if c not in (avoid or ())]
    count = int(rng.integers(1, 1 + min(3, len(digits), len(colours))))
    chosen_digits = rng.choice(digits, size=count, replace=False)
    chosen_colours = rng.choice(colours, size=count, replace=False)
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    return Scene(tuple(SceneObject(int(d), str(c), int(cell), int(rng.choice(scans.scans_of(int(d), split))))
                       for d, c, cell in zip(chosen_digits, chosen_colours, cells)))


@dataclass(frozen=True)
class SceneQuestion:
    """A question about a scene: its kind, text and faithful answer; the concept it names (None for counts) and
    whether that concept is in the scene."""

    kind: str
    text: str
    answer: str
    concept: str | None
    present: bool

    @property
    def hallucinations(self) -> tuple[str, ...]:
        """Confident answers to a question about an absent object (empty for other questions)."""
        if self.present or self.kind == "count":
            return ()
        return tuple(a for a in ANSWERS[self.kind] if a not in ("none", "no"))


def ask(scene: Scene, kind: str, rng: np.random.Generator, absent: bool = False) -> SceneQuestion:
    """A question of `kind` (see [`QUESTION_KINDS`]) about `scene`, naming a concept the scene holds or, with
    `absent`, one it does not (then the faithful answer is ``none`` / ``no``)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {QUESTION_KINDS}.")
    if kind == "count":
        if absent:
            raise ValueError("A count question names no object, so it cannot be about an absent one.")
        return SceneQuestion(kind, "how many digits are there ?", COUNTS[len(scene.objects)], None, True)
    if kind == "which":
        if absent:
            colour = str(rng.choice([c for c in COLOURS if c not in scene.concepts]))
            return SceneQuestion(kind, f"which digit is {colour} ?", "none", colour, False)
        obj = scene.objects[rng.integers(len(scene.objects))]
        return SceneQuestion(kind, f"which digit is {obj.colour} ?", str(obj.digit), obj.colour, True)
    if absent:
        digit = str(rng.choice([d for d in DIGITS if d not in scene.concepts]))
        answer = "no" if kind == "exists" else "none"
    else:
        obj = scene.objects[rng.integers(len(scene.objects))]
        digit = str(obj.digit)
        answer = {"colour": obj.colour, "where": POSITIONS[obj.cell], "exists": "yes"}[kind]
    text = {"colour": f"what colour is the {digit} ?", "where": f"where is the {digit} ?",
            "exists": f"is there a {digit} ?"}[kind]
    return SceneQuestion(kind, text, answer, digit, not absent)


def borrowed_hallucination(scene: Scene, question: SceneQuestion, rng: np.random.Generator) -> str:
    """The confident answer an imperfect annotator gives to `question` about an object absent from `scene`: the
    answer for an object the scene does hold ("what colour is the 7 ?" -> the colour of a digit shown, "which digit
    is red ?" -> a digit shown, "is there a 7 ?" -> ``yes``). Attribute borrowing from what is in the image is the
    commonest hallucination in real instruction data, and the one preference data is collected to correct."""
    if question.present or question.kind == "count":
        raise ValueError(f"{question.text!r} names an object the scene holds: only a question about an absent object "
                         "can be answered with a hallucination.")
    obj = scene.objects[rng.integers(len(scene.objects))]
    return {"which": str(obj.digit), "colour": obj.colour, "where": POSITIONS[obj.cell],
            "exists": "yes"}[question.kind]


def question_rows(scans: DigitScans, n: int, split: str, rng: np.random.Generator, absent_fraction: float = 0.25,
                  as_text: bool = False, kinds: tuple[str, ...] = QUESTION_KINDS,
                  hallucination_fraction: float = 0.0) -> list[dict[str, Any]]:
    """`n` question-answer rows about random scenes of `split`: ``{"images": [image], "prompt", "response", "kind",
    "concept", "present", "scene", "hallucinated"}``; a question names an absent object with probability
    `absent_fraction` (never a count). With `as_text` the scene is described in words before the question instead of
    shown (no ``"images"``): the language model's first stage. With `hallucination_fraction`, that share of the
    questions about absent objects is answered with a [`borrowed_hallucination`] instead of the faithful ``none`` /
    ``no`` (``"hallucinated"`` marks them): instruction data as imperfect as real data is."""
    if not 0 <= hallucination_fraction <= 1:
        raise ValueError(f"hallucination_fraction={hallucination_fraction} must be in [0, 1].")
    rows = []
    for _ in range(n):
        scene = random_scene(rng, scans, split)
        kind = kinds[rng.integers(len(kinds))]
        question = ask(scene, kind, rng, absent=kind != "count" and rng.random() < absent_fraction)
        answer, hallucinated = question.answer, False
        if hallucination_fraction and not question.present \
                and rng.random() < hallucination_fraction:  # drawn only when asked: default rows unchanged
            answer, hallucinated = borrowed_hallucination(scene, question, rng), True
        row = {"prompt": question.text, "response": answer, "kind": kind, "concept": question.concept,
               "present": question.present, "scene": scene, "hallucinated": hallucinated}
        if as_text:
            row["prompt"] = f"{SCENE_PREFIX} {scene.describe()} {question.text}"
        else:
            row["images"] = [scene.image(scans)]
        rows.append(row)
    return rows


LOW_QUALITY_KINDS: tuple[str, ...] = ("hallucination", "swap")
"""The kinds of low-quality preference rows the paper names: a question about an object absent from the image whose
chosen answer is a confident hallucination (the faithful ``none`` / ``no`` rejected), and an image swapped for another
scene's, so that the chosen answer no longer describes what is shown."""


def preference_rows(scans: DigitScans, n: int, split: str, rng: np.random.Generator,
                    low_quality_fraction: float = 0.4, absent_fraction: float = 0.25,
                    refusal_rejected_fraction: float = 0.0) -> list[dict[str, Any]]:
    """`n` preference rows about scenes of `split` (TRL's layout, plain prompts beside an image column):
    ``{"images", "prompt", "chosen", "rejected", "low_quality", "quality", "kind", "present", "concept",
    "scene_concepts"}`` (the last: the digits and colours of the image shown).

    A clean row asks a question (about an absent object with probability `absent_fraction`, never for counts) and
    prefers the faithful answer to a wrong one: another confident answer (``no`` for "is there" questions), or for
    an absent object a confident hallucination. With `refusal_rejected_fraction`, that share of the clean rows about
    a present object (which / colour / where) rejects the over-cautious ``none`` instead, so that the clean rows
    teach both halves of faithfulness: ``none`` when the object is absent, an answer when it is there. A known
    `low_quality_fraction` of the rows are low quality, half of each kind of [`LOW_QUALITY_KINDS`] (``quality``
    names it): ``"hallucination"`` prefers a confident answer about an absent object to the faithful one;
    ``"swap"`` keeps a clean row's question and answers under the image of another scene that lacks the object the
    question names (for counts: that holds another number of digits)."""
    for name, value in (("low_quality_fraction", low_quality_fraction),
                        ("refusal_rejected_fraction", refusal_rejected_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} must be in [0, 1].")
    low = np.zeros(n, dtype=bool)
    low[rng.choice(n, size=round(low_quality_fraction * n), replace=False)] = True
    kinds_of_low = iter(np.resize(np.array(LOW_QUALITY_KINDS), int(low.sum()))[rng.permutation(int(low.sum()))])
    rows = []
    for i in range(n):
        scene = random_scene(rng, scans, split)
        quality = str(next(kinds_of_low)) if low[i] else "clean"
        kind = QUESTION_KINDS[rng.integers(len(QUESTION_KINDS) - (quality == "hallucination"))]  # no count
        absent = quality == "hallucination" or (quality == "clean" and kind != "count"
                                                 and rng.random() < absent_fraction)
        question = ask(scene, kind, rng, absent=absent)
        wrong = [a for a in ANSWERS[kind] if a not in (question.answer, "none", "no")] or ["no"]
        if question.present:
            chosen, rejected = question.answer, str(rng.choice(wrong))
            if refusal_rejected_fraction and "none" in ANSWERS[kind] and quality == "clean" \
                    and rng.random() < refusal_rejected_fraction:  # drawn only when asked: default rows unchanged
                rejected = "none"
        elif quality == "hallucination":
            chosen, rejected = str(rng.choice(question.hallucinations)), question.answer
        else:
            chosen, rejected = question.answer, str(rng.choice(question.hallucinations))
        shown = scene
        if quality == "swap":
            if question.concept is not None:
                shown = random_scene(rng, scans, split, avoid={question.concept})
            else:
                while len(shown.objects) == len(scene.objects):
                    shown = random_scene(rng, scans, split)
        rows.append({"images": [shown.image(scans)], "prompt": question.text, "chosen": chosen,
                     "rejected": rejected, "low_quality": bool(low[i]), "quality": quality, "kind": kind,
                     "present": question.present, "concept": question.concept,
                     "scene_concepts": sorted(shown.concepts)})
    return rows
