"""A tiny LLaVA that grounds its words in the image, trained with LLaVA's own staged recipe on the scene task.

Why: SAE-V scores an example by the features that fire on both its text and its image. That needs an MLLM whose
image tokens speak the language model's language: a concept named in the question ("red", "3") and the image patch
that shows it must share residual-stream directions. A tiny LLaVA trained end to end on answers alone does not get
there (its text and image positions stayed linearly separable at every layer, measured), so the recipe
follows LLaVA and adds one dense objective:

1. **Language model first** ([`GroundedLlavaArguments.language_steps`]): the language model alone learns the task in
   words, on scenes described in text (``"scene : red 3 top left , blue 7 centre . which digit is red ?"``), with the
   next-token loss on every token (the description teaches it to copy from context, which the answers need).
2. **Feature alignment** (`alignment_steps`): the language model is frozen; the vision tower and the projector learn
   to make each image token *carry the words of what its patch shows*: the projector's output at each cell is pulled
   (mean squared error, relative to the target's norm) to the mean of the language model's input embeddings of the
   cell's words, ``("red", "3")`` or ``("empty",)``. Every cell is exactly one 8x8 patch, so the target is exact.
3. **Instruction tuning** (`instruction_steps`): the projector and the language model learn to answer questions about
   scene images (answer tokens only), with the dense objective kept as an auxiliary loss (`dense_weight`) so that the
   image tokens stay in the words' space while the language model moves.

4. **Imperfect instruction tuning** (`imperfect_steps`): the same parts go on learning from a second instruction
   set, as imperfect as real ones: half of its questions about absent objects (`imperfect_hallucination_fraction`)
   are answered with a confident hallucination borrowed from an object in the image (`scenes.borrowed_hallucination`,
   the commonest defect of real instruction data), the rest faithfully. Measured on held-out scenes
   (`benchmarks/results/imperfect_instruction.md`): after stage 3 the model already tells a present object from an
   absent one (the AUROC of its own "none" margin is 0.93-1.0 per question kind) and hallucinates on 16% of questions
   about absent objects; stage 4 keeps that knowledge (AUROC 0.97-1.0) but teaches it to answer absent objects with a
   borrowed answer about a third of the time. That is the gap preference data closes: what the model sees is right,
   the answer it prefers is not, so DPO on faithful rows has something to fix (`benchmarks/scene_dpo.py`).
   `imperfect_steps=0` gives the model after stage 3 (the embedded model before this stage existed).

Questions about absent objects are rare in stage 3 (`instruction_absent_fraction`); stage 4 asks them as often as the
held-out questions do (25%). Everything is seeded: the same arguments give
the same weights on one CPU thread. The trained model is an ordinary `LlavaForConditionalGeneration` with a
`LlavaProcessor`; nothing of this module is needed to load or use it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..testing.tiny_pretraining import response_inputs, response_log_likelihoods
from ..testing.tiny_processing import build_tiny_tokenizer
from .scenes import ANSWERS, CELL, COLOURS, DIGITS, EMPTY, GRID, SCENE_SIZE, VOCABULARY, DigitScans, question_rows

FAITHFUL_ABSENT_ANSWERS = ("none", "no")


@dataclass
class GroundedLlavaArguments:
    """Sizes and the four-stage recipe of the grounded tiny LLaVA (defaults: the shipped demo model)."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the language model."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers of the language model."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads of the language model."})
    vision_hidden_size: int = field(default=64, metadata={"help": "Width of the CLIP vision tower."})
    vision_layers: int = field(default=2, metadata={"help": "Layers of the CLIP vision tower."})
    embedding_std: float = field(
        default=3.0, metadata={"help": "Standard deviation of the initial token embeddings. Large enough that a "
                               "token's identity stays a large part of the residual stream after the first layers "
                               "(at Llama's 0.02 the first layer's output drowns it)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per step in every stage."})
    language_steps: int = field(default=3000, metadata={"help": "Stage 1: language model on described scenes."})
    language_learning_rate: float = field(default=1e-3, metadata={"help": "Stage 1 peak learning rate."})
    language_absent_fraction: float = field(
        default=0.4, metadata={"help": "Stage 1: share of questions about an object the scene does not hold."})
    alignment_steps: int = field(default=1000, metadata={"help": "Stage 2: vision tower + projector, dense loss."})
    alignment_learning_rate: float = field(default=3e-3, metadata={"help": "Stage 2 peak learning rate."})
    instruction_steps: int = field(default=2000, metadata={"help": "Stage 3: projector + language model on images."})
    instruction_learning_rate: float = field(default=1e-3, metadata={"help": "Stage 3 peak learning rate."})
    instruction_absent_fraction: float = field(
        default=0.1, metadata={"help": "Stage 3: share of questions about absent objects (few: the model keeps "
                                "some hallucinations for DPO to fix)."})
    instruction_hallucination_fraction: float = field(
        default=0.0, metadata={"help": "Stage 3: share of the questions about absent objects answered with a "
                               "confident hallucination borrowed from an object in the image (scenes."
                               "borrowed_hallucination), as imperfect instruction data does."})
    imperfect_steps: int = field(
        default=1800, metadata={"help": "Stage 4: projector + language model on an imperfect instruction set (0: "
                                "stop after stage 3)."})
    imperfect_learning_rate: float = field(default=3e-4, metadata={"help": "Stage 4 peak learning rate."})
    imperfect_absent_fraction: float = field(
        default=0.25, metadata={"help": "Stage 4: share of questions about absent objects."})
    imperfect_hallucination_fraction: float = field(
        default=0.5, metadata={"help": "Stage 4: share of the questions about absent objects answered with a "
                               "confident hallucination borrowed from an object in the image."})
    dense_weight: float = field(default=1.0, metadata={"help": "Weight of the dense image-token loss in stages 3-4."})
    target: str = field(
        default="sum", metadata={"help": "Dense target of an image token: the 'sum' of its cell's word embeddings "
                                 "(each word at the strength it has in text, so a concept reads alike in both "
                                 "modalities) or their 'mean'."})
    align_layer: int | None = field(
        default=None, metadata={"help": "Also pull each occupied cell's image token, in the residual stream after "
                                "this decoder layer, to the mean state there of its words in the scene's text "
                                "description (stages 2 and 3). None: the dense objective acts on the input "
                                "embeddings only."})
    layer_weight: float = field(default=1.0, metadata={"help": "Weight of the residual-stream alignment loss."})
    held_out_fraction: float = field(default=0.3, metadata={"help": "Digit scans kept out of training."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the scan split and every batch."})

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "vision_hidden_size", "vision_layers", "batch_size",
                     "embedding_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if self.target not in ("sum", "mean"):
            raise ValueError(f"target={self.target!r} must be 'sum' or 'mean'.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}.")
        for name in ("language_steps", "alignment_steps", "instruction_steps", "imperfect_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("language_absent_fraction", "instruction_absent_fraction", "instruction_hallucination_fraction",
                     "imperfect_absent_fraction", "imperfect_hallucination_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")


def build_grounded_llava(args: GroundedLlavaArguments | None = None):
    """A randomly initialised tiny LLaVA for the scene task (seed `args.seed`) and its processor: a word-level
    tokenizer over the task's [`VOCABULARY`], 24x24 images, one 8x8 patch per scene cell (9 image tokens)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    args = args or GroundedLlavaArguments()
    tokenizer = build_tiny_tokenizer("llava", words=VOCABULARY)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SCENE_SIZE},
                                            crop_size={"height": SCENE_SIZE, "width": SCENE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=CELL,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden_size, intermediate_size=4 * args.vision_hidden_size,
                              num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=SCENE_SIZE,
                              patch_size=CELL, projection_dim=args.vision_hidden_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                       intermediate_size=4 * args.hidden_size, num_hidden_layers=args.num_layers,
                       num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         image_seq_length=GRID * GRID, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlavaForConditionalGeneration(config)
        model.get_input_embeddings().weight.data.normal_(0.0, args.embedding_std)
    return model.eval(), processor


def _part(model, name: str) -> list[torch.nn.Parameter]:
    """Parameters of the language model (with lm_head), the vision tower or the projector."""
    keys = {"language": ("language_model", "lm_head"), "vision": ("vision_tower",),
            "projector": ("multi_modal_projector",)}[name]
    return [p for n, p in model.named_parameters() if any(k in n for k in keys)]


def cell_word_ids(processor, scenes) -> torch.Tensor:
    """`(scenes, 9, 2)` token ids of each cell's words, ``(colour, digit)``, or ``(empty, empty)``."""
    tokenizer = processor.tokenizer
    ids = [[tokenizer.convert_tokens_to_ids(list(words) * (2 // len(words))) for words in scene.cell_words()]
           for scene in scenes]
    return torch.tensor(ids)


def image_token_targets(model, processor, scenes, reduction: str = "sum") -> torch.Tensor:
    """`(scenes, 9, hidden)`: for each image token, the sum (or with `reduction="mean"` the mean) of the input
    embeddings of the words its cell shows (an empty cell: the embedding of ``empty``)."""
    ids = cell_word_ids(processor, scenes)
    embeddings = model.get_input_embeddings().weight[ids]
    if reduction == "mean":
        return embeddings.mean(2)
    if reduction != "sum":
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'mean'.")
    return embeddings[:, :, 0] + torch.where((ids[:, :, 0] == ids[:, :, 1])[..., None], 0.0, embeddings[:, :, 1])


def dense_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of the image tokens to their word targets, relative to the targets' mean squared norm."""
    return ((projected - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean()


def _prompt_inputs(processor, rows):
    from ..data.prompts import PromptFormat, prepare_inputs

    return prepare_inputs(processor, [{"images": r["images"], "prompt": r["prompt"]} for r in rows], PromptFormat())


@torch.no_grad()
def word_state_targets(model, processor, scenes, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scenes, 9, hidden)` residual-stream states after decoder `layer` of each occupied cell's words (the mean of
    its colour's and its digit's token) in the scene's text description, and the `(scenes, 9)` mask of occupied
    cells. Every colour and digit occurs once in a description, so each word's position is unambiguous."""
    from .scenes import SCENE_PREFIX

    tokenizer = processor.tokenizer
    encoded = tokenizer([f"{SCENE_PREFIX} {scene.describe()}" for scene in scenes], padding=True,
                        return_tensors="pt")
    states = model.model.language_model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                        output_hidden_states=True).hidden_states[layer + 1]
    targets = torch.zeros(len(scenes), GRID * GRID, states.shape[-1])
    occupied = torch.zeros(len(scenes), GRID * GRID, dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            ids = tokenizer.convert_tokens_to_ids([obj.colour, str(obj.digit)])
            positions = [int((encoded["input_ids"][i] == token).nonzero()[0]) for token in ids]
            targets[i, obj.cell] = states[i, positions].mean(0)
            occupied[i, obj.cell] = True
    return targets, occupied


def _image_features(model, processor, images) -> torch.Tensor:
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    features = model.model.get_image_features(pixel_values=pixel_values.to(model.dtype),
                                              vision_feature_layer=model.config.vision_feature_layer,
                                              vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(features))


def _schedule(steps: int):
    warmup = max(1, steps // 20)
    return lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (
        1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))


def _train_stage(model, processor, scans: DigitScans, rng: np.random.Generator, stage: str, parameters: list,
                 steps: int, learning_rate: float, args: GroundedLlavaArguments, absent_fraction: float = 0.0,
                 hallucination_fraction: float = 0.0, progress: bool = True) -> dict[str, float]:
    """One stage: `"language"` (described scenes, loss on every token), `"alignment"` (dense loss only) or
    `"instruction"` / `"imperfect_instruction"` (answer loss + `args.dense_weight` x dense loss). Returns the mean
    losses of its last 10%."""
    from tqdm.auto import tqdm

    if steps == 0:
        return {}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("p", o))
    history: list[tuple[float, float]] = []
    model.train()
    try:
        for _ in tqdm(range(steps), desc=f"Grounded LLaVA: {stage}", unit="step", disable=not progress):
            rows = question_rows(scans, args.batch_size, "train", rng, absent_fraction=absent_fraction,
                                 as_text=stage == "language", hallucination_fraction=hallucination_fraction)
            answer, dense = torch.zeros(()), torch.zeros(())
            at_layer = args.align_layer is not None and stage != "language"
            if stage == "alignment" and not at_layer:  # the frozen language model plays no part
                projected = _image_features(model, processor, [row["images"][0] for row in rows])
            else:
                if stage == "alignment":  # the question alone: no answer is learned while the model is frozen
                    inputs = _prompt_inputs(processor, rows)
                else:
                    inputs, labels = response_inputs(model, processor, rows)
                if stage == "language":  # every real token, so that the model learns to copy from the description
                    labels = torch.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
                outputs = model(**inputs, use_cache=False, output_hidden_states=at_layer)
                if stage != "alignment":
                    logits = outputs.logits[:, :-1]
                    answer = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1))
                projected = captured.get("p")
            if stage != "language":
                scenes = [row["scene"] for row in rows]
                target = image_token_targets(model, processor, scenes, args.target).detach()
                dense = dense_loss(projected, target)
                if at_layer:
                    image = inputs["input_ids"] == processor.image_token_id
                    states = outputs.hidden_states[args.align_layer + 1][image].view(len(rows), GRID * GRID, -1)
                    word_states, occupied = word_state_targets(model, processor, scenes, args.align_layer)
                    dense = dense + args.layer_weight * dense_loss(states[occupied], word_states[occupied])
            loss = answer + (1.0 if stage == "alignment" else args.dense_weight) * dense
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append((float(answer.detach()), float(dense.detach())))
    finally:
        hook.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()
    tail = np.array(history[-max(1, steps // 10):])
    return {"answer_loss": float(tail[:, 0].mean()), "dense_loss": float(tail[:, 1].mean())}


RECIPE_STAGES = ("language", "alignment", "instruction", "imperfect_instruction")
"""The recipe's stages, in order (see the module docstring)."""


def train_stage(model, processor, scans: DigitScans, args: GroundedLlavaArguments, offset: int,
                progress: bool = True) -> dict[str, float]:
    """Stage `RECIPE_STAGES[offset]` of the recipe on `model`, with the parts it trains, its steps, learning rate
    and absent-object and hallucinated-answer shares from `args`, and its numpy rows seeded by `[args.seed, offset]`.
    Returns its final losses ([`_train_stage`])."""
    stage = RECIPE_STAGES[offset]
    parts, steps, learning_rate, absent, hallucination = {
        "language": (["language"], args.language_steps, args.language_learning_rate, args.language_absent_fraction,
                     0.0),
        "alignment": (["vision", "projector"], args.alignment_steps, args.alignment_learning_rate, 0.0, 0.0),
        "instruction": (["language", "projector"], args.instruction_steps, args.instruction_learning_rate,
                        args.instruction_absent_fraction, args.instruction_hallucination_fraction),
        "imperfect_instruction": (["language", "projector"], args.imperfect_steps, args.imperfect_learning_rate,
                                  args.imperfect_absent_fraction, args.imperfect_hallucination_fraction),
    }[stage]
    parameters = [p for part in parts for p in _part(model, part)]
    return _train_stage(model, processor, scans, np.random.default_rng([args.seed, offset]), stage, parameters,
                        steps, learning_rate, args, absent, hallucination, progress)


def train_grounded_llava(args: GroundedLlavaArguments | None = None, scans: DigitScans | None = None,
                         eval_rows: int = 600, progress: bool = True):
    """Build and train the grounded tiny LLaVA with the four-stage recipe (see the module docstring).

    Returns `(model, processor, summary)`; the summary holds the arguments, each stage's final losses, the image-token
    probe ([`cell_probe`]) and the answers on `eval_rows` held-out scenes ([`answer_accuracy`]), and the seconds.
    Deterministic per `args.seed` on one CPU thread.
    """
    args = args or GroundedLlavaArguments()
    scans = scans or DigitScans(args.held_out_fraction, seed=args.seed)
    started = time.perf_counter()
    model, processor = build_grounded_llava(args)
    summary: dict[str, Any] = {"arguments": asdict(args), "stages": {}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        for offset, stage in enumerate(RECIPE_STAGES):
            summary["stages"][stage] = train_stage(model, processor, scans, args, offset, progress)
    if eval_rows:  # 0: no evaluation (the caller measures the model itself)
        held_out = question_rows(scans, eval_rows, "held_out", np.random.default_rng([args.seed, 99]),
                                 absent_fraction=0.25)
        summary["cell_probe"] = cell_probe(model, processor, [row["scene"] for row in held_out[:200]], scans)
        summary["held_out"] = answer_accuracy(model, processor, held_out)
    summary["seconds"] = time.perf_counter() - started
    return model, processor, summary


@torch.no_grad()
def cell_probe(model, processor, scenes, scans: DigitScans) -> dict[str, float]:
    """How well the image tokens carry their cell's words: each token's projection is read as the digit (and the
    colour) whose input embedding it has the largest dot product with, over the occupied cells; empty cells as
    ``empty`` vs any digit."""
    projected = _image_features(model, processor, [scene.image(scans) for scene in scenes])
    embedding = model.get_input_embeddings().weight
    tokenizer = processor.tokenizer
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(DIGITS)))
    colour_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLOURS)))
    empty_id = tokenizer.convert_tokens_to_ids(EMPTY)
    digit_ok = colour_ok = empty_ok = occupied = empty = 0
    for scene, tokens in zip(scenes, projected):
        for cell, words in enumerate(scene.cell_words()):
            if words == (EMPTY,):
                empty += 1
                empty_ok += int((tokens[cell] @ embedding[torch.cat([torch.tensor([empty_id]), digit_ids])].T)
                                .argmax() == 0)
            else:
                occupied += 1
                colour_ok += int(list(COLOURS)[int((tokens[cell] @ embedding[colour_ids].T).argmax())] == words[0])
                digit_ok += int(DIGITS[int((tokens[cell] @ embedding[digit_ids].T).argmax())] == words[1])
    return {"digit": digit_ok / max(1, occupied), "colour": colour_ok / max(1, occupied),
            "empty": empty_ok / max(1, empty)}


@torch.no_grad()
def candidate_log_likelihoods(model, processor, rows, batch_size: int = 16,
                              exclude: list[str] | None = None) -> list[tuple[list[str], torch.Tensor]]:
    """For each row, the candidates of [`ANSWERS`] for its ``"kind"`` and the model's log-likelihood of each as the
    answer to the row's question. With `exclude`, row i's candidates leave out ``exclude[i]``."""
    def candidates_of(i: int, row) -> list[str]:
        return [a for a in ANSWERS[row["kind"]] if exclude is None or a != exclude[i]]

    was_training = model.training
    model.eval()
    scored = []
    for start in range(0, len(rows), batch_size):
        chunk = list(enumerate(rows[start:start + batch_size], start))
        flat = [{"images": row["images"], "prompt": row["prompt"], "response": candidate}
                for i, row in chunk for candidate in candidates_of(i, row)]
        log_likelihoods = response_log_likelihoods(model, processor, flat)[0]
        offset = 0
        for i, row in chunk:
            candidates = candidates_of(i, row)
            scored.append((candidates, log_likelihoods[offset:offset + len(candidates)].clone()))
            offset += len(candidates)
    model.train(was_training)
    return scored


def predict_answers(model, processor, rows, batch_size: int = 16, exclude: list[str] | None = None) -> list[str]:
    """The model's answer to each row's question: the candidate of [`ANSWERS`] for the row's ``"kind"`` with the
    highest log-likelihood (so every answer is one the task knows). With `exclude`, row i's candidates leave out
    ``exclude[i]`` (e.g. the chosen answer, to find the model's own likeliest wrong one)."""
    return [candidates[int(values.argmax())]
            for candidates, values in candidate_log_likelihoods(model, processor, rows, batch_size, exclude)]


def answer_accuracy(model, processor, rows, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of [`predict_answers`] on `rows` (with ``"response"`` the faithful answer): overall, per question
    kind (``"colour"``, ``"colour_absent"``, ...), and the hallucination rate: the share of questions about absent
    objects answered with a confident answer instead of ``none`` / ``no``."""
    predicted = predict_answers(model, processor, rows, batch_size)
    by_kind: dict[str, list[bool]] = {}
    hallucinated = []
    for row, answer in zip(rows, predicted):
        key = row["kind"] + ("" if row["present"] else "_absent")
        by_kind.setdefault(key, []).append(answer == row["response"])
        if not row["present"]:
            hallucinated.append(answer not in FAITHFUL_ABSENT_ANSWERS)
    return {"accuracy": float(np.mean([a == r["response"] for r, a in zip(rows, predicted)])),
            "by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
            "hallucination_rate": float(np.mean(hallucinated)) if hallucinated else None,
            "rows": len(rows)}


@torch.no_grad()
def concept_alignment(model, processor, rows, layers: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Whether a concept's word and the image cells showing it share a direction, at the input embeddings
    (``"embeddings"``) and after each decoder layer: per concept, the mean hidden state of its word in the questions
    minus the mean of all text positions, and the mean of its cells minus the mean of all image positions; returns
    the mean cosine of the same concept's pair (``"same"``), of different concepts' pairs (``"other"``) and the
    share of concepts whose word is closest to their own cells (``"matched"``)."""
    from ..activations.reader import LayerReader, Modality
    from .scenes import CONCEPTS

    layers = list(range(model.config.text_config.num_hidden_layers)) if layers is None else layers
    tokenizer = processor.tokenizer
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(CONCEPTS)))
    inputs = LayerReader(model, processor, layer=0).prepare(
        [{"images": row["images"], "prompt": row["prompt"]} for row in rows])
    outputs = model(**inputs, output_hidden_states=True, use_cache=False)
    reader = LayerReader(model, processor, layer=0)
    modality = reader.modality(inputs["input_ids"], inputs["attention_mask"])
    shown = torch.zeros(len(rows), GRID * GRID, len(CONCEPTS), dtype=torch.bool)
    for r, row in enumerate(rows):
        for cell, words in enumerate(row["scene"].cell_words()):
            for word in words:
                if word in CONCEPTS:
                    shown[r, cell, CONCEPTS.index(word)] = True
    result = {}
    for name, hidden in [("embeddings", outputs.hidden_states[0]),
                         *((str(layer), outputs.hidden_states[layer + 1]) for layer in layers)]:
        text = (modality == Modality.TEXT) | (modality == Modality.SPECIAL)
        image = modality == Modality.IMAGE
        text_states, image_states = hidden[text], hidden[image].view(len(rows), GRID * GRID, -1)
        said = inputs["input_ids"][text][:, None] == ids[None, :]  # (text positions, concepts)
        cells = shown.view(-1, len(CONCEPTS)).float()
        image_flat = image_states.reshape(-1, image_states.shape[-1])
        present = (said.sum(0) > 0) & (cells.sum(0) > 0)
        word_means = (said.float().T @ text_states) / said.sum(0).clamp_min(1)[:, None] - text_states.mean(0)
        cell_means = (cells.T @ image_flat) / cells.sum(0).clamp_min(1)[:, None] - image_flat.mean(0)
        cosine = F.normalize(word_means[present], dim=1) @ F.normalize(cell_means[present], dim=1).T
        n = int(present.sum())
        result[name] = {"same": float(cosine.diag().mean()),
                        "other": float((cosine.sum() - cosine.diag().sum()) / max(1, n * n - n)),
                        "matched": float((cosine.argmax(1) == torch.arange(n)).float().mean())}
    return result


RECORDED_ROWS = 24
"""Held-out questions whose answers [`save_grounded_llava`] records beside the model, for checking a reload."""


def recorded_questions(args: GroundedLlavaArguments, scans: DigitScans | None = None) -> list[dict[str, Any]]:
    """The [`RECORDED_ROWS`] held-out questions (a fixed draw, 25% about absent objects) whose answers are recorded."""
    scans = scans or DigitScans(args.held_out_fraction, seed=args.seed)
    return question_rows(scans, RECORDED_ROWS, "held_out", np.random.default_rng([args.seed, 1234]),
                         absent_fraction=0.25)


def save_grounded_llava(model, processor, summary: dict[str, Any], path) -> None:
    """Save the model and processor to `path` with `recipe.json`: the recipe's arguments (and seed) that reproduce
    them, the training summary, and the model's answers to [`recorded_questions`]."""
    import json
    from pathlib import Path

    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    args = GroundedLlavaArguments(**summary["arguments"])
    rows = recorded_questions(args)
    record = {"arguments": summary["arguments"], "summary": {k: v for k, v in summary.items() if k != "arguments"},
              "recorded_questions": [row["prompt"] for row in rows],
              "recorded_answers": predict_answers(model, processor, rows)}
    (path / "recipe.json").write_text(json.dumps(record, indent=2))
