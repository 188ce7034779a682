"""Benchmark: the paper's data-filtering sweep on the grounded scene miniature (issue 12, item 6).

The SAE-V paper keeps the top 10%...100% of a preference dataset by each SAE-V score, runs DPO on what is kept and
reports more than 110% of the full-data performance with less than 50% of the data. This repeats it on the grounded
tiny LLaVA (`saev_hf.demo`), whose preference rows have a KNOWN low-quality part of the kinds the paper names
(hallucinated answers about absent objects, swapped images; `saev_hf.demo.scenes.preference_rows`).

Per seed (the SAE-V, the rows, the held-out questions and DPO's batch order are seeded by it; the MLLM is the one in
`--model-dir`, by default the package's embedded one):

1. An SAE-V on decoder layer `--layer` (`train_scene_saev`), weighted twice on the same rows: the paper's pooled
   top-K rule and the per-modality rule (`WeightingArguments.top_k_pool`, a documented option).
2. Scores of every preference row (higher = keep):
   - the paper's three, prompt-only (question and image, the paper's default): `saev_cosine` (pooled weights),
     `saev_l0`, `saev_cooccur_l0`; the same three reading the chosen answer too (`PromptFormat(response_column=
     "chosen")`, an option) are reported as detectors (AUROC) only;
   - beyond the paper: `saev_cosine_per_modality` (cosine score with per-modality weights);
   - baselines: `chosen_log_likelihood` (the model's own log-probability of the chosen answer),
     `image_text_similarity` (the model's own image-text similarity, the analogue of a CLIP score; see
     `saev_hf.scoring.baselines`), `random`, and the `oracle` (clean rows first).
3. For each score and kept fraction < 1, DPO from the same model on the top fraction (`filter_by_score`,
   `dpo_and_evaluate`: the same steps for every subset); kept fraction 1.0 is one shared full-data run. Each trained
   model answers `--eval-rows` held-out questions (digit scans no training stage saw; 25% about absent objects):
   accuracy and hallucination rate.

Mean ± sample std over `--seeds`. Writes `scene_filtering.md`, `scene_filtering.json` (every number, per seed) and
`scene_filtering.png` to `--output-dir`. One thread.

    python benchmarks/scene_filtering.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import mean_std  # noqa: E402

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

import datasets  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from saev_hf.demo.run import load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.gate import auroc  # noqa: E402
from saev_hf.demo.grounded_llava import answer_accuracy  # noqa: E402
from saev_hf.demo.preference import SceneDPOArguments, dpo_and_evaluate  # noqa: E402
from saev_hf.demo.scene_saev import SceneSAEVArguments, train_scene_saev, weigh_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows  # noqa: E402
from saev_hf.alignment import FilterArguments, filter_by_score  # noqa: E402
from saev_hf.data import PromptFormat  # noqa: E402
from saev_hf.scoring import SAEVScorer, ScorerArguments  # noqa: E402

METHODS = {  # method -> the score column it keeps the top of
    "saev_cosine": "saev_cosine_score",
    "saev_l0": "saev_l0",
    "saev_cooccur_l0": "saev_cooccur_l0",
    "saev_cosine_per_modality": "saev_cosine_per_modality",
    "chosen_log_likelihood": "chosen_log_likelihood",
    "image_text_similarity": "image_text_similarity",
    "random": "random_score",
    "oracle": "oracle",
}
DETECTORS = {**METHODS, "saev_cosine_with_chosen": "with_chosen_cosine", "saev_l0_with_chosen": "with_chosen_l0",
             "saev_cooccur_l0_with_chosen": "with_chosen_cooccur_l0"}
LABELS = {
    "saev_cosine": "SAE-V cosine (paper)", "saev_l0": "SAE-V L0 (paper)", "saev_cooccur_l0": "SAE-V co-occ. L0 (paper)",
    "saev_cosine_per_modality": "SAE-V cosine, per-modality weights", "chosen_log_likelihood": "answer log-likelihood",
    "image_text_similarity": "image-text similarity (model's own)", "random": "random", "oracle": "oracle",
    "saev_cosine_with_chosen": "SAE-V cosine + chosen", "saev_l0_with_chosen": "SAE-V L0 + chosen",
    "saev_cooccur_l0_with_chosen": "SAE-V co-occ. L0 + chosen",
}
SAEV_METHODS = ("saev_cosine", "saev_l0", "saev_cooccur_l0", "saev_cosine_per_modality")
COLORS = {"saev_cosine": "#1f77b4", "saev_l0": "#17becf", "saev_cooccur_l0": "#9467bd",
          "saev_cosine_per_modality": "#2ca02c", "chosen_log_likelihood": "#ff7f0e",
          "image_text_similarity": "#8c564b", "random": "#7f7f7f", "oracle": "#d62728"}
PAPER_TARGET, PAPER_MAX_FRACTION = 1.10, 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (--fractions checked to include 1.0)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--model-dir", default=None, help="A grounded LLaVA folder (default: the embedded one).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--num-pairs", type=int, default=600)
    parser.add_argument("--low-quality-fraction", type=float, default=0.4)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--expansion-factor", type=int, default=2)
    parser.add_argument("--saev-steps", type=int, default=1000)
    parser.add_argument("--dpo", default="{}", help="JSON overrides of SceneDPOArguments (e.g. steps, lr).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="Methods DPO is run for (every score's AUROC is reported regardless).")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per scorer forward.")
    parser.add_argument("--no-dpo", action="store_true",
                        help="Score and filter only: AUROCs and the low-quality share each score keeps, no DPO run "
                             "(for a model on which DPO has not been shown to matter: issue 12's item 5).")
    args = parser.parse_args(argv)
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1.0 (the full-data run every method is compared with).")
    return args


def log(message: str) -> None:
    """Print `message` with the script's name and the time, flushed."""
    print(f"[scene_filtering {time.strftime('%H:%M:%S')}] {message}", flush=True)


