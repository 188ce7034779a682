"""Feature labels that are scored: a label per feature, written by an explainer from the feature's top text contexts
and image patches, and its detection score (held-out activating and non-activating examples; does the label predict
which activate?).

```python
reader = LayerReader(model, processor, layer=sae.config.hook_layer)
explainer = TransformersExplainer.from_pretrained("Qwen/Qwen2-VL-7B-Instruct")  # or OpenAIChatExplainer(url, model)
labels = label_features(sae, reader, dataset, [12, 345], explainer, args=LabelArguments(num_rows=1000))
labels[12].label, labels[12].detection["f1"]
write_labels(labels, "labels.json", sae)
```

How a label is written and scored ([`label_features`]):

1. One pass over the first `num_rows` rows keeps each feature's largest activation per row. The rows are split once,
   seeded, into explanation rows and held-out rows.
2. The explainer sees the feature's `top_n` explanation rows ([`FeatureEvidence`]): each row's text with the tokens
   where the feature fires marked `<<like this>>` (as delphi marks them), image tokens as `[image]`, and each image
   with the patches where it fires highlighted, masked or cropped (the patch grids of `saev_hf.patches`). It returns
   the label.
3. The judge (by default the explainer's model) sees held-out rows unmarked: the `num_detection` held-out rows where
   the feature fires most, and as many seeded-random held-out rows where it never fires (largest activation 0), and
   predicts for each whether the feature fires. Detection scoring is EleutherAI delphi's `DetectionScorer`
   ([`detection_metrics`]): accuracy (delphi's balanced accuracy, the mean of the recalls on activating and on
   non-activating examples: the plain accuracy when the two counts are equal), precision, recall and F1, with the
   counts.

delphi itself is not used: its examples are token windows of a text-only model (no image parts), its judge prompts
are chat messages with string content, and importing its scorers imports vLLM (a hard requirement of the package,
with bitsandbytes, faiss and sentence-transformers), which a CPU install, or any machine without CUDA, cannot take.

Explainers and judges are duck-typed ([`Explainer`], [`Judge`]); two ship here: [`TransformersExplainer`] (any
local transformers image-text chat model, greedy `generate`; a text-only chat LM reads the text evidence only) and
[`OpenAIChatExplainer`] (an OpenAI-compatible chat-completions endpoint given by URL, images as base64 data URLs).
Each is also a judge.

`labels.json` (what `saev label` writes, what `saev explore --labels` and the feature browser read):

```json
{"saev": {"d_sae": 256, "d_in": 64, "hook_layer": 0},
 "features": {"12": {"feature": 12, "label": "the digit 3", "explainer": "...",
                     "detection": {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9,
                                   "num_activating": 10, "num_non_activating": 10}}}}
```
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import requests
import torch
from PIL import Image

from ..activations.mllm import MODEL_DTYPES, check_model_dtype, load_model_and_processor
from ..activations.reader import LayerReader, Modality
from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field
from ..data.prompts import PromptFormat, prepare_inputs
from ..runtime.devices import allow_tf32_field, choose_device, sae_matmul_precision, token_chunk_field
from ..runtime.folders import OutputArguments, mark_output_complete
from ..runtime.progress import progress_bar
from .inspection import TopExample
from .rows import RowRevisitor, RowView

logger = logging.getLogger(__name__)

DETECTION_KEYS = ("accuracy", "precision", "recall", "f1", "num_activating", "num_non_activating")
MARK_OPEN, MARK_CLOSE = "<<", ">>"
"""What surrounds a token where the feature fires, in the explainer's evidence (delphi's markers)."""
IMAGE_PLACEHOLDER = "[image]"
"""What stands for a run of image tokens in an example's text (never the model's own image token: an explainer that
is the same model would read it as an image)."""
IMAGE_EVIDENCE = ("highlight", "mask", "crop", "none")
API_KEY_ENV = "OPENAI_API_KEY"
"""The environment variable [`OpenAIChatExplainer`] reads its API key from when none is given."""


@dataclass
class FeatureLabel:
    """
    A feature's label and how well it predicts the feature's activations.

    Args:
        feature (`int`): the feature.
        label (`str`): the explainer's label.
        explainer (`str`, *optional*): what wrote it (a model name, an endpoint).
        detection (`dict`, *optional*): its detection score: `accuracy`, `precision`, `recall`, `f1` of the judge's
            predictions on `num_activating` activating and `num_non_activating` non-activating held-out examples
            (see [`detection_metrics`]); None when it was not scored.
    """

    feature: int
    label: str
    explainer: str | None = None
    detection: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelArguments:
    """Which rows a label is written from and scored on, what the explainer is shown, and how rows are read."""

    num_rows: int | None = field(
        default=512,
        metadata={"help": "Rows read, from the start of the dataset (shuffle it for a sample), then split into "
                  "explanation and held-out rows. None reads them all."})
    explanation_fraction: float = field(
        default=0.5, metadata={"help": "Share of the rows read (a seeded random split) whose top examples write the "
                               "labels; the others are held out for the detection score."})
    top_n: int = field(default=8, metadata={"help": "Top-activating explanation rows shown to the explainer."})
    num_detection: int = field(
        default=10,
        metadata={"help": "Held-out rows where the feature fires most that the judge sees, with as many held-out rows "
                  "where it never fires (seeded random); 0 writes labels without a detection score."})
    mark_fraction: float = field(
        default=0.0,
        metadata={"help": "Mark a token (and keep a patch) where the feature fires at least this fraction of its "
                  "largest activation in the example; 0 marks every token where it fires (delphi: 0.3)."})
    max_patches: int | None = field(
        default=None, metadata={"help": "Most patches kept per image, the highest first (None: every one marked)."})
    image_evidence: str = field(
        default="highlight",
        metadata={"help": "How an image shows where the feature fires: 'highlight' (other patches darkened), 'mask' "
                  "(other patches black, as the patch filter masks them), 'crop' (cut to the patches kept, with "
                  "crop_context patches around), or 'none' (text evidence only).", "choices": IMAGE_EVIDENCE})
    crop_context: int = field(default=1, metadata={"help": "Patches kept around the marked ones by 'crop'."})
    max_context_tokens: int = field(
        default=128,
        metadata={"help": "Most text tokens of an example shown (a window around its strongest text token)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest label a local explainer generates."})
    seed: int = field(default=0, metadata={"help": "Seed of the row split and the non-activating examples."})
    batch_size: int = field(default=8, metadata={"help": "Examples per MLLM forward."})
    token_chunk: int = token_chunk_field()
    allow_tf32: bool = allow_tf32_field()
    preprocessing_workers: int = preprocessing_workers_field()

    def __post_init__(self) -> None:
        for name in ("top_n", "batch_size", "token_chunk", "max_context_tokens", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        for name in ("num_detection", "crop_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more.")
        if self.num_rows is not None and self.num_rows < 2:
            raise ValueError(f"num_rows={self.num_rows} must be at least 2 (explanation and held-out rows), or None to "
                             f"read the whole dataset.")
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max_patches={self.max_patches} must be at least 1, or None to keep every marked patch.")
        if not 0 < self.explanation_fraction < 1:
            raise ValueError(f"explanation_fraction={self.explanation_fraction} must be between 0 and 1 (exclusive): "
                             f"some rows write the labels, the others score them.")
        if not 0 <= self.mark_fraction <= 1:
            raise ValueError(f"mark_fraction={self.mark_fraction} must be in [0, 1].")
        if self.image_evidence not in IMAGE_EVIDENCE:
            raise ValueError(f"image_evidence={self.image_evidence!r} must be one of {IMAGE_EVIDENCE}.")
        check_workers(self.preprocessing_workers)


# ---------------------------------------------------------------------------------------------------------------------
# Evidence: what the explainer and the judge see
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvidenceExample:
    """
    One example as an explainer or a judge sees it.

    Args:
        row (`int`): its dataset row.
        activation (`float`): the feature's largest activation over the row (0: it never fires there).
        text (`str`): the row's text, a run of image tokens as `[image]`; with `marked`, every token where the feature
            fires between `<<` and `>>`.
        images (`list[PIL.Image.Image]`): with `marked`, each image where the feature fires, its patches highlighted,
            masked or cropped (the originals when the model has no patch layout); unmarked, the row's images.
        marked (`bool`): whether text and images show where the feature fires (explanation evidence) or not (what a
            judge sees).
    """

    row: int
    activation: float
    text: str
    images: list[Any] = field(default_factory=list)
    marked: bool = True


@dataclass
class FeatureEvidence:
    """
    What an explainer sees of a feature: its top-activating explanation rows, highest first, marked.

    Args:
        feature (`int`): the feature.
        examples (`list[EvidenceExample]`): its top examples (none when it never fires on the explanation rows).
    """

    feature: int
    examples: list[EvidenceExample]


@dataclass
class DetectionExamples:
    """
    The held-out examples a label is scored on, unmarked.

    Args:
        activating (`list[EvidenceExample]`): held-out rows where the feature fires most.
        non_activating (`list[EvidenceExample]`): as many held-out rows where it never fires, drawn at random.
    """

    activating: list[EvidenceExample]
    non_activating: list[EvidenceExample]


@dataclass
class FeatureExamples:
    """What [`collect_examples`] found for one feature: the explainer's evidence and the judge's held-out examples."""

    feature: int
    evidence: FeatureEvidence
    detection: DetectionExamples


def split_rows(num_rows: int, explanation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`(explanation rows, held-out rows)` of rows `0..num_rows-1`: a seeded random split, each part sorted, both
    non-empty."""
    order = np.random.default_rng([seed, 26]).permutation(num_rows)
    cut = min(max(1, round(num_rows * explanation_fraction)), num_rows - 1)
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


