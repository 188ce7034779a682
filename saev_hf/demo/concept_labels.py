"""Feature labels in the miniature, where every concept is known: the grounded tiny LLaVA labels its own SAE-V's
features by answering its own questions about their top patches, and judges held-out scenes with them.

[`ConceptExplainer`] is an explainer for [`saev_hf.interpret.labels.label_features`]: each evidence image (with
`image_evidence="mask"`, the top example's scene with only the cells where the feature fires most left, the others
black, i.e. empty) is asked "which digit is <colour> ?" for every colour; a colour answered with a digit says that
the cell shows that digit in that colour, and "what colour is the <digit> ?" is asked back for every digit seen. The
concept (digit or colour) seen on the most evidence images is the label (`"the digit 3"`, `"the colour red"`). A
feature without image evidence (it fires on words alone) is labelled by the concept word marked most often in its
text evidence.

[`ConceptJudge`] predicts whether the feature labelled with a concept fires on a held-out example: the model asked
"is there a <digit> ?" (or "which digit is <colour> ?", any answer but ``none``) about the example's image, or the
question of the example naming the concept (the demo's shared concept features fire on the word and on the cells).

```python
labels = label_features(sae, reader, dataset, features, ConceptExplainer(model, processor),
                        ConceptJudge(model, processor), LabelArguments(image_evidence="mask", max_patches=1))
label_concept(labels[f].label)  # "3", "red" or None
```
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ..interpret.labels import EvidenceExample, FeatureEvidence
from .grounded_llava import predict_answers
from .scenes import COLOURS, CONCEPTS, DIGITS


def concept_label(concept: str) -> str:
    """The label of a concept: `"the digit 3"` or `"the colour red"`."""
    if concept not in CONCEPTS:
        raise ValueError(f"{concept!r} is not a concept of the miniature: one of {CONCEPTS}.")
    return f"the digit {concept}" if concept in DIGITS else f"the colour {concept}"


def label_concept(label: str) -> str | None:
    """The concept a label names (`"3"`, `"red"`), or None when it names none or several."""
    words = set(re.findall(r"[a-z0-9]+", str(label).lower()))
    named = [concept for concept in CONCEPTS if concept in words]
    return named[0] if len(named) == 1 else None


def marked_words(text: str) -> list[str]:
    """The words of an evidence text that are marked (`<<3>>`)."""
    return [word.strip().lower() for word in re.findall(r"<<(.*?)>>", text)]


class ConceptExplainer:
    """
    Labels a feature with the concept the grounded model sees on its evidence images (see the module docstring).

    Args:
        model, processor: the grounded LLaVA and its processor.
        batch_size (`int`): questions per forward.
    """

    name = "the grounded tiny LLaVA answering its own questions"

    def __init__(self, model: Any, processor: Any, batch_size: int = 32) -> None:
        self.model, self.processor, self.batch_size = model, processor, batch_size

    def ask(self, questions: list[tuple[Any, str, str]]) -> list[str]:
        """The model's answers to `(image, question, kind)` triples."""
        rows = [{"images": [image], "prompt": prompt, "kind": kind} for image, prompt, kind in questions]
        return predict_answers(self.model, self.processor, rows, self.batch_size) if rows else []

    def concepts_seen(self, images: list[Any]) -> list[set[str]]:
        """For each image, the digits and colours the model says it shows."""
        which = self.ask([(image, f"which digit is {colour} ?", "which") for image in images for colour in COLOURS])
        seen: list[set[str]] = []
        for i in range(len(images)):
            answers = which[i * len(COLOURS):(i + 1) * len(COLOURS)]
            seen.append({a for a in answers if a != "none"} | {c for c, a in zip(COLOURS, answers) if a != "none"})
        back = [(i, digit) for i, concepts in enumerate(seen) for digit in sorted(concepts & set(DIGITS))]
        colours = self.ask([(images[i], f"what colour is the {digit} ?", "colour") for i, digit in back])
        for (i, _), colour in zip(back, colours):
            if colour != "none":
                seen[i].add(colour)
        return seen

    def explain(self, evidence: FeatureEvidence) -> str:
        """The concept seen on most evidence images (ties: the first of [`CONCEPTS`]), as [`concept_label`]."""
        images = [image for example in evidence.examples for image in example.images]
        votes: Counter = Counter()
        for concepts in self.concepts_seen(images):
            votes.update(concepts)
        if not votes:  # no image evidence, or nothing seen on it: the words it fires on
            votes.update(word for example in evidence.examples for word in marked_words(example.text)
                         if word in CONCEPTS)
        if not votes:
            return "no digit or colour"
        best = max(votes.values())
        return concept_label(next(c for c in CONCEPTS if votes[c] == best))


class ConceptJudge:
    """
    Predicts that the feature labelled with a concept fires on an example when the example's question names the
    concept or the grounded model sees it in the example's image (see the module docstring).

    Args:
        model, processor: the grounded LLaVA and its processor.
    """

    name = "the grounded tiny LLaVA, asked whether the concept is there"

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor

    def judge(self, label: str, example: EvidenceExample) -> bool:
        """Whether the feature labelled `label` fires on `example` (False for a label that names no concept)."""
        concept = label_concept(label)
        if concept is None:
            return False
        if concept in re.findall(r"[a-z0-9]+", example.text.lower()):
            return True
        if not example.images:
            return False
        if concept in DIGITS:
            row = {"images": [example.images[0]], "prompt": f"is there a {concept} ?", "kind": "exists"}
            return predict_answers(self.model, self.processor, [row])[0] == "yes"
        row = {"images": [example.images[0]], "prompt": f"which digit is {concept} ?", "kind": "which"}
        return predict_answers(self.model, self.processor, [row])[0] != "none"