def scored_rows(rows: list[dict], model, processor, sae, sae_per_modality, seed: int, batch_size: int):
    """The preference rows as a Dataset with every score column of step 2 and their index (``row``)."""
    columns = ("images", "prompt", "chosen", "rejected", "low_quality", "quality", "kind", "present")
    dataset = datasets.Dataset.from_list([{key: row[key] for key in columns} for row in rows])
    dataset = dataset.add_column("row", list(range(len(rows))))
    scored = dataset.map(SAEVScorer(sae, model, processor), batched=True, batch_size=batch_size)
    scored = scored.map(SAEVScorer(sae_per_modality, model, processor, args=ScorerArguments(
        scores=["cosine"], cosine_column="saev_cosine_per_modality")), batched=True, batch_size=batch_size)
    scored = scored.map(SAEVScorer(sae, model, processor, prompt_format=PromptFormat(response_column="chosen"),
                                   args=ScorerArguments(cosine_column="with_chosen_cosine", l0_column="with_chosen_l0",
                                                        cooccur_l0_column="with_chosen_cooccur_l0")),
                        batched=True, batch_size=batch_size)
    baselines = SAEVScorer(None, model, processor,
                           args=ScorerArguments(scores=["answer_log_likelihood", "image_text_similarity"]))
    scored = scored.map(baselines, batched=True, batch_size=16).rename_column("answer_log_likelihood",
                                                                              "chosen_log_likelihood")
    scored = scored.add_column("random_score", np.random.default_rng([seed, 3]).random(len(rows)).tolist())
    return scored.add_column("oracle", [0.0 if row["low_quality"] else 1.0 for row in rows])


QUALITY_GROUPS = {
    "hallucination": "clean rows vs hallucination rows",
    "swap": "clean rows vs swapped-image rows",
    "hallucination_vs_faithful_absent": "clean rows about an absent object (answered \"none\"/\"no\") vs hallucination "
                                        "rows (the same kind of question, answered confidently)",
}