def mark(piece: str) -> str:
    """A token's text between the markers, its surrounding whitespace left outside (`" the"` -> `" <<the>>"`)."""
    core = piece.strip()
    if not core:
        return f"{MARK_OPEN}{piece}{MARK_CLOSE}"
    start = piece.index(core)
    return f"{piece[:start]}{MARK_OPEN}{core}{MARK_CLOSE}{piece[start + len(core):]}"


def token_pieces(tokenizer: Any, tokens: Sequence[str]) -> list[str]:
    """The text each token adds to the decoded string of a run of tokens (spaces as the tokenizer writes them, for
    SentencePiece, byte-level BPE and word-level vocabularies alike)."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.convert_tokens_to_string(list(tokens[: i + 1]))
        if text.startswith(previous):
            pieces.append(text[len(previous):])
        else:  # a tokenizer whose decoding of a prefix is not a prefix: the token on its own
            pieces.append(tokenizer.convert_tokens_to_string([tokens[i]]))
        previous = text
    return pieces


def example_text(tokenizer: Any, view: RowView, activations: torch.Tensor | None, threshold: float | None,
                 max_tokens: int) -> str:
    """
    A row's text as evidence: its tokens decoded, each run of image tokens as [`IMAGE_PLACEHOLDER`], at most
    `max_tokens` text tokens (a window around the strongest text token when `activations` are given and some text
    token fires, else from the start; `...` where it was cut). With a `threshold`, the tokens whose activation is
    positive and at least `threshold` are marked.
    """
    image = (view.modality == Modality.IMAGE).tolist()
    tokens, n = view.tokens, len(view.tokens)
    text_positions = [i for i in range(n) if not image[i]]
    low, high = 0, n
    if len(text_positions) > max_tokens:
        centre = 0
        if activations is not None:
            text_values = activations[text_positions]
            if float(text_values.max()) > 0:
                centre = int(text_values.argmax())
        start = min(max(0, centre - max_tokens // 2), len(text_positions) - max_tokens)
        kept = text_positions[start:start + max_tokens]
        low, high = kept[0], kept[-1] + 1
    out, i = [], low
    while i < high:
        j = i
        while j < high and image[j] == image[i]:
            j += 1
        if image[i]:
            out.append(IMAGE_PLACEHOLDER)
        else:
            for k, piece in zip(range(i, j), token_pieces(tokenizer, tokens[i:j])):
                value = float(activations[k]) if activations is not None else 0.0
                out.append(mark(piece) if threshold is not None and value > 0 and value >= threshold else piece)
        i = j
    placeholder = re.escape(IMAGE_PLACEHOLDER)
    text = re.sub(rf"[ ]*{placeholder}[ ]*", f" {IMAGE_PLACEHOLDER} ", "".join(out)).strip()
    return ("... " if low > 0 else "") + text + (" ..." if high < n else "")


def kept_patches(values: torch.Tensor, threshold: float, max_patches: int | None) -> list[int]:
    """Indices (row by row) of the patches of a `(rows, cols)` grid of activations that are positive and at least
    `threshold`, the highest first, at most `max_patches`."""
    flat = values.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    kept = [i for i in order if float(flat[i]) > 0 and float(flat[i]) >= threshold]
    return kept[:max_patches] if max_patches is not None else kept


def evidence_image(image: Any, grid: Any, kept: list[int], mode: str, crop_context: int = 1) -> Image.Image:
    """
    `image` showing the `kept` patches of its `grid` (a `PatchGrid`): `highlight` darkens the other patches to a
    quarter of their brightness, `mask` blacks them out, `crop` cuts the image to the kept patches' bounding box
    widened by `crop_context` patches on each side.
    """
    image = image.convert("RGB")
    boxes = grid.cell_boxes(*image.size)
    rows, cols = grid.shape
    if mode == "crop":
        cells = [divmod(i, cols) for i in kept]
        top = max(0, min(r for r, _ in cells) - crop_context)
        bottom = min(rows - 1, max(r for r, _ in cells) + crop_context)
        left = max(0, min(c for _, c in cells) - crop_context)
        right = min(cols - 1, max(c for _, c in cells) + crop_context)
        first, last = boxes[top * cols + left], boxes[bottom * cols + right]
        return image.crop((first[0], first[1], last[2], last[3]))
    if mode == "highlight":
        shown = Image.eval(image, lambda v: v // 4)
    elif mode == "mask":
        shown = Image.new("RGB", image.size, (0, 0, 0))
    else:
        raise ValueError(f"mode={mode!r} must be 'highlight', 'mask' or 'crop'.")
    for i in kept:
        box = boxes[i]
        shown.paste(image.crop(box), box[:2])
    return shown


def marked_example(tokenizer: Any, view: RowView, example: TopExample, args: LabelArguments) -> EvidenceExample:
    """An explanation example: the row's text with the tokens where the feature fires marked, and its images showing
    the patches where it fires (`args.image_evidence`)."""
    threshold = args.mark_fraction * example.activation
    text = example_text(tokenizer, view, example.token_activations, threshold, args.max_context_tokens)
    images = []
    if args.image_evidence != "none":
        if example.patch_activations is None:
            images = list(view.images)  # no patch layout for this model: the images as they are
        else:
            for image, grid, values in zip(view.images, view.grids, example.patch_activations):
                kept = kept_patches(values, threshold, args.max_patches)
                if kept:
                    images.append(evidence_image(image, grid, kept, args.image_evidence, args.crop_context))
    return EvidenceExample(example.row, example.activation, text, images, marked=True)


def plain_example(tokenizer: Any, view: RowView, example: TopExample, args: LabelArguments) -> EvidenceExample:
    """A held-out example as a judge sees it: the row's text and images, nothing marked."""
    text = example_text(tokenizer, view, example.token_activations, None, args.max_context_tokens)
    images = list(view.images) if args.image_evidence != "none" else []
    return EvidenceExample(example.row, example.activation, text, images, marked=False)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the rows
