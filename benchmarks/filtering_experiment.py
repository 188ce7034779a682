"""Benchmark: the paper's data-filtering experiment (Algorithm 1 stage 3, Algorithms 2-3), in miniature.

The SAE-V paper scores every row of a preference dataset with its SAE-V (cosine-similarity score, L0, co-occurring
L0), keeps the top 10%...100% of the rows by each score, fine-tunes the MLLM with DPO on what is kept, and reports more
than 110% of the full-data performance with less than 50% of the data. This script repeats that on a model small
enough for a CPU, with a preference set whose low-quality part is KNOWN, so that each score can also be checked for
telling clean rows from low-quality ones.

Per seed (every step of the pipeline is seeded by it: model, SAE-V, which digits go where, which rows are corrupted,
DPO):

1. A tiny LLaVA is pretrained on captions of `--pretrain-digits` scikit-learn digits (`digit_captioning.pretrain_mllm`).
   Deliberately weak (few digits): DPO on `--num-pairs` new, correctly labelled digits then has something to teach it.
2. An SAE-V is trained on its decoder layer `--layer` (captions of `--saev-digits` other digits) and its cross-modal
   feature weights are computed (`digit_captioning.train_scoring_saev`: the `saev demo` recipe).
3. Preference rows ("what digit is this ?", chosen: "a handwritten digit <label> .", rejected: another digit) about
   `--num-pairs` further digits, of which a random `--low-quality-fraction` is low quality (`preference_rows`). With
   `--corruption swap` (default) a low-quality row's image is another digit's: its chosen answer is WRONG for its
   image, so DPO on it teaches wrong labels. `noise` replaces the image by random pixels instead.
4. Scores of every row (higher = keep):
   - `saev_cosine_score`, `saev_l0`, `saev_cooccur_l0` from `SAEVScorer`. The paper's scorer reads the prompt and the
     image only; a swapped row's prompt and image are a well-formed question about a real digit, so that scorer
     cannot see what is wrong with it. By default (`--saev-reads prompt+chosen`) the scorer therefore reads the chosen
     answer too (`PromptFormat(response_column="chosen")`), a documented variant; the prompt-only scores are computed
     as well (`prompt_only_*`) and their AUROC reported; `--saev-reads prompt` filters on them instead.
   - `chosen_log_likelihood`: the pretrained model's own summed log-probability of the chosen answer given the image
     and question (the baseline: a model-based quality score needing no SAE).
   - `random_score`: uniform noise (random selection; nested subsets across fractions, like every score's).
   - `oracle`: 1 for clean rows, 0 for low-quality ones (a perfect filter; ties broken by row order), the ceiling.
   AUROC of each score for telling clean from low-quality rows (1 = perfect, 0.5 = chance, < 0.5 = inverted).
5. For each score and each kept fraction < 1, DPO (`digit_captioning.dpo_digit_accuracy`: TRL's DPOTrainer, full
   fine-tuning, the same `--dpo-steps` for every subset) from the same pretrained model on the top fraction
   (`filter_by_score`), then the held-out digit accuracy on `--eval-digits` digits that no stage saw (the ten captions
   ranked by likelihood; chance 10%). Kept fraction 1.0 is one shared run on the full data.

Mean +- sample standard deviation over `--seeds`. Writes `filtering_experiment.md` (tables and conclusion),
`filtering_experiment.json` (every number, per seed) and `filtering_experiment.png` (accuracy vs kept fraction with
spread bands; AUROCs) to `--output-dir`. One thread; about 20 minutes with the defaults on a shared 2-core CPU.

    python benchmarks/filtering_experiment.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import mean_std  # noqa: E402

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from digit_captioning import (  # noqa: E402
    DigitCaptioningArguments,
    dpo_digit_accuracy,
    preference_rows,
    pretrain_mllm,
    split_digits,
    train_scoring_saev,
)
from saev_hf.alignment import FilterArguments, filter_by_score  # noqa: E402
from saev_hf.data import PromptFormat  # noqa: E402
from saev_hf.scoring import ScorerArguments, SAEVScorer  # noqa: E402
from saev_hf.testing.digit_data import DIGIT_CAPTIONS, DIGIT_NAMES  # noqa: E402
from saev_hf.testing.tiny_pretraining import response_log_likelihoods  # noqa: E402

# method -> the score column it keeps the top of (every one: higher = keep); the SAE-V's read the chosen answer too
METHODS = {
    "saev_cosine": "saev_cosine_score",
    "saev_l0": "saev_l0",
    "saev_cooccur_l0": "saev_cooccur_l0",
    "log_likelihood": "chosen_log_likelihood",
    "random": "random_score",
    "oracle": "oracle",
}
SAEV_METHODS = ("saev_cosine", "saev_l0", "saev_cooccur_l0")
LABELS = {"saev_cosine": "SAE-V cosine", "saev_l0": "SAE-V L0", "saev_cooccur_l0": "SAE-V co-occurring L0",
          "log_likelihood": "answer log-likelihood", "random": "random", "oracle": "oracle (clean rows first)"}
COLORS = {"saev_cosine": "#ff9d00", "saev_l0": "#c44e52", "saev_cooccur_l0": "#8172b2", "log_likelihood": "#4c72b0",
          "random": "#777777", "oracle": "#55a868"}
# scores whose AUROC is reported: the filters' columns, and the paper's prompt-only SAE-V scores for reference
PROMPT_ONLY = {"prompt_only_cosine": "prompt_only_cosine_score", "prompt_only_l0": "prompt_only_l0",
               "prompt_only_cooccur_l0": "prompt_only_cooccur_l0"}
AUROC_SCORES = {**{m: c for m, c in METHODS.items() if m != "oracle"}, **PROMPT_ONLY}
AUROC_LABELS = {**LABELS, **{f"saev_{s}": f"{LABELS[f'saev_{s}']}, reading prompt + image + chosen"
                              for s in ("cosine", "l0", "cooccur_l0")},
                **{f"prompt_only_{s}": f"{LABELS[f'saev_{s}']}, reading prompt + image (the paper)"
                   for s in ("cosine", "l0", "cooccur_l0")}}
PAPER_TARGET = 1.10  # "more than 110% of full-data performance ..."
PAPER_MAX_FRACTION = 0.5  # "... with less than 50% of the data" (its best co-occurrence result is at 50%)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (--fractions checked to include 1.0, sorted, without duplicates)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (every stage of the pipeline).")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                        help="Kept fractions of the preference rows (1.0 = the full data).")
    parser.add_argument("--layer", type=int, default=2, help="Decoder layer of the tiny LLaVA (of 4) read.")
    parser.add_argument("--pretrain-digits", type=int, default=150, help="Digits the tiny LLaVA is pretrained on.")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="Pretraining steps of the tiny LLaVA.")
    parser.add_argument("--saev-digits", type=int, default=300, help="Digits (with captions) the SAE-V is trained on.")
    parser.add_argument("--saev-steps", type=int, default=600, help="SAE-V training steps (512 tokens each).")
    parser.add_argument("--expansion-factor", type=int, default=8, help="d_sae / d_in of the SAE-V.")
    parser.add_argument("--delta", type=float, default=0.1, help="Co-occurrence bound (the tiny model's scale).")
    parser.add_argument("--num-pairs", type=int, default=900, help="Rows of the preference dataset.")
    parser.add_argument("--low-quality-fraction", type=float, default=0.5, help="Known fraction of low-quality rows.")
    parser.add_argument("--corruption", default="swap", choices=["swap", "noise"],
                        help="Low-quality rows: another digit's image (swap) or random pixels (noise).")
    parser.add_argument("--saev-reads", default="prompt+chosen", choices=["prompt+chosen", "prompt"],
                        help="What the SAE-V scores used for filtering read with the image.")
    parser.add_argument("--dpo-steps", type=int, default=300, help="DPO steps for every subset (the same for all).")
    parser.add_argument("--dpo-batch-size", type=int, default=8, help="DPO batch size.")
    parser.add_argument("--dpo-learning-rate", type=float, default=4e-5,
                        help="DPO learning rate (lower than the demo's 1e-4: less spread between DPO runs).")
    parser.add_argument("--eval-digits", type=int, default=397, help="Held-out digits for the accuracy.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per forward when weighting and scoring.")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"),
                        help="Where filtering_experiment.{md,json,png} are written.")
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions) or 1.0 not in args.fractions:
        parser.error(f"--fractions {args.fractions} must lie in (0, 1] and include 1.0 (the full-data point).")
    args.fractions = sorted(set(args.fractions))
    return args


def log(message: str) -> None:
    """Print `message` with the script's name and the time, flushed."""
    print(f"[filtering_experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def miniature_arguments(args: argparse.Namespace, seed: int) -> DigitCaptioningArguments:
    """The pipeline's settings as the digit-captioning miniature takes them (it checks them, e.g. the digit budget)."""
    return DigitCaptioningArguments(
        layer=args.layer, pretrain_digits=args.pretrain_digits, pretrain_steps=args.pretrain_steps,
        saev_digits=args.saev_digits, saev_steps=args.saev_steps, expansion_factor=args.expansion_factor,
        cooccurrence_threshold=args.delta, num_pairs=args.num_pairs, low_quality_fraction=args.low_quality_fraction,
        corruption=args.corruption, dpo_steps=args.dpo_steps, dpo_batch_size=args.dpo_batch_size,
        dpo_learning_rate=args.dpo_learning_rate, eval_digits=args.eval_digits, batch_size=args.batch_size, seed=seed)


@dataclass
class SeedRun:
    """One seed's pipeline: its pretrained model, the scored preference rows and every result (`record`)."""

    model: Any
    processor: Any
    scored: datasets.Dataset
    record: dict


def pretrained_answers(model, processor):
    """A `datasets.map(batched=True)` function: whether the pretrained model's own answer to each row's image (the best
    of the ten captions by likelihood, as `digit_accuracy` ranks them) is the row's chosen answer. A clean row where it
    is teaches DPO little that the model does not already do."""

    def answer(batch: dict) -> dict:
        captions = [DIGIT_CAPTIONS[0].format(name=name) for name in DIGIT_NAMES]
        rows = [{"images": images, "prompt": prompt, "response": caption}
                for images, prompt in zip(batch["images"], batch["prompt"]) for caption in captions]
        with torch.no_grad():
            log_likelihood, _ = response_log_likelihoods(model, processor, rows)
        best = log_likelihood.view(-1, len(captions)).argmax(dim=1).tolist()
        return {"pretrained_names_chosen": [captions[b] == chosen[0]["content"][0]["text"]
                                            for b, chosen in zip(best, batch["chosen"])]}

    return answer


def score_rows(dataset: datasets.Dataset, low: list[bool], model, processor, sae, seed: int,
               batch_size: int) -> datasets.Dataset:
    """Every score column of step 4 added to the preference rows: the SAE-V's scores reading the chosen answer too
    (`saev_*`) and reading the prompt and image only (`prompt_only_*`), the log-likelihood, random and oracle."""
    scored = dataset.map(SAEVScorer(sae, model, processor, prompt_format=PromptFormat(response_column="chosen")),
                         batched=True, batch_size=batch_size)
    prompt_only = ScorerArguments(**{f"{score}_column": PROMPT_ONLY[f"prompt_only_{score}"]
                                     for score in ("cosine", "l0", "cooccur_l0")})
    scored = scored.map(SAEVScorer(sae, model, processor, args=prompt_only), batched=True, batch_size=batch_size)
    log_likelihood = SAEVScorer(None, model, processor, args=ScorerArguments(scores=["answer_log_likelihood"]))
    scored = scored.map(log_likelihood, batched=True, batch_size=16).rename_column("answer_log_likelihood",
                                                                                   "chosen_log_likelihood")
    scored = scored.map(pretrained_answers(model, processor), batched=True, batch_size=8)
    rng = np.random.default_rng(seed + 3)
    scored = scored.add_column("random_score", rng.random(len(scored)).tolist())
    return scored.add_column("oracle", [0.0 if is_low else 1.0 for is_low in low])


def method_columns(args: argparse.Namespace) -> dict[str, str]:
    """Method -> the score column it keeps the top of; `--saev-reads prompt` filters on the prompt-only scores."""
    if args.saev_reads == "prompt":
        return {**METHODS, **{f"saev_{s}": PROMPT_ONLY[f"prompt_only_{s}"] for s in ("cosine", "l0", "cooccur_l0")}}
    return dict(METHODS)


def auroc(clean: np.ndarray, values: np.ndarray) -> float:
    """AUROC of `values` for telling clean rows (`clean` true) from low-quality ones; 0.5 when `values` is constant."""
    return float(roc_auc_score(clean, values)) if np.ptp(values) > 0 else 0.5


def run_seed(seed: int, args: argparse.Namespace, workdir: str) -> SeedRun:
    """One seed's pipeline: pretrain, SAE-V, score the rows, DPO on each method's kept fractions; return its run."""
    started = time.perf_counter()
    settings = miniature_arguments(args, seed)
    torch.manual_seed(seed)
    digits = split_digits(settings)
    log(f"seed {seed}: pretraining the tiny LLaVA on {len(digits.pretrain)} digits ({args.pretrain_steps} steps)")
    model, processor, pretrain = pretrain_mllm(settings, digits, progress=False)
    log(f"seed {seed}: held-out digit accuracy {pretrain['digit_accuracy_before']:.1%} -> "
        f"{pretrain['digit_accuracy_after']:.1%}; training the SAE-V ({args.saev_steps} steps) and its weights")
    with contextlib.redirect_stdout(io.StringIO()):  # the SAE-V trainer's log lines
        sae = train_scoring_saev(settings, model, processor, digits, Path(workdir) / f"saev-{seed}")
    rows, low = preference_rows(digits.pairs, args.low_quality_fraction, seed=seed + 2, corruption=args.corruption)
    log(f"seed {seed}: {int(sae.has_feature_weight.sum())} of {sae.config.d_sae} features weighted; scoring "
        f"{len(rows)} rows ({sum(low)} low quality, {args.corruption})")
    scored = score_rows(datasets.Dataset.from_list(rows), low, model, processor, sae, seed, args.batch_size)
    clean = ~np.array(low)
    values = {name: np.array(scored[column], dtype=float) for name, column in AUROC_SCORES.items()}
    aurocs = {name: auroc(clean, v) for name, v in values.items()}
    log(f"seed {seed}: AUROC " + ", ".join(f"{name} {a:.3f}" for name, a in aurocs.items()))

    def train(subset) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):  # the DPO trainer's per-step log dicts
            trained = dpo_digit_accuracy(settings, model, processor, subset, digits.eval, Path(workdir) / "dpo",
                                         disable_tqdm=True)
        return {"rows": len(subset), "low_quality_fraction": float(np.mean(subset["low_quality"])),
                "pretrained_names_chosen_fraction": float(np.mean(subset["pretrained_names_chosen"])), **trained}

    partial = [f for f in args.fractions if f < 1]
    runs: dict = {method: {} for method in METHODS}
    with tqdm(total=1 + len(METHODS) * len(partial), desc=f"seed {seed}: DPO runs", unit="run") as bar:
        full = train(scored)
        bar.update()
        for fraction in partial:
            for method, column in method_columns(args).items():
                runs[method][str(fraction)] = train(filter_by_score(scored, FilterArguments(column=column,
                                                                                           fraction=fraction)))
                bar.update()
    for method in METHODS:  # the one full-data run is every method's 100% point
        runs[method][str(1.0)] = dict(full)
    record = {
        "seed": seed,
        "pretrained_digit_accuracy": pretrain["digit_accuracy_after"],
        "num_weighted_features": int(sae.has_feature_weight.sum()),
        "d_sae": sae.config.d_sae,
        "num_rows": len(scored),
        "num_low_quality": int(sum(low)),
        "auroc": aurocs,
        "score_means": {name: {"clean": float(v[clean].mean()), "low_quality": float(v[~clean].mean())}
                        for name, v in values.items()},
        "runs": runs,
    }
    log(f"seed {seed}: full data {full['digit_accuracy']:.1%}, pretrained {pretrain['digit_accuracy_after']:.1%}; "
        f"{time.perf_counter() - started:.0f} s")
    return SeedRun(model=model, processor=processor, scored=scored, record=record)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and reports