def quality_groups(scored: datasets.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per entry of `QUALITY_GROUPS`: (the rows it compares, which of them are the good ones), so that each score's
    AUROC can be read per kind of low-quality row and, for hallucinations, against the clean rows a prompt-only score
    cannot tell them from (their questions name an object the image lacks too)."""
    quality = np.array(scored["quality"])
    clean = quality == "clean"
    absent_clean = clean & ~np.array(scored["present"], dtype=bool)
    return {"hallucination": (clean | (quality == "hallucination"), clean),
            "swap": (clean | (quality == "swap"), clean),
            "hallucination_vs_faithful_absent": (absent_clean | (quality == "hallucination"), absent_clean)}


def run_seed(seed: int, args: argparse.Namespace, model, processor, scans: DigitScans, workdir: Path) -> dict:
    """One seed's record: SAE-V, scored rows, AUROCs, DPO on each method's kept fractions (unless --no-dpo)."""
    started = time.perf_counter()
    eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([seed, 99]), absent_fraction=0.25)
    base = answer_accuracy(model, processor, eval_rows)
    saev_args = SceneSAEVArguments(layer=args.layer, expansion_factor=args.expansion_factor, steps=args.saev_steps,
                                   top_k_pool="pooled", seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the SAE-V trainer's log lines
        sae = train_scene_saev(model, processor, scans, saev_args, workdir / f"saev-{seed}", progress=False)
    sae_per_modality = weigh_scene_saev(copy.deepcopy(sae), model, processor, scans,
                                        replace(saev_args, top_k_pool="per_modality"), progress=False)
    rows = preference_rows(scans, args.num_pairs, "train", np.random.default_rng([seed, 5]),
                           low_quality_fraction=args.low_quality_fraction)
    scored = scored_rows(rows, model, processor, sae, sae_per_modality, seed, args.batch_size)
    clean = ~np.array(scored["low_quality"], dtype=bool)
    values = {name: np.array(scored[column], dtype=float) for name, column in DETECTORS.items()}
    groups = quality_groups(scored)
    log(f"seed {seed}: base accuracy {base['accuracy']:.1%}, hallucination {base['hallucination_rate']:.1%}; "
        f"weighted features pooled {int(sae.has_feature_weight.sum())}, per-modality "
        f"{int(sae_per_modality.has_feature_weight.sum())}; AUROC "
        + ", ".join(f"{name} {auroc(clean, v):.3f}" for name, v in values.items()))
    dpo_args = SceneDPOArguments(**{"seed": seed, **json.loads(args.dpo)})

    def train(subset: datasets.Dataset) -> dict:
        indices = list(subset["row"])
        kept = {"rows": len(indices), "low_quality_fraction": float(np.mean(~clean[indices]))}
        if args.no_dpo:
            return kept
        with contextlib.redirect_stdout(io.StringIO()):  # the DPO trainer's per-step log dicts
            trained = dpo_and_evaluate(model, processor, [rows[i] for i in indices], eval_rows, dpo_args,
                                       workdir / "dpo")
        return {"accuracy": trained["accuracy"], "hallucination_rate": trained["hallucination_rate"],
                "by_kind": trained["by_kind"], **kept}

    partial = [f for f in args.fractions if f < 1]
    # a score on which every row ties cannot choose a top fraction (filter_by_score refuses): no run, recorded
    uninformative = [m for m in args.methods if np.ptp(values[m]) == 0]
    runs: dict = {method: {str(f): None for f in partial} for method in args.methods}
    informative = [m for m in args.methods if m not in uninformative]
    with tqdm(total=1 + len(informative) * len(partial), desc=f"seed {seed}: DPO runs", unit="run",
              disable=args.no_dpo) as bar:
        full = train(scored)
        bar.update()
        for fraction in partial:
            for method in informative:
                kept = filter_by_score(scored, FilterArguments(column=METHODS[method], fraction=fraction))
                runs[method][str(fraction)] = train(kept)
                bar.update()
    for method in args.methods:  # the one full-data run is every method's 100% point
        runs[method][str(1.0)] = dict(full)
    if not args.no_dpo:
        log(f"seed {seed}: full data accuracy {full['accuracy']:.1%}, hallucination "
            f"{full['hallucination_rate']:.1%}; {time.perf_counter() - started:.0f} s")
    return {"seed": seed, "base": base, "num_rows": len(rows), "num_low_quality": int((~clean).sum()),
            "d_sae": sae.config.d_sae, "weighted_features": {"pooled": int(sae.has_feature_weight.sum()),
                                                             "per_modality": int(sae_per_modality.has_feature_weight.sum())},
            "auroc": {name: auroc(clean, v) for name, v in values.items()}, "uninformative": uninformative,
            "auroc_by_quality": {name: {group: auroc(good[keep], v[keep]) if 0 < good[keep].sum() < keep.sum() else None
                                        for group, (keep, good) in groups.items()}  # None: a side with no rows
                                 for name, v in values.items()},
            "score_means": {name: {"clean": float(v[clean].mean()), "low_quality": float(v[~clean].mean())}
                            for name, v in values.items()},
            "runs": runs}


def summarise(records: list[dict], args: argparse.Namespace) -> dict:
    """Mean ± std over seeds of each score's AUROC and, per method and kept fraction, of its run's `field` (None
    where no seed has it: a tied score, or no DPO with `--no-dpo`)."""
    keys = [str(f) for f in args.fractions]

    def value(run: dict | None, field: str, full: dict) -> float | None:
        if run is None or field != "low_quality_fraction" and "accuracy" not in run:
            return None
        if field == "relative_to_full":
            return run["accuracy"] / full["accuracy"]
        return run[field]

    def over_seeds(field: str) -> dict:
        return {m: {k: mean_std([value(r["runs"][m][k], field, r["runs"][m]["1.0"]) for r in records]) for k in keys}
                for m in args.methods}

    return {
        "auroc": {name: mean_std([r["auroc"][name] for r in records]) for name in DETECTORS},
        "auroc_by_quality": {name: {group: mean_std([r["auroc_by_quality"][name][group] for r in records])
                                    for group in QUALITY_GROUPS} for name in DETECTORS},
        "accuracy": over_seeds("accuracy"),
        "hallucination_rate": over_seeds("hallucination_rate"),
        "relative_to_full": over_seeds("relative_to_full"),
        "low_quality_kept": over_seeds("low_quality_fraction"),
        "base_accuracy": mean_std([r["base"]["accuracy"] for r in records]),
        "base_hallucination_rate": mean_std([r["base"]["hallucination_rate"] for r in records]),
    }


def paper_check(summary: dict, args: argparse.Namespace) -> dict:
    """Per method: its best kept fraction <= 50% by mean accuracy relative to the same seed's full-data run, whether
    it reaches the paper's 110%, and whether it beats random at that fraction by more than the two stds summed."""
    small = [str(f) for f in args.fractions if f <= PAPER_MAX_FRACTION]
    out = {}
    for method in args.methods if small and not args.no_dpo else ():
        rel = summary["relative_to_full"][method]
        if all(rel[k] is None for k in small):
            continue
        best = max((k for k in small if rel[k] is not None), key=lambda k: rel[k]["mean"])
        mine = rel[best]
        random = summary["relative_to_full"].get("random", {}).get(best)
        out[method] = {"fraction": float(best), "relative": mine["mean"], "relative_std": mine["std"],
                       "reaches_110": mine["mean"] >= PAPER_TARGET,
                       "beats_random_beyond_spread": bool(random and len(mine["values"]) > 1 and method != "random"
                                                          and mine["mean"] - random["mean"]
                                                          > mine["std"] + random["std"])}
    return out


def headline(summary: dict, check: dict, args: argparse.Namespace) -> str:
    """The report's verdict on the paper's claim (>= 110% of full-data accuracy at <= 50% of the data)."""
    if args.no_dpo:
        return ("**No DPO run** (`--no-dpo`): the scores as detectors of the low-quality rows and what each keeps; the "
                "paper's claim (>= 110% of full-data performance at <= 50% of the data) is not tested.")
    saev = [m for m in SAEV_METHODS if m in check]
    if not saev:
        return "No SAE-V method at a kept fraction <= 50% was run: the paper's claim is not tested."
    ranked = sorted(check, key=lambda m: -check[m]["relative"])
    best = max(saev, key=lambda m: check[m]["relative"])
    b = check[best]
    numbers = (f"the best SAE-V filter at <= 50% of the data is {LABELS[best]} at {b['fraction']:.0%}: "
               f"{b['relative']:.0%} ± {b['relative_std']:.0%} of the full-data accuracy; best score overall at "
               f"<= 50%: {LABELS[ranked[0]]} ({check[ranked[0]]['relative']:.0%})")
    if b["reaches_110"] and b["beats_random_beyond_spread"]:
        return f"**Reproduced**: {numbers}, beyond the seed spread of random selection at the same size."
    if b["reaches_110"]:
        return f"**Only in form**: {numbers}, but random selection at that size is within the seed spread."
    return f"**Not reproduced**: {numbers}."


def pct(stat: dict | None) -> str:
    """`stat` as 'mean ± std', in percent; '—' when it is None."""
    return "—" if stat is None else f"{stat['mean']:.1%} ± {stat['std']:.1%}"


def table(summary: dict, args: argparse.Namespace, key: str, fmt) -> str:
    """The markdown table of `summary[key]`: a row per method, a column per kept fraction, cells by `fmt`."""
    keys = [str(f) for f in args.fractions]
    lines = ["| method | " + " | ".join(f"keep {float(k):.0%}" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {LABELS[m]} | " + " | ".join(fmt(summary[key][m][k]) for k in keys) + " |" for m in args.methods]
    return "\n".join(lines)


def auroc_table(summary: dict, records: list[dict]) -> str:
    """The markdown table of each score's AUROC, its verdict and its mean on clean and on low-quality rows."""
    lines = ["| score | AUROC (clean vs low quality) | verdict | mean, clean | mean, low quality |",
             "|---|---:|---|---:|---:|"]
    for name in DETECTORS:
        a = summary["auroc"][name]
        verdict = ("inverted" if a["mean"] < 0.45 else "chance" if a["mean"] < 0.55 else "separates")
        means = [statistics.fmean(r["score_means"][name][kind] for r in records) for kind in ("clean", "low_quality")]
        lines.append(f"| {LABELS[name]} | {a['mean']:.3f} ± {a['std']:.3f} | {verdict} | {means[0]:.4g} | "
                     f"{means[1]:.4g} |")
    return "\n".join(lines)


def plot(summary: dict, args: argparse.Namespace, path: Path) -> None:
    """Plot the kept low-quality share (and, with DPO, accuracy and hallucination) per method, and AUROCs, to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [("low_quality_kept", None, "low-quality share of the kept rows")]
    if not args.no_dpo:
        curves += [("accuracy", "base_accuracy", "held-out accuracy after DPO"),
                   ("hallucination_rate", "base_hallucination_rate", "held-out hallucination rate after DPO")]
    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(5.5 * len(curves) + 5, 4.4),
                             gridspec_kw={"width_ratios": [1.2] * len(curves) + [1]})
    x = np.array(args.fractions) * 100
    keys = [str(f) for f in args.fractions]
    for panel, (key, base, label) in zip(axes, curves):
        for method in args.methods:
            stats = [summary[key][method][k] or {"mean": np.nan, "std": np.nan} for k in keys]
            mean = np.array([s["mean"] for s in stats])
            std = np.array([s["std"] for s in stats])
            style = "--" if method in ("random", "oracle") else "-"
            panel.plot(x, mean, style, marker="o", markersize=3, color=COLORS[method], label=LABELS[method])
            panel.fill_between(x, mean - std, mean + std, color=COLORS[method], alpha=0.1)
        if base is not None:
            panel.axhline(summary[base]["mean"], color="black", linewidth=1, linestyle=":", label="before DPO")
        panel.set(xlabel="kept fraction of the preference rows (%)", ylabel=label,
                  title=f"{label} (mean ± std, {len(args.seeds)} seeds)")
    axes[0].legend(frameon=False, fontsize=7)
    names = list(DETECTORS)
    axes[-1].barh(range(len(names)), [summary["auroc"][n]["mean"] for n in names],
                 xerr=[summary["auroc"][n]["std"] for n in names], capsize=3,
                 color=[COLORS.get(n, COLORS.get(n.replace("_with_chosen", ""), "#999999")) for n in names])
    axes[-1].axvline(0.5, color="black", linewidth=1, linestyle=":")
    axes[-1].set_yticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    axes[-1].invert_yaxis()
    axes[-1].set(xlim=(0, 1), xlabel="AUROC, clean vs low quality (0.5 = chance)", title="Scores as detectors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def auroc_by_quality_table(summary: dict) -> str:
    """The markdown table of each score's AUROC per kind of low-quality row (`QUALITY_GROUPS`)."""
    groups = list(QUALITY_GROUPS)
    lines = ["| score | " + " | ".join(f"AUROC, {g.replace('_', ' ')}" for g in groups) + " |",
             "|---|" + "---:|" * len(groups)]
    for name in DETECTORS:
        cells = [summary["auroc_by_quality"][name][g] for g in groups]
        lines.append(f"| {LABELS[name]} | " + " | ".join("—" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f}"
                                                         for c in cells) + " |")
    return "\n".join(lines + ["", "Columns: " + "; ".join(f"*{g.replace('_', ' ')}*: {d}"
                                                         for g, d in QUALITY_GROUPS.items()) + "."])


def write_markdown(path: Path, record: dict, args: argparse.Namespace) -> None:
    """Write the report (set-up, AUROC tables, results per kept fraction) to the markdown `path`."""
    summary, records, check = record["summary"], record["seeds"], record["paper_check"]
    dpo = SceneDPOArguments(**json.loads(args.dpo))
    lines = [
        "# The paper's filtering sweep on the grounded scene miniature",
        "",
        f"`{record['command']}` ({record['minutes']:.0f} min, one thread); every number per seed in "
        "`scene_filtering.json`. Mean ± sample std over seeds " + ", ".join(map(str, args.seeds)) + ".",
        "",
        headline(summary, check, args),
        "",
        "## Set-up",
        "",
        f"- **MLLM**: {record['model']}: before DPO, held-out accuracy {pct(summary['base_accuracy'])}, hallucination "
        f"rate {pct(summary['base_hallucination_rate'])} ({args.eval_rows} held-out questions per seed, 25% about "
        "absent objects).",
        f"- **SAE-V**: layer {args.layer}, d_sae {records[0]['d_sae']}, {args.saev_steps} steps; weighted features: "
        f"pooled (paper) {statistics.fmean(r['weighted_features']['pooled'] for r in records):.0f}, per-modality "
        f"{statistics.fmean(r['weighted_features']['per_modality'] for r in records):.0f} (mean over seeds).",
        f"- **Preference rows**: {args.num_pairs} per seed, {args.low_quality_fraction:.0%} low quality (half "
        "hallucinated answers about absent objects, half swapped images).",
        "- **DPO**: not run (`--no-dpo`)." if args.no_dpo else
        f"- **DPO**: {dpo.steps} steps for every subset, batch {dpo.batch_size}, lr {dpo.learning_rate}, beta "
        f"{dpo.beta}{', LoRA' if dpo.lora else ', full fine-tuning'}"
        f"{f', plus TRL SFT loss on the chosen answer at weight {dpo.sft_weight:g} (as in RPO)' if dpo.sft_weight else ''}"
        "; kept fraction 100% is one shared run.",
        "",
        "## Can each score tell clean rows from low-quality ones?",
        "",
        auroc_table(summary, records),
        "",
        "Per kind of low-quality row:",
        "",
        auroc_by_quality_table(summary),
        "",
        *([f"Scores on which every row of a seed ties, so that no top fraction can be chosen (no DPO run; "
           f"\"—\" where no seed has one): " + "; ".join(f"seed {r['seed']}: {', '.join(r['uninformative'])}"
                                                       for r in records if r["uninformative"]) + ".", ""]
          if any(r["uninformative"] for r in records) else []),
        *([] if args.no_dpo else [
            "## Held-out accuracy after DPO on the kept rows",
            "",
            table(summary, args, "accuracy", pct),
            "",
            f"Before DPO the model answers {pct(summary['base_accuracy'])}; DPO on all rows (keep 100%) takes it "
            f"to {pct(mean_std([r['runs'][args.methods[0]]['1.0']['accuracy'] for r in records]))}: compare each "
            "filtered run with both.",
            "",
            "Relative to the same seed's full-data run (the paper's \"% of full-data performance\"):",
            "",
            table(summary, args, "relative_to_full",
                  lambda s: "—" if s is None else f"{s['mean']:.0%} ± {s['std']:.0%}"),
            "",
            "## Hallucination rate after DPO (questions about absent objects answered with a confident answer)",
            "",
            table(summary, args, "hallucination_rate", pct),
            ""]),
        "## Low-quality share of the kept rows",
        "",
        table(summary, args, "low_quality_kept", lambda s: "—" if s is None else f"{s['mean']:.0%}"),
        "",
        "![sweep](scene_filtering.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> dict:
    """Run every seed, write the md, json and png to args.output_dir; return the record."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    started = time.perf_counter()
    model, processor = load_grounded_llava(args.model_dir)
    recipe = load_recipe(args.model_dir)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    with tempfile.TemporaryDirectory() as workdir:
        records = [run_seed(seed, args, model, processor, scans, Path(workdir)) for seed in args.seeds]
    summary = summarise(records, args)
    record = {"command": "python benchmarks/scene_filtering.py " + " ".join(sys.argv[1:]),
              "model": args.model_dir or "the embedded grounded LLaVA", "arguments": vars(args), "seeds": records,
              "summary": summary, "paper_check": paper_check(summary, args),
              "minutes": (time.perf_counter() - started) / 60}
    record["headline"] = headline(summary, record["paper_check"], args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "scene_filtering.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(summary, args, output / "scene_filtering.png")
    write_markdown(output / "scene_filtering.md", record, args)
    log(f"wrote scene_filtering.{{md,json,png}} to {output}")
    return record


if __name__ == "__main__":
    arguments = parse_args()
    run(arguments)
    print((Path(arguments.output_dir) / "scene_filtering.md").read_text())
