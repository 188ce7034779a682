"""The report of `saev demo`: its plots (score distributions, held-out accuracy and hallucination per DPO subset) and
`report.md`, which leads with what the run found and never names an inverted score as the filter that helped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCORE_COLUMNS = {"cosine": "saev_cosine_score", "l0": "saev_l0", "cooccur_l0": "saev_cooccur_l0"}


def plot_score_histograms(path: Path, scores: dict[str, np.ndarray], clean: np.ndarray) -> None:
    """One histogram per score (names of `SCORE_COLUMNS`), clean and low-quality rows overlaid, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3))
    for ax, (name, values) in zip(np.atleast_1d(axes), scores.items()):
        edges = np.histogram_bin_edges(values, bins=25)
        ax.hist(values[clean], bins=edges, alpha=0.7, color="#4c72b0", label="clean")
        ax.hist(values[~clean], bins=edges, alpha=0.7, color="#dd5555", label="low quality")
        ax.set(title=SCORE_COLUMNS[name], xlabel="score", ylabel="rows")
    np.atleast_1d(axes)[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(output: Path, scores: dict, clean, results: dict, base: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_score_histograms(output / "scores.png", scores, clean)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(results)
    colours = ["#888888" if n in ("full", "random", "clean_only") else "#ff9d00" for n in names]
    for ax, key, label, reference in ((axes[0], "accuracy", "held-out accuracy", base["accuracy"]),
                                      (axes[1], "hallucination_rate", "hallucination rate",
                                       base["hallucination_rate"])):
        ax.bar(names, [results[n][key] for n in names], color=colours)
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="before DPO")
        ax.set(ylabel=label)
        plt.setp(ax.get_xticklabels(), rotation=25, fontsize=8)
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("DPO on each subset (same steps); lower hallucination is better")
    fig.tight_layout()
    fig.savefig(output / "dpo.png", dpi=100)
    plt.close(fig)


_RULES = {"pooled": "the paper's pooled top-K rule", "per_modality": "the per-modality top-K rule (not the paper's)"}


def _verdict(value: float) -> str:
    if value >= 0.6:
        return "separates"
    if value <= 0.4:
        return "**inverted** (prefers low-quality rows)"
    return "about chance"


def _filter_verdict(filters: dict[str, dict], aurocs: dict[str, float], rand: dict) -> str:
    """One line naming the SAE-V filter that beat the random subset by the most held-out accuracy, among scores that
    rank clean rows first (AUROC above 0.5: an inverted score is never called the best), or saying none did.
    `filters` holds each SAE-V filter's DPO run by score name (the keys of `aurocs`)."""
    gains = {n: r["accuracy"] - rand["accuracy"] for n, r in filters.items() if aurocs[n] > 0.5}
    helped = {n: g for n, g in gains.items() if g > 0}
    if not helped:
        return ("- No SAE-V filter that ranks clean rows first (AUROC above 0.5) beat a random subset of the same size "
                "in held-out accuracy in this run.")
    best = max(helped, key=helped.get)
    return (f"- The SAE-V filter that helped most: {SCORE_COLUMNS[best]}, {helped[best] * 100:+.1f} points of "
            f"accuracy against a random subset of the same size (AUROC {aurocs[best]:.3f}).")


def _map_section(brief: dict | None) -> list[str]:
    """The brief defect map's section: per defect kind, the best score of each group and SAE-V's verdict."""
    from .defects import brief_map_table

    if not brief:
        return []
    counts = brief["composition"]
    clean = sum(v for k, v in counts.items() if k.startswith("clean_"))
    lines = ["## Which kinds of low-quality data does SAE-V's filter catch?", "",
             f"{clean} clean rows and {min(v for k, v in counts.items() if not k.startswith('clean_'))} rows of each "
             "defect kind, built without any score (`saev_hf.demo.defects`): prompt defects (swap: another scene's "
             "image; blank and noise images; text_answerable: the scene in words before the question) and response "
             "defects (borrowed_hallucination, wrong_answer, false_refusal, flipped). AUROC of clean rows against each "
             "kind; per group, its best score on the kind (so an upper bound for the group). 'catches': AUROC >= "
             "0.75; 'inverted': <= 0.25 (the filter keeps the defect first). The full map over 3 seeds, with DPO: "
             "`benchmarks/results/defect_map.md`. `saev_polarity_jaccard` reads whether the chosen answer is a refusal "
             "and was designed on borrowed_hallucination and false_refusal; every other kind is held out for it.", "",
             *brief_map_table(brief)]
    return [*lines, ""]


def report(summary: dict) -> str:
    """The demo's report in Markdown, in words a newcomer can follow."""
    args, dpo, aurocs, base = summary["arguments"], summary["dpo"], summary["auroc"], summary["base"]
    full, clean, rand = dpo["full"], dpo["clean_only"], dpo["random"]
    filters = {n.removeprefix("saev_"): r for n, r in dpo.items() if n.startswith("saev_")}  # by score name
    tied = [SCORE_COLUMNS[n] for n in summary["uninformative_scores"]]
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    delta = lambda a, b: f"{(a - b) * 100:+.1f} points"  # noqa: E731
    brief = summary.get("defect_map")
    lines = [
        "# saev demo: SAE-V data filtering on a grounded miniature",
        "",
        *([f"**In brief: {brief['sentence']}**", ""] if brief else []),
        f"A grounded tiny LLaVA ({summary['model']}) answers questions about scenes of coloured handwritten digits: "
        f"held-out accuracy {pct(base['accuracy'])}, hallucination rate {pct(base['hallucination_rate'])} (share of "
        f"questions about absent objects answered with a confident answer instead of none / no). An SAE-V with "
        f"{summary['saev']['d_sae']} features on layer {summary['saev']['layer']} "
        f"({summary['saev']['weighted_features']} with a cross-modal weight by "
        f"{_RULES[summary['saev']['top_k_pool']]}, delta "
        f"{summary['saev']['cooccurrence_threshold']:.3f}) scores {summary['num_rows']} preference rows, of which "
        f"{summary['num_low_quality']} are low quality ({summary['low_quality_kinds']['hallucination']} prefer a "
        f"hallucinated answer about an absent object, {summary['low_quality_kinds']['swap']} have another scene's "
        f"image). Run time {summary['seconds'] / 60:.1f} min.",
        "",
        *_map_section(summary.get("defect_map")),
        "## Can the scores tell clean rows from low-quality ones?",
        "",
        "AUROC for 'clean' (1 = perfect, 0.5 = chance, below 0.5 = inverted). See `scores.png`.",
        "",
        "| score | AUROC | reading | mean (clean) | mean (low quality) |",
        "|---|---|---|---|---|",
        *(f"| {SCORE_COLUMNS[n]} | {a:.3f} | {_verdict(a)} | {summary['score_means'][n]['clean']:.4g} | "
          f"{summary['score_means'][n]['low_quality']:.4g} |" for n, a in aurocs.items()),
        "",
        "## What DPO did",
        "",
        f"The same {args['dpo_steps']} DPO steps (batch {args['dpo_batch_size']}, lr {args['dpo_learning_rate']}"
        + (f", plus TRL's SFT loss on the chosen answer at weight {args['dpo_sft_weight']:g} as in RPO"
           if args.get("dpo_sft_weight") else "")
        + ") from the same model on each subset; accuracy and hallucination rate on held-out scenes. See `dpo.png`.",
        "",
        "| subset | rows | low quality in it | accuracy | hallucination rate |",
        "|---|---|---|---|---|",
        f"| (before DPO) | - | - | {pct(base['accuracy'])} | {pct(base['hallucination_rate'])} |",
        *(f"| {n} | {r['rows']} | {r['low_quality_fraction']:.0%} | {pct(r['accuracy'])} | "
          f"{pct(r['hallucination_rate'])} |" for n, r in dpo.items()),
        "",
        "## What this run found",
        "",
        f"- DPO on the clean rows alone: accuracy {delta(clean['accuracy'], base['accuracy'])}, hallucination rate "
        f"{delta(clean['hallucination_rate'], base['hallucination_rate'])} against the model before DPO; on all "
        f"rows: accuracy {delta(full['accuracy'], base['accuracy'])}, hallucination rate "
        f"{delta(full['hallucination_rate'], base['hallucination_rate'])}.",
        *(f"- SAE-V filter by {SCORE_COLUMNS[n]} (keep {args['keep_fraction']:.0%}, AUROC "
          f"{aurocs[n]:.3f}): accuracy {delta(r['accuracy'], rand['accuracy'])} and hallucination rate "
          f"{delta(r['hallucination_rate'], rand['hallucination_rate'])} against a random subset of the same size."
          for n, r in filters.items()),
        *([f"- Every row has the same {', '.join(tied)}: no filter by it (it would keep rows by their index)."]
          if tied else []),
        *([f"- Inverted scores (AUROC below 0.4, they keep low-quality rows first): "
           f"{', '.join(SCORE_COLUMNS[n] for n, a in aurocs.items() if a <= 0.4)}."]
          if any(a <= 0.4 for a in aurocs.values()) else []),
        _filter_verdict(filters, aurocs, rand),
        "- One seed: differences of a few points are within noise; `benchmarks/` holds multi-seed experiments.",
    ]
    return "\n".join(lines) + "\n"