# ---------------------------------------------------------------------------------------------------------------------
def summarise(records: list[dict], args: argparse.Namespace) -> dict:
    """Over seeds, mean +- std of: AUROC per score; per method and kept fraction, the accuracy, the accuracy relative
    to the same seed's full-data run, the low-quality share of the kept rows and the share whose chosen answer the
    pretrained model already gives."""
    keys = [str(f) for f in args.fractions]

    def over_seeds(get) -> dict:
        return {method: {key: mean_std([get(r, method, key) for r in records]) for key in keys} for method in METHODS}

    return {
        "auroc": {name: mean_std([r["auroc"][name] for r in records]) for name in AUROC_SCORES},
        "accuracy": over_seeds(lambda r, m, k: r["runs"][m][k]["digit_accuracy"]),
        "relative_to_full": over_seeds(lambda r, m, k: r["runs"][m][k]["digit_accuracy"]
                                       / r["runs"][m][str(1.0)]["digit_accuracy"]),
        "low_quality_kept": over_seeds(lambda r, m, k: r["runs"][m][k]["low_quality_fraction"]),
        "pretrained_names_chosen_kept": over_seeds(lambda r, m, k: r["runs"][m][k]["pretrained_names_chosen_fraction"]),
        "pretrained_digit_accuracy": mean_std([r["pretrained_digit_accuracy"] for r in records]),
        "num_weighted_features": mean_std([r["num_weighted_features"] for r in records]),
    }


