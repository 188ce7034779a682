"""The digit-captioning miniature: the first, ungrounded one, retired as `saev demo` (the grounded scenes of
`saev_hf.demo` replaced it) and kept for the two benchmarks built on it (`filtering_experiment.py`,
`patch_filtering.py`). Its stages:

1. Pretrain a tiny LLaVA on real handwritten digits (scikit-learn) with captions ([`pretrain_tiny_model`]).
2. Train an SAE-V on its decoder layer `layer` ([`train_saev`]) and compute the cross-modal feature weights.
3. Build a preference dataset (image, "what digit is this ?", chosen: the right digit, rejected: a wrong one) in
   which a KNOWN fraction of rows is low quality: the image is swapped for another digit's, so the image no longer
   matches the question and answer.
4. Score every row with [`SAEVScorer`] (`ds.map`), measure how well each score tells clean rows from low-quality
   ones (AUROC), and keep the top `keep_fraction` by each score.
5. DPO ([`saev_hf.alignment.dpo.train_dpo`]) from the same pretrained model on the full data, on each filtered subset, on a
   random subset of the same size and on the clean rows only (the oracle), with the same number of steps; evaluate
   each on held-out digits ([`digit_accuracy`]).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

CORRUPTIONS = {"noise": "their image was replaced by random pixels",
               "swap": "their image was swapped for another digit's"}


@dataclass
class DigitCaptioningArguments:
    """The settings of the digit-captioning miniature: a tiny offline MLLM pretrained on real digit images, its SAE-V,
    a preference dataset with a known low-quality fraction, and DPO."""

    layer: int = field(default=2, metadata={"help": "Decoder layer of the tiny LLaVA (of 4) read by the SAE-V."})
    pretrain_digits: int = field(default=800, metadata={"help": "Digits the tiny LLaVA is pretrained on."})
    pretrain_steps: int = field(default=400, metadata={"help": "Pretraining steps of the tiny LLaVA."})
    saev_digits: int = field(default=300, metadata={"help": "Digits (with captions) the SAE-V is trained on."})
    saev_steps: int = field(default=600, metadata={"help": "SAE-V training steps (512 tokens each)."})
    expansion_factor: int = field(default=8, metadata={"help": "d_sae / d_in of the SAE-V."})
    cooccurrence_threshold: float = field(
        default=0.1, metadata={"help": "Co-occurrence bound delta (the paper: 1), lowered to the tiny model's scale."})
    num_pairs: int = field(default=300, metadata={"help": "Rows of the preference dataset."})
    low_quality_fraction: float = field(default=0.3, metadata={"help": "Known fraction of low-quality rows."})
    corruption: str = field(
        default="noise", metadata={"help": "How a low-quality row is made: 'noise' (the image is replaced by random "
                                   "pixels) or 'swap' (another digit's image: invisible to a prompt-and-image score, "
                                   "as the question does not name the digit)."})
    keep_fraction: float = field(default=0.5, metadata={"help": "Top fraction kept by each score."})
    dpo_steps: int = field(default=30, metadata={"help": "DPO steps for every subset (the same for all)."})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO batch size."})
    dpo_learning_rate: float = field(default=1e-4, metadata={"help": "DPO learning rate (tiny model, few steps)."})
    eval_digits: int = field(default=200, metadata={"help": "Held-out digits for the accuracy."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward when weighting and scoring."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the SAE-V, the data and DPO."})

    def __post_init__(self) -> None:
        if not 0 < self.low_quality_fraction < 1:
            raise ValueError(f"low_quality_fraction={self.low_quality_fraction} must be in (0, 1).")
        if self.corruption not in ("noise", "swap"):
            raise ValueError(f"corruption={self.corruption!r} must be 'noise' or 'swap'.")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction={self.keep_fraction} must be in (0, 1].")
        needed = self.pretrain_digits + self.saev_digits + self.num_pairs + self.eval_digits
        if needed > 1797:
            raise ValueError(f"The miniature uses {needed} distinct digits; scikit-learn has 1797.")


def _turn(role: str, content: list[dict]) -> list[dict]:
    return [{"role": role, "content": content}]


def preference_rows(digits, low_quality_fraction: float, seed: int,
                    corruption: str = "noise") -> tuple[list[dict], list[bool]]:
    """Preference rows about `digits`; a random `low_quality_fraction` of them get a noise image (`corruption=
    "noise"`) or another digit's image (`"swap"`), so that the image no longer matches the question and answer."""
    import numpy as np
    from PIL import Image

    from saev_hf.testing.digit_data import DIGIT_NAMES

    rng = np.random.default_rng(seed)
    n = len(digits)
    low = np.zeros(n, dtype=bool)
    low[rng.choice(n, size=round(low_quality_fraction * n), replace=False)] = True
    rows = []
    for i, (image, label) in enumerate(digits):
        if low[i] and corruption == "noise":
            pixels = rng.integers(0, 256, size=np.asarray(image).shape, dtype=np.uint8)
            image = Image.fromarray(pixels, mode=None).convert(image.mode)
        elif low[i]:  # swap in the image of a different digit: the answer no longer matches the image
            j = int(rng.integers(n))
            while digits[j][1] == label:
                j = int(rng.integers(n))
            image = digits[j][0]
        wrong = (label + int(rng.integers(1, 10))) % 10
        rows.append({
            "images": [image],
            "prompt": _turn("user", [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]),
            "chosen": _turn("assistant", [{"type": "text", "text": f"a handwritten digit {DIGIT_NAMES[label]} ."}]),
            "rejected": _turn("assistant", [{"type": "text", "text": f"a handwritten digit {DIGIT_NAMES[wrong]} ."}]),
            "low_quality": bool(low[i]),
        })
    return rows, low.tolist()


