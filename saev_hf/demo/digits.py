"""`saev demo`: the whole SAE-V data-filtering method in miniature, offline on a CPU in a few minutes.

1. Pretrain a tiny LLaVA on real handwritten digits (scikit-learn) with captions ([`pretrain_tiny_model`]).
2. Train an SAE-V on its decoder layer `layer` ([`train_saev`]) and compute the cross-modal feature weights.
3. Build a preference dataset (image, "what digit is this ?", chosen: the right digit, rejected: a wrong one) in
   which a KNOWN fraction of rows is low quality: the image is swapped for another digit's, so the image no longer
   matches the question and answer.
4. Score every row with [`SAEVScorer`] (`ds.map`), measure how well each score tells clean rows from low-quality
   ones (AUROC), and keep the top `keep_fraction` by each score.
5. DPO ([`saev_hf.dpo.train_dpo`]) from the same pretrained model on the full data, on each filtered subset, on a
   random subset of the same size and on the clean rows only (the oracle), with the same number of steps; evaluate
   each on held-out digits ([`digit_accuracy`]).

Writes `report.md`, `summary.json`, `scores.png` and `accuracy.png` (and the SAE-V in `saev/`) to `output_dir`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .pipeline import SCORE_COLUMNS, plot_score_histograms  # one score-column table, one score plot

CORRUPTIONS = {"noise": "their image was replaced by random pixels",
               "swap": "their image was swapped for another digit's"}


@dataclass
class DemoArguments:
    """Run the SAE-V data-filtering method end to end on a tiny offline MLLM and real digit images."""

    output_dir: str = field(default="saev_demo", metadata={"help": "Folder for the report, plots and SAE-V."})
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
            raise ValueError(f"The demo uses {needed} distinct digits; scikit-learn has 1797.")


def _turn(role: str, content: list[dict]) -> list[dict]:
    return [{"role": role, "content": content}]


def preference_rows(digits, low_quality_fraction: float, seed: int,
                    corruption: str = "noise") -> tuple[list[dict], list[bool]]:
    """Preference rows about `digits`; a random `low_quality_fraction` of them get a noise image (`corruption=
    "noise"`) or another digit's image (`"swap"`), so that the image no longer matches the question and answer."""
    import numpy as np
    from PIL import Image

    from .digit_data import DIGIT_NAMES

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


def split_digits(args: DemoArguments) -> DemoDigits:
    """`args.pretrain_digits`, `saev_digits`, `num_pairs` and `eval_digits` distinct digits, in an order set by
    `args.seed`: for pretraining the MLLM, training the SAE-V, the preference rows and the held-out accuracy."""
    import numpy as np

    from .digit_data import digit_images

    digits = digit_images(1797, seed=args.seed)
    cut = np.cumsum([args.pretrain_digits, args.saev_digits, args.num_pairs, args.eval_digits])
    return DemoDigits(*(digits[a:b] for a, b in zip([0, *cut[:-1]], cut)))


def pretrain_mllm(args: DemoArguments, digits: DemoDigits, progress: bool = True) -> tuple[Any, Any, dict]:
    """Stage 1: a tiny LLaVA (seed `args.seed`) pretrained on captions of `digits.pretrain`; returns `(model,
    processor, summary)`, the summary of [`pretrain_tiny_model`] (held-out accuracy on `digits.eval`)."""
    from .tiny_models import build_tiny_model
    from .digit_data import digit_caption_examples
    from .tiny_pretraining import pretrain_tiny_model

    model, processor = build_tiny_model("llava", seed=args.seed)
    summary = pretrain_tiny_model(model, processor, digit_caption_examples(digits.pretrain, seed=args.seed),
                                  steps=args.pretrain_steps, seed=args.seed, eval_digits=digits.eval,
                                  progress=progress)
    return model, processor, summary