def paper_check(summary: dict, args: argparse.Namespace) -> dict:
    """Per method, its best kept fraction <= 50% by mean accuracy relative to full data (each seed's accuracy over its
    own full-data run, which takes out how good that seed's pretrained model is), whether that reaches the paper's
    110%, and whether it beats random selection at the same fraction by more than the two stds summed."""
    small = [str(f) for f in args.fractions if f <= PAPER_MAX_FRACTION]
    out = {}
    for method in METHODS:
        if not small:
            break
        rel = summary["relative_to_full"][method]
        best = max(small, key=lambda k: rel[k]["mean"])
        mine, random = rel[best], summary["relative_to_full"]["random"][best]
        spread = len(mine["values"]) > 1  # one seed has no spread to beat
        out[method] = {"fraction": float(best), "relative": mine["mean"], "relative_std": mine["std"],
                       "reaches_110": mine["mean"] >= PAPER_TARGET,
                       "above_full_beyond_spread": spread and mine["mean"] - mine["std"] > 1.0,
                       "beats_random_beyond_spread": spread and mine["mean"] - random["mean"] > mine["std"]
                       + random["std"]}
    return out


def pct(stat: dict) -> str:
    """`stat` as 'mean ± std', in percent."""
    return f"{stat['mean']:.1%} ± {stat['std']:.1%}"