def _log(message: str) -> None:
    print(f"[saev demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class DemoDigits(NamedTuple):
    """The four disjoint sets of `(image, label)` digits the pipeline uses, drawn from scikit-learn's 1797."""

    pretrain: list
    saev: list
    pairs: list
    eval: list


def split_digits(args: DigitCaptioningArguments) -> DemoDigits:
    """`args.pretrain_digits`, `saev_digits`, `num_pairs` and `eval_digits` distinct digits, in an order set by
    `args.seed`: for pretraining the MLLM, training the SAE-V, the preference rows and the held-out accuracy."""
    import numpy as np

    from saev_hf.testing.digit_data import digit_images

    digits = digit_images(1797, seed=args.seed)
    cut = np.cumsum([args.pretrain_digits, args.saev_digits, args.num_pairs, args.eval_digits])
    return DemoDigits(*(digits[a:b] for a, b in zip([0, *cut[:-1]], cut)))


def pretrain_mllm(args: DigitCaptioningArguments, digits: DemoDigits, progress: bool = True) -> tuple[Any, Any, dict]:
    """Stage 1: a tiny LLaVA (seed `args.seed`) pretrained on captions of `digits.pretrain`; returns `(model,
    processor, summary)`, the summary of [`pretrain_tiny_model`] (held-out accuracy on `digits.eval`)."""
    from saev_hf.testing.digit_data import digit_caption_examples
    from saev_hf.testing.tiny_models import build_tiny_model
    from saev_hf.testing.tiny_pretraining import pretrain_tiny_model

    model, processor = build_tiny_model("llava", seed=args.seed)
    summary = pretrain_tiny_model(model, processor, digit_caption_examples(digits.pretrain, seed=args.seed),
                                  steps=args.pretrain_steps, seed=args.seed, eval_digits=digits.eval,
                                  progress=progress)
    return model, processor, summary


def train_scoring_saev(args: DigitCaptioningArguments, model, processor, digits: DemoDigits, output_dir: str | Path,
                       weights_from_questions: bool = False, progress: bool = True):
    """Stage 2: an SAE-V on layer `args.layer` of `model`, trained on captions of `digits.saev`, with its cross-modal
    feature weights and `cooccurrence_threshold` set; saved to `output_dir` and returned. The weights read the same
    captions (question, image and answer), or with `weights_from_questions` the question and image alone, as the
    authors' code does."""
    import datasets

    from saev_hf.activations.reader import LayerReader
    from saev_hf.data.prompts import PromptFormat
    from saev_hf.testing.digit_data import digit_caption_examples
    from saev_hf.training.arguments import SAEVTrainingArguments
    from saev_hf.training.trainer import train_saev
    from saev_hf.weighting.weights import WeightingArguments, compute_feature_weights

    saev_rows = datasets.Dataset.from_list(digit_caption_examples(digits.saev, seed=args.seed + 1))
    saev_args = SAEVTrainingArguments(
        layer=args.layer, output_dir=str(output_dir),
        expansion_factor=args.expansion_factor, l1_coefficient=3.0, learning_rate=2e-3, max_steps=args.saev_steps,
        train_batch_size_tokens=512, buffer_size_tokens=8192, input_scale_estimation_tokens=4096, read_batch_size=16,
        dead_feature_window=max(1, args.saev_steps // 4), seed=args.seed, logging_steps=max(1, args.saev_steps // 4),
        report_to="none", overwrite_output_dir=True, disable_tqdm=not progress)
    sae = train_saev(saev_args, model=model, processor=processor, dataset=saev_rows,
                     prompt_format=PromptFormat(response_column="response"))
    sae.config.cooccurrence_threshold = args.cooccurrence_threshold
    if weights_from_questions:
        weight_rows = datasets.Dataset.from_dict({"images": [[image] for image, _ in digits.saev],
                                                  "prompt": ["what digit is this ?"] * len(digits.saev)})
        reader = LayerReader(model, processor, layer=args.layer)
    else:
        weight_rows = saev_rows
        reader = LayerReader(model, processor, layer=args.layer, prompt_format=PromptFormat(response_column="response"))
    compute_feature_weights(sae, reader, weight_rows, WeightingArguments(num_examples=None, batch_size=args.batch_size,
                                                                         seed=args.seed))
    sae.save_pretrained(output_dir)
    return sae


def dpo_digit_accuracy(args: DigitCaptioningArguments, model, processor, subset, eval_digits: list, output_dir: str | Path,
                       **config_overrides: Any) -> dict:
    """Stage 5 for one subset: DPO of a copy of `model` (left unchanged) on `subset` for `args.dpo_steps` steps, then
    its held-out accuracy on `eval_digits`. Returns `{"digit_accuracy", "final_loss"}`; `config_overrides` go to
    [`paper_dpo_config`] on top of the demo's settings."""
    from saev_hf.alignment.dpo import paper_dpo_config, train_dpo
    from saev_hf.testing.tiny_pretraining import digit_accuracy

    policy = copy.deepcopy(model)
    settings = dict(
        max_steps=args.dpo_steps, per_device_train_batch_size=args.dpo_batch_size, gradient_accumulation_steps=1,
        learning_rate=args.dpo_learning_rate, warmup_steps=0, lr_scheduler_type="constant", max_length=128,
        logging_steps=max(1, args.dpo_steps // 5), save_strategy="no", seed=args.seed, report_to="none")
    trainer = train_dpo(policy, processor, subset, paper_dpo_config(str(output_dir), **{**settings,
                                                                                        **config_overrides}))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"digit_accuracy": digit_accuracy(policy, processor, eval_digits),
            "final_loss": losses[-1] if losses else None}