def train_scoring_saev(args: DemoArguments, model, processor, digits: DemoDigits, output_dir: str | Path,
                       weights_from_questions: bool = False, progress: bool = True):
    """Stage 2: an SAE-V on layer `args.layer` of `model`, trained on captions of `digits.saev`, with its cross-modal
    feature weights and `cooccurrence_threshold` set; saved to `output_dir` and returned. The weights read the same
    captions (question, image and answer), or with `weights_from_questions` the question and image alone, as the
    authors' code does."""
    import datasets

    from ..activations import LayerReader
    from ..prompts import PromptFormat
    from .digit_data import digit_caption_examples
    from ..training import SAEVTrainingArguments, train_saev
    from ..weighting import WeightingArguments, compute_feature_weights

    saev_rows = datasets.Dataset.from_list(digit_caption_examples(digits.saev, seed=args.seed + 1))
    saev_args = SAEVTrainingArguments(
        layer=args.layer, output_dir=str(output_dir), image_column="images", response_column="response",
        expansion_factor=args.expansion_factor, l1_coefficient=3.0, learning_rate=2e-3, max_steps=args.saev_steps,
        train_batch_size_tokens=512, buffer_size_tokens=8192, input_scale_estimation_tokens=4096, read_batch_size=16,
        dead_feature_window=max(1, args.saev_steps // 4), seed=args.seed, logging_steps=max(1, args.saev_steps // 4),
        report_to="none", use_cpu=True, overwrite_output_dir=True, disable_tqdm=not progress)
    sae = train_saev(saev_args, model=model, processor=processor, dataset=saev_rows)
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


def dpo_digit_accuracy(args: DemoArguments, model, processor, subset, eval_digits: list, output_dir: str | Path,
                       **config_overrides: Any) -> dict:
    """Stage 5 for one subset: DPO of a copy of `model` (left unchanged) on `subset` for `args.dpo_steps` steps, then
    its held-out accuracy on `eval_digits`. Returns `{"digit_accuracy", "final_loss"}`; `config_overrides` go to
    [`paper_dpo_config`] on top of the demo's settings."""
    from ..dpo import paper_dpo_config, train_dpo
    from .tiny_pretraining import digit_accuracy

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


def run_demo(args: DemoArguments) -> dict:
    """Run the demo and return its summary (also written to `output_dir/summary.json`, with `report.md` and plots)."""
    import datasets
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from ..filtering import FilterArguments, filter_by_score
    from ..scoring import SAEVScorer

    started = time.perf_counter()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    digits = split_digits(args)

    # 1. the MLLM
    _log(f"1/5 Pretraining a tiny LLaVA on {len(digits.pretrain)} captioned digits ({args.pretrain_steps} steps)")
    model, processor, pretrain = pretrain_mllm(args, digits)
    base_accuracy = pretrain["digit_accuracy_after"]
    _log(f"    held-out digit accuracy {pretrain['digit_accuracy_before']:.1%} -> {base_accuracy:.1%}")

    # 2. the SAE-V and its feature weights
    _log(f"2/5 Training an SAE-V on layer {args.layer} ({args.saev_steps} steps) and computing feature weights")
    sae = train_scoring_saev(args, model, processor, digits, output / "saev")
    num_weighted = int(sae.has_feature_weight.sum())

    # 3. the preference data with a known low-quality part; 4. scores and AUROC
    rows, low = preference_rows(digits.pairs, args.low_quality_fraction, seed=args.seed + 2,
                                corruption=args.corruption)
    dataset = datasets.Dataset.from_list(rows)
    _log(f"3/5 Scoring {len(dataset)} preference rows ({sum(low)} low quality: {args.corruption})")
    scored = dataset.map(SAEVScorer(sae, model, processor), batched=True, batch_size=args.batch_size,
                         desc="SAE-V scores")
    clean = ~np.array(low)
    scores = {name: np.array(scored[column], dtype=float) for name, column in SCORE_COLUMNS.items()}
    auroc = {name: float(roc_auc_score(clean, values)) if np.ptp(values) > 0 else 0.5 for name, values in scores.items()}

    # 5. DPO on each subset, evaluated on held-out digits
    n_keep = max(1, round(args.keep_fraction * len(scored)))
    rng = np.random.default_rng(args.seed + 3)
    subsets = {"full": scored}
    for name, column in SCORE_COLUMNS.items():
        subsets[f"saev_{name}"] = filter_by_score(scored, FilterArguments(column=column, fraction=args.keep_fraction))
    subsets["random"] = scored.select(sorted(rng.choice(len(scored), size=n_keep, replace=False).tolist()))
    subsets["clean_only"] = scored.filter(lambda row: not row["low_quality"])
    results = {}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for i, (name, subset) in enumerate(subsets.items()):
        _log(f"4/5 DPO {i + 1}/{len(subsets)}: {name} ({len(subset)} rows, {args.dpo_steps} steps)")
        trained = dpo_digit_accuracy(args, model, processor, subset, digits.eval, output / "dpo")
        results[name] = {
            "rows": len(subset),
            "kept_fraction": len(subset) / len(scored),
            "low_quality_fraction": float(np.mean(subset["low_quality"])),
            **trained,
        }

    seconds = time.perf_counter() - started
    summary = {
        "arguments": asdict(args),
        "known_low_quality_fraction": float(np.mean(low)),
        "num_low_quality": int(sum(low)),
        "num_rows": len(scored),
        "pretrained_digit_accuracy": base_accuracy,
        "num_weighted_features": num_weighted,
        "d_sae": sae.config.d_sae,
        "auroc": auroc,
        "score_means": {name: {"clean": float(v[clean].mean()), "low_quality": float(v[~clean].mean())}
                        for name, v in scores.items()},
        "dpo": results,
        "seconds": seconds,
    }
    _log("5/5 Writing the report")
    _plots(output, scores, clean, results, base_accuracy)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "report.md").write_text(_report(summary))
    print(_report(summary))
    return summary