def auroc_table(summary: dict, records: list[dict]) -> str:
    """The markdown table of each score's AUROC and its mean on clean and on low-quality rows."""
    lines = ["| score | AUROC (clean vs low quality) | mean, clean rows | mean, low-quality rows |",
             "|---|---:|---:|---:|"]
    for name in AUROC_SCORES:
        a = summary["auroc"][name]
        means = [statistics.fmean(r["score_means"][name][kind] for r in records) for kind in ("clean", "low_quality")]
        lines.append(f"| {AUROC_LABELS[name]} (`{AUROC_SCORES[name]}`) | {a['mean']:.3f} ± {a['std']:.3f} | "
                     f"{means[0]:.4g} | {means[1]:.4g} |")
    return "\n".join(lines)


def method_table(summary: dict, args: argparse.Namespace, key: str, fmt) -> str:
    """The markdown table of `summary[key]`: a row per method, a column per kept fraction, cells by `fmt`."""
    keys = [str(f) for f in args.fractions]
    lines = ["| method | " + " | ".join(f"keep {float(k):.0%}" for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for method in METHODS:
        lines.append(f"| {LABELS[method]} | " + " | ".join(fmt(summary[key][method][k]) for k in keys) + " |")
    return "\n".join(lines)


def relative(stat: dict) -> str:
    """`stat` as 'mean ± std', in whole percent (accuracy relative to full data)."""
    return f"{stat['mean']:.0%} ± {stat['std']:.0%}"


def headline(summary: dict, check: dict, args: argparse.Namespace) -> str:
    """The report's verdict on the paper's claim (> 110% of full-data accuracy with <= 50% of the data)."""
    if not check:
        return "No kept fraction of at most 50% was run, so the paper's claim is not tested."
    saev = {m: check[m] for m in SAEV_METHODS}
    best = max(saev, key=lambda m: saev[m]["relative"])
    b = saev[best]
    numbers = (f"the best SAE-V filter at a kept fraction <= 50% is {LABELS[best]} at {b['fraction']:.0%} of the "
               f"data, {b['relative']:.0%} ± {b['relative_std']:.0%} of the full-data accuracy")
    others = ("; the best at <= 50% of the data for the others: " + ", ".join(
        f"{LABELS[m]} {check[m]['relative']:.0%} ± {check[m]['relative_std']:.0%} (at {check[m]['fraction']:.0%})"
        for m in METHODS if m not in SAEV_METHODS))
    aurocs = [summary["auroc"][m]["mean"] for m in SAEV_METHODS]
    if b["reaches_110"] and b["beats_random_beyond_spread"]:
        return (f"**Yes: the miniature reproduces '> 110% of full-data performance with <= 50% of the data'**: "
                f"{numbers}, and it beats a random subset of the same size by more than the seed spread{others}.")
    random = summary["relative_to_full"]["random"][str(b["fraction"])]["mean"]
    if b["reaches_110"] and len(args.seeds) < 2:
        return (f"**In form, on one seed**: {numbers} (random selection at that size: {random:.0%}){others}. One seed "
                f"has no spread: run more seeds before reading anything into it.")
    if b["reaches_110"]:
        return (f"**Only in form**: {numbers}, but a random subset of the same size does about as well (within the "
                f"seed spread), so the gain comes from the smaller DPO set, not from the SAE-V's choice of rows"
                f"{others}.")
    return (f"**No: the miniature does not reproduce '> 110% of full-data performance with <= 50% of the data'**: "
            f"{numbers}{others}. The SAE-V scores tell clean rows from low-quality ones with AUROC "
            f"{min(aurocs):.2f}-{max(aurocs):.2f} (chance: 0.5).")


def findings(summary: dict, check: dict, records: list[dict], args: argparse.Namespace) -> list[str]:
    """Plain statements computed from the numbers."""
    out = []
    a = summary["auroc"]
    detect = [n for n in AUROC_SCORES if n != "random" and a[n]["mean"] - 2 * a[n]["std"] > 0.55]
    inverted = [n for n in AUROC_SCORES if a[n]["mean"] + 2 * a[n]["std"] < 0.45]
    chance = [n for n in AUROC_SCORES if n not in detect and n not in inverted and n != "random"]
    if detect:
        out.append("- Scores that tell clean rows from low-quality ones (AUROC above 0.55 by more than two seed "
                   "stds): " + ", ".join(f"{AUROC_LABELS[n]} {a[n]['mean']:.3f}" for n in detect) + ".")
    if inverted:
        out.append("- Inverted scores (they rank low-quality rows higher; keeping their top keeps more of them): "
                   + ", ".join(f"{AUROC_LABELS[n]} {a[n]['mean']:.3f}" for n in inverted) + ".")
    if chance:
        out.append("- At chance or close to it: " + ", ".join(f"{AUROC_LABELS[n]} {a[n]['mean']:.3f}"
                                                              for n in chance) + ".")
    acc = summary["accuracy"]
    full = acc["random"][str(1.0)]
    out.append(f"- DPO on the full data ({args.low_quality_fraction:.0%} low quality): {pct(full)}; the pretrained "
               f"model: {pct(summary['pretrained_digit_accuracy'])}.")
    clean_key = str(min((f for f in args.fractions if f >= 1 - args.low_quality_fraction - 1e-9), default=1.0))
    if float(clean_key) < 1:
        oracle = acc["oracle"][clean_key]
        out.append(f"- The oracle at {float(clean_key):.0%} (the clean rows"
                   f"{' only' if abs(float(clean_key) - (1 - args.low_quality_fraction)) < 1e-9 else ' first'}): "
                   f"{pct(oracle)}, {relative(summary['relative_to_full']['oracle'][clean_key])} of full data"
                   + (" (one seed: no spread to compare with)." if len(args.seeds) < 2 else
                      ": data quality matters here (above 100% by more than the seed std)."
                      if summary["relative_to_full"]["oracle"][clean_key]["mean"]
                      - summary["relative_to_full"]["oracle"][clean_key]["std"] > 1 else
                      ": within the seed spread of full data, so data quality matters little in this set-up."))
    for method in METHODS:
        c = check.get(method)
        if c is None:
            continue
        random = acc["random"][str(c["fraction"])]
        key = str(c["fraction"])
        out.append(f"- {LABELS[method]}: best at <= 50% is {c['fraction']:.0%} kept, "
                   f"{pct(acc[method][key])} ({c['relative']:.0%} ± {c['relative_std']:.0%} of full data"
                   + (f"; random at that size {pct(random)}" if method != "random" else "")
                   + f"; kept rows {summary['low_quality_kept'][method][key]['mean']:.0%} low quality, "
                   f"{summary['pretrained_names_chosen_kept'][method][key]['mean']:.0%} already answered as chosen)"
                   + ("; beats random by more than the seed spread" if c["beats_random_beyond_spread"]
                      and method != "random" else "") + ".")
    return out


def plot(summary: dict, args: argparse.Namespace, path: Path) -> None:
    """Plot accuracy (absolute, relative to full data) vs kept fraction, and each score's AUROC, to the png `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rx, bx) = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    x = np.array(args.fractions) * 100
    keys = [str(f) for f in args.fractions]
    for panel, table in ((ax, "accuracy"), (rx, "relative_to_full")):
        for method in METHODS:
            mean = np.array([summary[table][method][k]["mean"] for k in keys])
            std = np.array([summary[table][method][k]["std"] for k in keys])
            style = "--" if method in ("random", "oracle") else "-"
            panel.plot(x, mean, style, marker="o", markersize=3, color=COLORS[method], label=LABELS[method])
            panel.fill_between(x, mean - std, mean + std, color=COLORS[method], alpha=0.12)
        panel.set_xlabel("kept fraction of the preference rows (%)")
    ax.axhline(summary["pretrained_digit_accuracy"]["mean"], color="black", linewidth=1, linestyle=":",
               label="pretrained (no DPO)")
    ax.set(ylabel="held-out digit accuracy after DPO",
           title=f"Accuracy (mean ± std over {len(args.seeds)} seeds)")
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    rx.axhline(PAPER_TARGET, color="black", linewidth=0.8, linestyle="-.", label="110% (the paper's claim)")
    rx.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    rx.axvspan(x.min() - 2, PAPER_MAX_FRACTION * 100, color="black", alpha=0.04)
    rx.set(ylabel="accuracy / full-data accuracy (same seed)",
           title="Relative to full data (shaded: <= 50% of the data)")
    rx.legend(frameon=False, fontsize=7, loc="lower right", handles=rx.get_lines()[-2:-1])
    names = list(AUROC_SCORES)
    means = [summary["auroc"][n]["mean"] for n in names]
    stds = [summary["auroc"][n]["std"] for n in names]
    colors = [COLORS.get(n, COLORS.get(n.replace("prompt_only", "saev"), "#999999")) for n in names]
    bars = bx.barh(range(len(names)), means, xerr=stds, color=colors, capsize=3)
    for bar, n in zip(bars, names):
        if n.startswith("prompt_only"):
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    bx.axvline(0.5, color="black", linewidth=1, linestyle=":")
    short = {**LABELS, **{f"saev_{s}": f"{LABELS[f'saev_{s}']} (+ chosen)" for s in ("cosine", "l0", "cooccur_l0")},
             **{f"prompt_only_{s}": f"{LABELS[f'saev_{s}']} (prompt only)" for s in ("cosine", "l0", "cooccur_l0")}}
    bx.set_yticks(range(len(names)), [short[n] for n in names], fontsize=8)
    bx.invert_yaxis()
    bx.set(xlim=(0, 1), xlabel="AUROC, clean vs low-quality rows (0.5 = chance)", title="Scores as detectors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, record: dict, args: argparse.Namespace) -> None:
    """Write the report (set-up, AUROC and accuracy tables, findings) to the markdown `path`."""
    summary, records, check = record["summary"], record["seeds"], record["paper_check"]
    reads = ("the prompt, the image and the chosen answer" if args.saev_reads == "prompt+chosen"
             else "the prompt and the image (as the paper)")
    corruption = ("their image is another digit's, so the chosen answer is wrong for the image" if args.corruption
                  == "swap" else "their image is random pixels")
    lines = [
        "# Data filtering with SAE-V scores, in miniature",
        "",
        "Generated by `python benchmarks/filtering_experiment.py` (defaults); every number, per seed, is in "
        "`filtering_experiment.json`, the plot in `filtering_experiment.png`. Mean ± sample standard deviation over "
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); each seed runs the whole pipeline.",
        "",
        headline(summary, check, args),
        "",
        "## Set-up",
        "",
        f"- **MLLM**: the tiny LLaVA of `saev_hf.testing.tiny_models`, pretrained on captions of {args.pretrain_digits} "
        f"scikit-learn digits ({args.pretrain_steps} steps): held-out accuracy "
        f"{pct(summary['pretrained_digit_accuracy'])} (chance 10%), weak on purpose so that DPO has something to "
        "teach.",
        f"- **SAE-V**: decoder layer {args.layer}, d_sae {records[0]['d_sae']}, {args.saev_steps} steps on captions of "
        f"{args.saev_digits} other digits, delta {args.delta}; "
        f"{summary['num_weighted_features']['mean']:.0f} ± {summary['num_weighted_features']['std']:.0f} features "
        "get a cross-modal weight.",
        f"- **Preference rows**: {args.num_pairs} further digits, \"what digit is this ?\", chosen \"a handwritten "
        f"digit <label> .\", rejected another digit; {args.low_quality_fraction:.0%} of them (known) are low "
        f"quality: {corruption}.",
        f"- **Scores** (keep the highest): the SAE-V's three, reading {reads}; the pretrained model's log-likelihood "
        "of the chosen answer; random; the oracle (clean rows first).",
        f"- **DPO**: TRL's DPOTrainer via `saev_hf.alignment.dpo.train_dpo`, full fine-tuning, {args.dpo_steps} steps for every "
        f"subset (batch {args.dpo_batch_size}, lr {args.dpo_learning_rate}, constant, beta 0.1), from the same "
        f"pretrained model; then held-out accuracy on {args.eval_digits} digits no stage saw (the ten captions ranked "
        "by likelihood). Kept fraction 100% is one shared run on the full data.",
        "",
        "## Can each score tell clean rows from low-quality ones?",
        "",
        auroc_table(summary, records),
        "",
        "## Held-out digit accuracy after DPO on the kept rows",
        "",
        method_table(summary, args, "accuracy", pct),
        "",
        "Relative to the same seed's full-data run (the paper's \"% of full-data performance\"):",
        "",
        method_table(summary, args, "relative_to_full", relative),
        "",
        "Low-quality share of the kept rows:",
        "",
        method_table(summary, args, "low_quality_kept", lambda s: f"{s['mean']:.0%}"),
        "",
        "Share of the kept rows whose chosen answer the pretrained model already gives (its best of the ten captions "
        "for the row's image): rows DPO has least to teach from.",
        "",
        method_table(summary, args, "pretrained_names_chosen_kept", lambda s: f"{s['mean']:.0%}"),
        "",
        "## What this shows",
        "",
        *findings(summary, check, records, args),
        "",
        "![accuracy and AUROC](filtering_experiment.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def run_experiment(args: argparse.Namespace) -> tuple[dict, list[SeedRun]]:
    """Run every seed, write the md, json and png to `args.output_dir`; return the record and the seeds' runs."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        seed_runs = [run_seed(seed, args, workdir) for seed in args.seeds]
    records = [run.record for run in seed_runs]
    summary = summarise(records, args)
    record = {"arguments": vars(args), "seeds": records, "summary": summary, "paper_check": paper_check(summary, args)}
    record["headline"] = headline(summary, record["paper_check"], args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # wall-clock time stays out of the files: on one thread the rest is deterministic (two runs gave equal numbers)
    (output / "filtering_experiment.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(summary, args, output / "filtering_experiment.png")
    write_markdown(output / "filtering_experiment.md", record, args)
    log(f"done in {time.perf_counter() - started:.0f} s; wrote filtering_experiment.{{md,json,png}} to {output}")
    return record, seed_runs


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment and print its markdown report; return the record."""
    args = parse_args(argv)
    record, _ = run_experiment(args)
    print((Path(args.output_dir) / "filtering_experiment.md").read_text())
    return record


if __name__ == "__main__":
    main()
