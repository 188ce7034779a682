"""An SAE-V on the grounded tiny LLaVA, with its cross-modal feature weights: the library's own training and
weighting, run on scene questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.prompts import PromptFormat
from .scenes import DigitScans, question_rows


@dataclass
class SceneSAEVArguments:
    """How the demo's SAE-V is trained and weighted."""

    layer: int = field(default=1, metadata={"help": "Decoder layer read (0-based, of the grounded LLaVA's 4)."})
    expansion_factor: int = field(default=8, metadata={"help": "d_sae / d_in."})
    l1_coefficient: float = field(default=3.0, metadata={"help": "L1 coefficient of the SAE-V loss."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    steps: int = field(default=1000, metadata={"help": "Training steps of 512 tokens."})
    training_rows: int = field(default=1500, metadata={"help": "Question-answer rows about training scenes."})
    weighting_rows: int = field(default=600, metadata={"help": "Prompt-only rows the feature weights are computed on."})
    delta_quantile: float = field(
        default=0.5, metadata={"help": "The co-occurrence bound delta is set to this quantile of the SAE-V's positive "
                               "activations on the weighting rows (the paper's delta = 1 is for its models' scale)."})
    top_k_pool: str = field(default="pooled", metadata={"help": "'pooled' (the paper's top-K rule) or "
                                                         "'per_modality' (see WeightingArguments.top_k_pool)."})
    seed: int = field(default=0, metadata={"help": "Seed of the rows and the SAE-V."})


def _rows_dataset(rows, with_response: bool):
    import datasets

    keep = ("images", "prompt", "response") if with_response else ("images", "prompt")
    return datasets.Dataset.from_list([{key: row[key] for key in keep} for row in rows])


def train_scene_saev(model, processor, scans: DigitScans, args: SceneSAEVArguments, output_dir: str | Path,
                     progress: bool = True):
    """Train an SAE-V on layer `args.layer` of `model` over question-answer rows about training scenes, set its
    co-occurrence bound delta from its activations, compute its cross-modal feature weights on prompt-only rows about
    held-out scenes (as the paper does: question and image), and save it to `output_dir`. Returns the SAE-V."""
    from ..training.arguments import SAEVTrainingArguments
    from ..training.trainer import train_saev

    rng = np.random.default_rng([args.seed, 21])
    training = _rows_dataset(question_rows(scans, args.training_rows, "train", rng), with_response=True)
    training_args = SAEVTrainingArguments(
        layer=args.layer, output_dir=str(output_dir), expansion_factor=args.expansion_factor, l1_coefficient=args.l1_coefficient, learning_rate=args.learning_rate,
        max_steps=args.steps, train_batch_size_tokens=512, buffer_size_tokens=8192, input_scale_estimation_tokens=4096,
        read_batch_size=32, dead_feature_window=max(1, args.steps // 4), seed=args.seed,
        logging_steps=max(1, args.steps // 4), report_to="none", overwrite_output_dir=True, disable_tqdm=not progress)
    sae = train_saev(training_args, model=model, processor=processor, dataset=training,
                     prompt_format=PromptFormat(response_column="response"))
    weigh_scene_saev(sae, model, processor, scans, args, progress)
    sae.save_pretrained(output_dir)
    return sae


def scene_weighting_rows(scans: DigitScans, n: int, seed: int) -> list[dict]:
    """The `n` prompt-only rows (question and image) about held-out scenes that the demo's SAE-V of `seed` is
    weighted on: the data of the paper's weighting step, and of the model-level mean cosine score."""
    rows = question_rows(scans, n, "held_out", np.random.default_rng([seed, 22]))
    return [{"images": row["images"], "prompt": row["prompt"]} for row in rows]


def weigh_scene_saev(sae, model, processor, scans: DigitScans, args: SceneSAEVArguments, progress: bool = True):
    """Set `sae`'s delta (the `args.delta_quantile` of its positive activations) and its cross-modal feature weights
    (rule `args.top_k_pool`) from prompt-only rows about held-out scenes, as the paper does (question and image)."""
    from ..activations.reader import LayerReader
    from ..weighting.weights import WeightingArguments, compute_feature_weights

    import datasets

    weighting = datasets.Dataset.from_list(scene_weighting_rows(scans, args.weighting_rows, args.seed))
    compute_feature_weights(sae, LayerReader(model, processor, layer=args.layer), weighting, WeightingArguments(
        num_examples=None, batch_size=32, seed=args.seed, threshold_quantile=args.delta_quantile,
        top_k_pool=args.top_k_pool))
    return sae