def _plots(output: Path, scores: dict, clean, results: dict, base_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plot_score_histograms(output / "scores.png", scores, clean)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(results)
    accuracies = [results[n]["digit_accuracy"] for n in names]
    bars = ax.bar(names, accuracies, color=["#888888" if n in ("full", "random", "clean_only") else "#ff9d00"
                                            for n in names])
    for bar, n in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{results[n]['kept_fraction']:.0%}",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(base_accuracy, color="black", linestyle="--", linewidth=1, label="before DPO")
    ax.set(ylabel="held-out digit accuracy", title="DPO on each subset (label: kept fraction)")
    ax.legend(frameon=False, fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "accuracy.png", dpi=100)
    plt.close(fig)


def _report(summary: dict) -> str:
    args, dpo, auroc = summary["arguments"], summary["dpo"], summary["auroc"]
    full = dpo["full"]["digit_accuracy"]
    best_score = max(auroc, key=auroc.get)
    filtered = {n: r for n, r in dpo.items() if n.startswith("saev_")}
    best_filter = max(filtered, key=lambda n: filtered[n]["digit_accuracy"])
    rel = (lambda a: f"{a / full:.0%}" if full > 0 else "n/a")
    detects = [n for n, a in auroc.items() if a >= 0.6]
    lines = [
        "# saev demo: SAE-V data filtering in miniature",
        "",
        f"A tiny LLaVA pretrained on {args['pretrain_digits']} real handwritten digits (held-out accuracy "
        f"{summary['pretrained_digit_accuracy']:.1%}); an SAE-V with {summary['d_sae']} features on decoder layer "
        f"{args['layer']} ({summary['num_weighted_features']} features got a cross-modal weight); "
        f"{summary['num_rows']} preference rows of which {summary['num_low_quality']} "
        f"({summary['known_low_quality_fraction']:.0%}, known) are low quality: "
        f"{CORRUPTIONS[args['corruption']]}. Run time {summary['seconds']:.0f} s.",
        "",
        "## Can the scores tell clean rows from low-quality ones?",
        "",
        "AUROC of each score for 'clean' (0.5 = chance, 1 = perfect). See `scores.png`.",
        "",
        "| score | AUROC | mean (clean) | mean (low quality) |",
        "|---|---|---|---|",
        *(f"| {SCORE_COLUMNS[n]} | {a:.3f} | {summary['score_means'][n]['clean']:.4g} | "
          f"{summary['score_means'][n]['low_quality']:.4g} |" for n, a in auroc.items()),
        "",
        "## DPO on each subset",
        "",
        f"The same {args['dpo_steps']} DPO steps (batch {args['dpo_batch_size']}, lr {args['dpo_learning_rate']}) "
        f"from the same pretrained model; held-out digit accuracy on {args['eval_digits']} digits. See "
        "`accuracy.png`.",
        "",
        "| subset | rows | kept | low quality in it | digit accuracy | vs full data |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {r['rows']} | {r['kept_fraction']:.0%} | {r['low_quality_fraction']:.0%} | "
          f"{r['digit_accuracy']:.1%} | {rel(r['digit_accuracy'])} |" for n, r in dpo.items()),
        "",
        "## What this run found",
        "",
        f"- Best separating score: {SCORE_COLUMNS[best_score]} (AUROC {auroc[best_score]:.3f}). "
        + (f"Scores with AUROC >= 0.6: {', '.join(SCORE_COLUMNS[n] for n in detects)}." if detects else
           "No score separates clean from low-quality rows well (all AUROC < 0.6) in this run."),
        *([f"- Inverted (AUROC <= 0.4: the score ranks low-quality rows HIGHER, so keeping its top part keeps more "
           f"of them): {', '.join(SCORE_COLUMNS[n] for n, a in auroc.items() if a <= 0.4)}."]
          if any(a <= 0.4 for a in auroc.values()) else []),
        f"- Best SAE-V filter for DPO: {best_filter} at {filtered[best_filter]['kept_fraction']:.0%} of the data, "
        f"{filtered[best_filter]['digit_accuracy']:.1%} vs {full:.1%} with all the data "
        f"({rel(filtered[best_filter]['digit_accuracy'])}) and {dpo['random']['digit_accuracy']:.1%} with a random "
        f"subset of the same size; clean rows only (oracle): {dpo['clean_only']['digit_accuracy']:.1%}.",
        "- One seed and a tiny model: differences of a few points are within noise. "
        "`benchmarks/` holds multi-seed experiments.",
    ]
    return "\n".join(lines) + "\n"