# ---------------------------------------------------------------------------------------------------------------------


def check_label_inputs(sae: Any, reader: LayerReader, dataset: Any, features: Sequence[int]) -> None:
    """Refuse, before any row is read: an SAE-V of another model or layer, an empty or unsized dataset, no features
    or unknown ones."""
    reader.check_sae(sae)
    try:
        size = len(dataset)
    except TypeError:
        raise ValueError("Labelling needs a dataset with a length (rows read by index): load the split without "
                         "streaming (no --streaming), or take a sample of the stream into a Dataset first.") from None
    if size < 2:
        raise ValueError(f"The dataset has {size} row(s): labelling needs explanation rows and held-out rows. Check "
                         f"the dataset split and any filtering before it.")
    d_sae = sae.config.d_sae
    if not features:
        raise ValueError("No features to label: pass their ids (features=[...], --features 12 345).")
    bad = [f for f in features if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Unknown feature id(s) {bad}: this SAE-V has d_sae={d_sae} features, ids 0 to {d_sae - 1}.")


@torch.no_grad()
def feature_maxima(sae: Any, reader: LayerReader, dataset: Any, rows: list[int], features: list[int],
                   args: LabelArguments) -> torch.Tensor:
    """The largest activation of each of `features` over every real position of each of `rows`: `(rows, features)`."""
    device = sae.W_enc.device
    maxima = torch.zeros(len(rows), len(features))
    where = {row: i for i, row in enumerate(rows)}
    columns = torch.tensor(features, device=device)
    batches = prepared_batches(reader, dataset, args.batch_size, rows, workers=args.preprocessing_workers)
    for prepared in progress_bar(batches, desc="Labels: reading rows", total=math.ceil(len(rows) / args.batch_size),
                                 unit="batch"):
        acts = reader.read_inputs(prepared.check())
        real = acts.token_mask
        hidden = acts.hidden_states[real]
        example = torch.arange(len(acts), device=real.device)[:, None].expand_as(real)[real].to(device)
        batch_max = torch.zeros(len(acts), len(features), device=device)
        for start in range(0, hidden.shape[0], args.token_chunk):
            with sae_matmul_precision(device, args.allow_tf32):
                z = sae.encode(hidden[start:start + args.token_chunk]).index_select(1, columns).float()
            part = example[start:start + args.token_chunk]
            batch_max.scatter_reduce_(0, part[:, None].expand_as(z), z, reduce="amax")
        for i, row in enumerate(prepared.rows):
            maxima[where[row]] = batch_max[i].cpu()
    return maxima


@torch.no_grad()
def collect_examples(sae: Any, reader: LayerReader, dataset: Any, features: Sequence[int],
                     args: LabelArguments | None = None) -> dict[int, FeatureExamples]:
    """
    The evidence and the held-out examples of each feature (see the module docstring): one pass over the rows for
    each feature's largest activation per row, then one over the rows shown (by [`RowRevisitor`]: tokens, images,
    patch grids) for each feature's activation at every token and patch.

    Held-out rows never overlap the explanation rows ([`split_rows`]); the activating held-out rows are those where
    the feature fires most, the non-activating ones a seeded draw of the held-out rows where it never fires, as many
    as there are activating ones (fewer when fewer exist).
    """
    args = args or LabelArguments()
    features = list(dict.fromkeys(features))
    check_label_inputs(sae, reader, dataset, features)
    num_rows = len(dataset) if args.num_rows is None else min(args.num_rows, len(dataset))
    if num_rows < 2:
        raise ValueError(f"Only {num_rows} row(s) to read: labelling needs explanation rows and held-out rows.")
    explanation_rows, held_out_rows = split_rows(num_rows, args.explanation_fraction, args.seed)
    maxima = feature_maxima(sae, reader, dataset, list(range(num_rows)), features, args)

    def top(rows: list[int], j: int, count: int) -> list[tuple[int, float]]:
        """`(row, activation)` of the `count` rows where feature column `j` fires most, highest first."""
        ranked = sorted(((row, float(maxima[row, j])) for row in rows), key=lambda item: (-item[1], item[0]))
        return [(row, value) for row, value in ranked[:count] if value > 0]

    chosen: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for j, f in enumerate(features):
        activating = top(held_out_rows, j, args.num_detection)
        silent = [row for row in held_out_rows if float(maxima[row, j]) == 0]
        rng = np.random.default_rng([args.seed, f])
        drawn = sorted(rng.choice(silent, size=min(len(activating), len(silent)), replace=False).tolist()) \
            if silent and activating else []
        chosen[f] = {"evidence": top(explanation_rows, j, args.top_n), "activating": activating,
                     "non_activating": [(row, 0.0) for row in drawn]}

    wanted: dict[int, list[int]] = {}
    for f, parts in chosen.items():
        for part in parts.values():
            for row, _ in part:
                wanted.setdefault(row, []).append(f)
    revisitor = RowRevisitor(reader, dataset, args.batch_size, args.preprocessing_workers)
    tokenizer = getattr(reader.processor, "tokenizer", reader.processor)
    shown: dict[tuple[int, int], EvidenceExample] = {}
    explaining = set(explanation_rows)
    for row, hidden, modality, view in revisitor.revisit(sorted(wanted), "Labels: reading the rows shown"):
        feats = list(dict.fromkeys(wanted[row]))
        with sae_matmul_precision(sae.W_enc.device, args.allow_tf32):
            z = torch.cat([sae.encode(hidden[s:s + args.token_chunk])[:, feats].float().cpu()
                           for s in range(0, hidden.shape[0], args.token_chunk)])
        image_positions = view.modality == Modality.IMAGE
        for column, f in enumerate(feats):
            token_acts = z[:, column]
            patches = None if view.grids is None else [grid.values(token_acts[image_positions]) for grid in view.grids]
            example = TopExample(row=row, activation=float(token_acts.max()) if len(token_acts) else 0.0,
                                 token_activations=token_acts, patch_activations=patches)
            build = marked_example if row in explaining else plain_example
            shown[(f, row)] = build(tokenizer, view, example, args)

    collected = {}
    for f, parts in chosen.items():
        collected[f] = FeatureExamples(
            feature=f,
            evidence=FeatureEvidence(f, [shown[(f, row)] for row, _ in parts["evidence"]]),
            detection=DetectionExamples([shown[(f, row)] for row, _ in parts["activating"]],
                                        [shown[(f, row)] for row, _ in parts["non_activating"]]))
    return collected


# ---------------------------------------------------------------------------------------------------------------------
# Explainers and judges
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Explainer(Protocol):
    """Writes a feature's label from its evidence. `name` says what it is (recorded with the labels)."""

    name: str

    def explain(self, evidence: FeatureEvidence) -> str:
        """The label of the feature that `evidence` shows."""


@runtime_checkable
class Judge(Protocol):
    """Predicts, from a label, whether its feature fires on an (unmarked) example."""

    def judge(self, label: str, example: EvidenceExample) -> bool:
        """Whether the feature labelled `label` fires on `example`."""


EXPLAIN_INSTRUCTIONS = (
    "You are a meticulous interpretability researcher. Below are the examples on which one feature of a "
    "vision-language model fires most. In the text, the tokens where it fires are marked <<like this>>, and "
    "[image] stands for an image; each image after an example shows where on that example's images the feature "
    "fires (the other parts darkened, blacked out or cut away). Say in a few words what the feature detects. "
    "Answer with the label alone.")
JUDGE_INSTRUCTIONS = (
    "A feature of a vision-language model is described by this label: \"{label}\". Here is an example (its text, "
    "where [image] stands for an image, then its images). Does the feature fire on this example? Answer yes or no.")


def explanation_parts(evidence: FeatureEvidence) -> list[dict[str, Any]]:
    """The explainer's prompt as content parts, in order: `{"type": "text", "text"}` and `{"type": "image", "image"}`
    (a PIL image)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": EXPLAIN_INSTRUCTIONS + "\n"}]
    for i, example in enumerate(evidence.examples, 1):
        parts.append({"type": "text", "text": f"Example {i}: {example.text}\n"})
        parts.extend({"type": "image", "image": image} for image in example.images)
    parts.append({"type": "text", "text": "Label:"})
    return parts


def judge_parts(label: str, example: EvidenceExample) -> list[dict[str, Any]]:
    """The judge's prompt as content parts (see [`explanation_parts`])."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": JUDGE_INSTRUCTIONS.format(label=label) + "\n"},
                                   {"type": "text", "text": f"Example: {example.text}\n"}]
    parts.extend({"type": "image", "image": image} for image in example.images)
    parts.append({"type": "text", "text": "Answer:"})
    return parts


def clean_label(text: str) -> str:
    """A generated label as kept: its first non-empty line, without a leading `Label:` or quotes, at most 200
    characters; an empty answer becomes a label saying so (labels.json holds no empty label)."""
    line = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    line = re.sub(r"^(label|answer)\s*:\s*", "", line, flags=re.IGNORECASE).strip().strip("\"'`").strip()
    return line[:200] if line else "(no label: the explainer answered nothing)"


def parse_yes(text: str) -> bool:
    """Whether a judge's answer is yes: its first word is `yes` (or `true` / `1`); anything else is no."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    return bool(words) and words[0] in ("yes", "true", "1")


class TransformersExplainer:
    """
    An explainer and judge from any local transformers chat model: an image-text-to-text model with its processor
    (images as the chat template places them), or a text-only causal LM with its tokenizer (the text evidence only).
    Greedy `generate`; the prompt goes through the same chat template and processor call the SAE-V's reader uses.

    Args:
        model: the model (in eval mode).
        processor: its processor (image-text models) or tokenizer (text-only models).
        max_new_tokens (`int`): longest label generated.
        name (`str`, *optional*): recorded with the labels (default: the model's name or path).
    """

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 48, name: str | None = None) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.reads_images = hasattr(processor, "image_processor")

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "auto", device: str = "auto",
                        max_new_tokens: int = 48) -> TransformersExplainer:
        """Load a chat model from the Hub or a folder (as `saev` loads the MLLM) on `device`."""
        model, processor = load_model_and_processor(name_or_path, dtype=dtype, device=choose_device(device))
        return cls(model, processor, max_new_tokens, name=name_or_path)

    def inputs(self, parts: list[dict[str, Any]]) -> Any:
        """The model inputs of a prompt given as content parts (images dropped for a text-only model)."""
        images = [part["image"] for part in parts if part["type"] == "image"] if self.reads_images else []
        content = [({"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]})
                   for part in parts if part["type"] == "text" or images]
        row = {"prompt": [{"role": "user", "content": content}], "images": images}
        prompt_format = PromptFormat(image_column="images" if images else None)
        return prepare_inputs(self.processor, [row], prompt_format)

    @torch.no_grad()
    def generate(self, parts: list[dict[str, Any]], max_new_tokens: int) -> str:
        """The model's greedy answer to a prompt given as content parts."""
        inputs = self.inputs(parts).to(self.model.device)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def explain(self, evidence: FeatureEvidence) -> str:
        """The label the model writes for `evidence`."""
        return clean_label(self.generate(explanation_parts(evidence), self.max_new_tokens))

    def judge(self, label: str, example: EvidenceExample) -> bool:
        """Whether the model answers yes: the feature labelled `label` fires on `example`."""
        return parse_yes(self.generate(judge_parts(label, example), 3))


def image_data_url(image: Any) -> str:
    """A PIL image as a `data:image/png;base64,...` URL (how chat-completions APIs take images)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIChatExplainer:
    """
    An explainer and judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM's and SGLang's
    servers, llama.cpp, LM Studio, Ollama, ...): one user message whose content parts are the prompt's text and its
    images as base64 PNG data URLs, temperature 0.

    Args:
        url (`str`): the API base (`http://localhost:8000/v1`) or the full `.../chat/completions` URL.
        model (`str`): the model name the server knows.
        api_key (`str`, *optional*): sent as a bearer token; default: the environment variable `OPENAI_API_KEY`
            (none sent when that is unset too).
        timeout (`float`): seconds to wait for an answer.
        max_tokens (`int`): longest label generated.
        send_images (`bool`): send the images (False for a text-only model: the text evidence only).
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 48, send_images: bool = True) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"The explainer URL {url!r} must be an http(s) URL, e.g. http://localhost:8000/v1 (an "
                             f"OpenAI-compatible server's API base).")
        if not model:
            raise ValueError(f"An OpenAI-compatible endpoint ({url}) needs the name of the model it serves: "
                             f"model=... (--explainer_model).")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be a positive number of seconds.")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.timeout, self.max_tokens, self.send_images = model, timeout, max_tokens, send_images
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.name = f"{model} at {self.endpoint}"

    def request_body(self, parts: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        """The chat-completions request for a prompt given as content parts."""
        content = []
        for part in parts:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            elif self.send_images:
                content.append({"type": "image_url", "image_url": {"url": image_data_url(part["image"])}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": max_tokens}

    def complete(self, parts: list[dict[str, Any]], max_tokens: int) -> str:
        """The endpoint's answer to a prompt given as content parts.

        Raises:
            ConnectionError: the endpoint cannot be reached, does not answer in time, or answers with an HTTP error
                (naming the endpoint and the status).
            ValueError: its answer is not a chat completion.
        """
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = requests.post(self.endpoint, json=self.request_body(parts, max_tokens), headers=headers,
                                     timeout=self.timeout)
        except requests.Timeout:
            raise ConnectionError(f"The explainer endpoint {self.endpoint} did not answer within {self.timeout:g} s. "
                                  f"Allow it longer (timeout=..., --explainer_timeout) or check the server.") from None
        except requests.RequestException as error:
            raise ConnectionError(f"The explainer endpoint {self.endpoint} cannot be reached ({error}). Check the URL "
                                  f"(--explainer_url) and that the server is running.") from None
        if response.status_code >= 400:
            hint = (f"check the API key (api_key=..., --explainer_api_key, or ${API_KEY_ENV})"
                    if response.status_code in (401, 403) else
                    f"check the model name {self.model!r} (--explainer_model)" if response.status_code == 404 else
                    "check the server's log")
            raise ConnectionError(f"The explainer endpoint {self.endpoint} answered HTTP {response.status_code}: "
                                  f"{response.text[:300]!r}; {hint}.")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"The explainer endpoint {self.endpoint} answered {response.text[:300]!r}, not a chat "
                             f"completion (choices[0].message.content): is it an OpenAI-compatible "
                             f"/v1/chat/completions endpoint?") from None
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""

    def explain(self, evidence: FeatureEvidence) -> str:
        """The label the endpoint's model writes for `evidence`."""
        return clean_label(self.complete(explanation_parts(evidence), self.max_tokens))

    def judge(self, label: str, example: EvidenceExample) -> bool:
        """Whether the endpoint's model answers yes: the feature labelled `label` fires on `example`."""
        return parse_yes(self.complete(judge_parts(label, example), 3))


# ---------------------------------------------------------------------------------------------------------------------
# Detection scoring and labelling
# ---------------------------------------------------------------------------------------------------------------------


def detection_metrics(predictions: Sequence[bool], activating: Sequence[bool]) -> dict[str, Any]:
    """
    Detection scores as delphi computes them from a judge's `predictions` (True: "the feature fires") on examples
    that are `activating` or not: `precision` = TP / (TP + FP) (0 with no positive prediction), `recall` = TP / P,
    `f1` their harmonic mean (0 when both are 0), `accuracy` = (TP / P + TN / N) / 2 (delphi's balanced accuracy,
    the plain accuracy when P = N; over the one class present when the other is empty), and the counts P
    (`num_activating`) and N (`num_non_activating`).
    """
    if len(predictions) != len(activating):
        raise ValueError(f"{len(predictions)} predictions for {len(activating)} examples: give one per example.")
    pairs = [(bool(p), bool(a)) for p, a in zip(predictions, activating)]
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    tn = sum(not p and not a for p, a in pairs)
    positives, negatives = sum(a for _, a in pairs), sum(not a for _, a in pairs)
    recall = tp / positives if positives else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    rates = ([recall] if positives else []) + ([tn / negatives] if negatives else [])
    return {"accuracy": sum(rates) / len(rates) if rates else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "num_activating": positives, "num_non_activating": negatives}


def score_label(judge: Judge, label: str, examples: DetectionExamples, seed: int = 0) -> dict[str, Any] | None:
    """The detection score of `label` ([`detection_metrics`]): `judge` predicts, for each held-out example in a seeded
    random order, whether the feature fires. None when there is no activating example to score on."""
    if not examples.activating:
        return None
    judged = [(e, True) for e in examples.activating] + [(e, False) for e in examples.non_activating]
    order = np.random.default_rng([seed, 27]).permutation(len(judged))
    predictions, truths = [], []
    for i in order:
        example, activating = judged[int(i)]
        predictions.append(bool(judge.judge(label, example)))
        truths.append(activating)
    return detection_metrics(predictions, truths)


def label_features(sae: Any, reader: LayerReader, dataset: Any, features: Sequence[int], explainer: Explainer,
                   judge: Judge | None = None, args: LabelArguments | None = None) -> dict[int, FeatureLabel]:
    """
    Label `features` of `sae` from their top explanation rows of `dataset` and score each label by detection on
    held-out rows (see the module docstring).

    Args:
        sae ([`SAEV`]): the SAE-V, made for `reader`'s model and layer.
        reader ([`LayerReader`]): reads the MLLM's layer L (its `prompt_format` names the columns).
        dataset: a `datasets.Dataset` or a list of row dicts.
        features: the feature ids to label.
        explainer ([`Explainer`]): writes the labels ([`TransformersExplainer`], [`OpenAIChatExplainer`], or any object
            with `explain(evidence) -> str`).
        judge ([`Judge`], *optional*): predicts which held-out examples activate; default: the explainer.
        args ([`LabelArguments`]): rows, split, evidence and detection settings.

    Returns:
        `dict[int, FeatureLabel]`: by feature, in the order given; a feature that never fires on the explanation
        rows gets no label (a warning names it), one that never fires on the held-out rows no detection score.

    Raises:
        ValueError: unknown feature ids, a dataset too small or without a length, an SAE-V of another model or layer.
        TypeError: an explainer without `explain`, or a judge without `judge` (when detection is asked for).
    """
    args = args or LabelArguments()
    judge = explainer if judge is None else judge
    if not callable(getattr(explainer, "explain", None)):
        raise TypeError(f"The explainer {type(explainer).__name__} has no explain(evidence) -> str method: pass a "
                        f"TransformersExplainer, an OpenAIChatExplainer, or an object with one.")
    if args.num_detection and not callable(getattr(judge, "judge", None)):
        raise TypeError(f"The judge {type(judge).__name__} has no judge(label, example) -> bool method: pass a judge "
                        f"with one, or num_detection=0 to write labels without a detection score.")
    collected = collect_examples(sae, reader, dataset, features, args)
    name = getattr(explainer, "name", None) or type(explainer).__name__
    labels, silent = {}, []
    for f, examples in progress_bar(collected.items(), desc="Labels: explaining and judging", total=len(collected),
                                    unit="feature"):
        if not examples.evidence.examples:
            silent.append(f)
            continue
        label = clean_label(explainer.explain(examples.evidence))
        detection = score_label(judge, label, examples.detection, args.seed) if args.num_detection else None
        labels[f] = FeatureLabel(f, label, name, detection)
    if silent:
        logger.warning("Features %s never fire on the explanation rows: no label. Read more rows (num_rows) or pick "
                       "features that fire.", silent)
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Files and the command
# ---------------------------------------------------------------------------------------------------------------------


def write_labels(labels: dict[int, FeatureLabel], path: str | Path, sae: Any = None) -> Path:
    """Write `labels` as `labels.json` (see the module docstring); `sae` records which SAE-V they are of."""
    record: dict[str, Any] = {"features": {str(f): asdict(label) for f, label in sorted(labels.items())}}
    if sae is not None:
        record["saev"] = {"d_sae": sae.config.d_sae, "d_in": sae.config.d_in, "hook_layer": sae.config.hook_layer}
    path = Path(path)
    path.write_text(json.dumps(record, indent=2))
    return path


def read_labels(path: str | Path, sae: Any = None) -> dict[int, FeatureLabel]:
    """The labels in a `labels.json` (see the module docstring), checked; with `sae`, refused unless they were made
    for an SAE-V of its shape and layer.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not labels.json's layout (naming the feature and the field), or its SAE-V is not
            `sae`'s.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file. Write one with `saev label ... --output_dir DIR` "
                                f"(DIR/labels.json).")
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not JSON ({error}): pass the labels.json `saev label` wrote.") from None
    if not isinstance(record, dict) or not isinstance(record.get("features"), dict):
        raise ValueError(f"{path} has no 'features' mapping: pass the labels.json `saev label` wrote.")
    labels = {}
    for key, entry in record["features"].items():
        where = f"{path}, feature {key!r}"
        if not key.isdigit() or not isinstance(entry, dict) or entry.get("feature") != int(key):
            raise ValueError(f"{where}: an entry must be keyed by its feature id and repeat it as 'feature'.")
        if not isinstance(entry.get("label"), str) or not entry["label"].strip():
            raise ValueError(f"{where}: 'label' must be a non-empty string.")
        detection = entry.get("detection")
        if detection is not None:
            missing = [k for k in DETECTION_KEYS if k not in detection]
            bad = [k for k in DETECTION_KEYS if k in detection and not (isinstance(detection[k], (int, float))
                                                                         and math.isfinite(detection[k]))]
            if missing or bad:
                raise ValueError(f"{where}: its detection score lacks {missing} or has non-numbers in {bad}.")
        labels[int(key)] = FeatureLabel(int(key), entry["label"], entry.get("explainer"), detection)
    if sae is not None:
        check_same_saev(sae, record.get("saev"), f"The labels in {path}")
    return labels


def format_labels_table(labels: dict[int, FeatureLabel], features: Sequence[int] | None = None) -> str:
    """The labels as a markdown table (feature, label, detection accuracy / precision / recall / F1 and counts);
    `features` asked for but not labelled are listed after it."""
    lines = ["| feature | label | accuracy | precision | recall | F1 | activating | non-activating |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for f, label in labels.items():
        d = label.detection
        scores = (f"{d['accuracy']:.2f} | {d['precision']:.2f} | {d['recall']:.2f} | **{d['f1']:.2f}** | "
                  f"{d['num_activating']} | {d['num_non_activating']}") if d else "- | - | - | - | 0 | 0"
        lines.append(f"| {f} | {label.label.replace('|', '/')} | {scores} |")
    missing = [f for f in features or [] if f not in labels]
    if missing:
        lines += ["", f"Not labelled (they never fire on the explanation rows): {missing}."]
    return "\n".join(lines) + "\n"


@dataclass
class ExplainerArguments:
    """`saev label`: which features to label, and which model writes and judges the labels (a local transformers
    model, or an OpenAI-compatible endpoint)."""

    features: list[int] | None = field(default=None, metadata={"help": "Feature ids to label (required)."})
    explainer_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub repo id or folder of a local chat model that writes the labels (an image-text model "
                  "sees the image evidence, a text-only LM the text alone). The same name as --model_name_or_path "
                  "reuses the loaded MLLM."})
    explainer_url: str | None = field(
        default=None, metadata={"help": "Instead: an OpenAI-compatible chat-completions endpoint "
                                "(http://host:port/v1), with --explainer_model."})
    explainer_model: str | None = field(default=None, metadata={"help": "The model the endpoint serves."})
    explainer_api_key: str | None = field(
        default=None, metadata={"help": f"API key for the endpoint (default: ${API_KEY_ENV}, if set)."})
    explainer_timeout: float = field(default=60.0, metadata={"help": "Seconds to wait for the endpoint's answer."})
    explainer_send_images: bool = field(
        default=True, metadata={"help": "Send the image evidence to the endpoint (--no_explainer_send_images for a "
                                "text-only model)."})
    explainer_dtype: str = field(
        default="auto", metadata={"help": f"dtype of a local explainer or judge, one of {MODEL_DTYPES}.",
                                  "choices": MODEL_DTYPES})
    judge_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A local chat model that judges the held-out examples (default: the "
                                "explainer)."})
    judge_url: str | None = field(
        default=None, metadata={"help": "Instead: an OpenAI-compatible endpoint that judges, with --judge_model "
                                "(same key and timeout as the explainer's)."})
    judge_model: str | None = field(default=None, metadata={"help": "The model the judge endpoint serves."})

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("features is required: the feature ids to label (--features 12 345).")
        check_model_dtype(self.explainer_dtype, "explainer_dtype")
        for role, path, url, model in (("explainer", self.explainer_model_name_or_path, self.explainer_url,
                                        self.explainer_model),
                                       ("judge", self.judge_model_name_or_path, self.judge_url, self.judge_model)):
            if path and url:
                raise ValueError(f"Give either --{role}_model_name_or_path ({path!r}, a local model) or --{role}_url "
                                 f"({url!r}, an endpoint), not both.")
            if url and not model:
                raise ValueError(f"--{role}_url {url} needs --{role}_model: the name of the model the endpoint "
                                 f"serves.")
            if model and not url:
                raise ValueError(f"--{role}_model {model!r} names a model on an endpoint: give the endpoint with "
                                 f"--{role}_url (or a local model with --{role}_model_name_or_path).")
        if not (self.explainer_model_name_or_path or self.explainer_url):
            raise ValueError("No explainer: give a local chat model (--explainer_model_name_or_path NAME_OR_FOLDER) "
                             "or an OpenAI-compatible endpoint (--explainer_url URL --explainer_model NAME).")

    def load(self, model_args: ModelArguments, loaded: tuple[Any, Any], max_new_tokens: int = 48):
        """`(explainer, judge)`: local models load on `model_args.device` (the MLLM in `loaded` when it is the same
        model), endpoints are only named."""
        cache: dict[str, TransformersExplainer] = {}

        def build(path: str | None, url: str | None, model: str | None):
            if url:
                return OpenAIChatExplainer(url, model, self.explainer_api_key, self.explainer_timeout, max_new_tokens,
                                           self.explainer_send_images)
            if path not in cache:
                if path == model_args.model_name_or_path:
                    cache[path] = TransformersExplainer(*loaded, max_new_tokens, name=path)
                else:
                    cache[path] = TransformersExplainer.from_pretrained(path, self.explainer_dtype, model_args.device,
                                                                        max_new_tokens)
            return cache[path]

        explainer = build(self.explainer_model_name_or_path, self.explainer_url, self.explainer_model)
        if not (self.judge_model_name_or_path or self.judge_url):
            return explainer, explainer
        return explainer, build(self.judge_model_name_or_path, self.judge_url, self.judge_model)


LABELS_FILE = "labels.json"
LABELS_TABLE = "labels.md"


def run_labels(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
               prompt_format: PromptFormat, explainer_args: ExplainerArguments, args: LabelArguments,
               output: OutputArguments) -> tuple[dict[int, FeatureLabel], Path]:
    """
    `saev label`: load what the arguments name, label the features ([`label_features`]) and write `labels.json`
    ([`write_labels`], the SAE-V recorded) and `labels.md` (the table) to `output.output_dir`. Returns
    `(labels, labels.json path)`.
    """
    data_args.check_source(model_args, "saev label")
    folder = output.prepare("saev label", cpu=model_args.device == "cpu")
    sae, model, processor, dataset = load_sources(sae_args, model_args, data_args, prompt_format.image_column)
    reader = LayerReader(model, processor, layer=sae.config.hook_layer, prompt_format=prompt_format)
    check_label_inputs(sae, reader, dataset, explainer_args.features)  # before an explainer is loaded
    explainer, judge = explainer_args.load(model_args, (model, processor), args.max_new_tokens)
    labels = label_features(sae, reader, dataset, explainer_args.features, explainer, judge, args)
    if not labels:
        raise ValueError(f"None of the features {explainer_args.features} fires on the explanation rows, so none got "
                         f"a label. Read more rows (--num_rows) or pick features that fire (`saev inspect` lists "
                         f"them).")
    path = write_labels(labels, folder / LABELS_FILE, sae)
    judge_name = getattr(judge, "name", type(judge).__name__)
    header = (f"# Feature labels\n\nSAE-V `{sae_args.sae_name_or_path}` on `{model_args.model_name_or_path}`, "
              f"dataset `{data_args.dataset_name}`: {args.num_rows or 'all'} rows read, "
              f"{args.explanation_fraction:.0%} explain (top {args.top_n} shown), the rest held out "
              f"({args.num_detection} activating + as many non-activating judged). Explainer: {explainer.name}; "
              f"judge: {judge_name}.\n\n")
    (folder / LABELS_TABLE).write_text(header + format_labels_table(labels, explainer_args.features))
    data_args.write_fetch_report(str(folder))
    mark_output_complete(folder)
    return labels, path


def check_same_saev(sae: Any, recorded: dict[str, Any] | None, what: str) -> None:
    """Refuse labels or an inspection made for another SAE-V (another width, input width or layer)."""
    if not recorded:
        return
    mine = {"d_sae": sae.config.d_sae, "d_in": sae.config.d_in, "hook_layer": sae.config.hook_layer}
    theirs = {key: recorded.get(key) for key in mine}
    if any(theirs[key] is not None and theirs[key] != mine[key] for key in mine):
        raise ValueError(f"{what} were made for an SAE-V with {theirs}, this one has {mine}: pass the ones made for "
                         f"this SAE-V.")
