"""Benchmark: where SAE-V's filter works and where it cannot, a map of defect kinds on the grounded miniature (issue 25).

Rows are built independently of any score (`saev_hf.demo.defects`): clean preference rows about scenes, and defects
of 4 prompt kinds (swapped image, blank image, noise image, question answerable from the text) and 4 response kinds
(borrowed hallucination, wrong answer about a present object, false refusal, flipped preference). Per seed (the
SAE-V, the rows, the held-out questions and DPO's order are seeded by it; the MLLM is the embedded grounded LLaVA):

1. An SAE-V trained as the demo's (`DemoArguments().saev_arguments()`, overrides with `--saev`).
2. For each share of clean rows about absent objects (`--absent-shares`): a pool of `--clean` clean rows and
   `--per-kind` rows of each defect kind, every row scored once by `SAEVScorer`: the paper's three (prompt-only), the
   two beyond it (`cooccur_jaccard`, prompt-only; `polarity_jaccard`, which reads whether the chosen answer is a
   refusal), and the baselines `length`, `answer_log_likelihood` (chosen), `ifd` (Li et al.'s rule: IFD > 1 last),
   `image_text_similarity` (the model's own; no CLIP checkpoint exists offline), `random` and the `oracle`.
   AUROC of every score, clean vs each defect kind, vs all prompt defects, vs all response defects, and per kind of
   clean row (present object, absent object, count).
3. With `--dpo`: on the prompt-defect mix and the response-defect mix (the pool at absent share 0.25: all its clean
   rows and the defects of that family, 40% defects), DPO from the same model on the top `--fractions` by each
   `--methods` score, on a random subset, on a random subset of exactly the composition of SAE-V's kept subset
   (`composition_matched`, matched to `--matched-to`'s subset), and on all rows. Each trained model answers
   `--eval-rows` held-out questions (accuracy, hallucination rate), and its mean cosine score (the paper's
   model-level score: `model_cosine_score` of the seed's SAE-V weighted anew with that model) is recorded, for its
   rank correlation with accuracy across the trained models.

Design split of the scores beyond the paper: `cooccur_jaccard` was designed, before any measurement, against the
`noise` defect (an image firing many features earns co-occurrence by volume); `polarity_jaccard` against
`borrowed_hallucination` and `false_refusal`. Their figures on the other kinds are the held-out ones.

Writes `defect_map.md` / `.json` / `.png` to `--output-dir`. One thread.

    python benchmarks/defect_map.py                 # the AUROC map, 3 seeds
    python benchmarks/defect_map.py --dpo           # and the DPO sweep on both mixes
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, mean_std, output_path  # noqa: E402

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import datasets  # noqa: E402

from saev_hf.activations.reader import LayerReader  # noqa: E402
from saev_hf.alignment import FilterArguments, filter_by_score  # noqa: E402
from saev_hf.demo.defects import (  # noqa: E402
    CLEAN_KINDS,
    DEFECTS,
    FAMILIES,
    MAP_SCORES,
    PROMPT_ONLY_SCORES,
    brief_map,
    brief_map_table,
    calibrate_polarity_threshold,
    composition,
    composition_matched,
    defect_aurocs,
    defect_rows,
    defect_scores,
)
from saev_hf.demo.grounded_llava import answer_accuracy  # noqa: E402
from saev_hf.demo.preference import SceneDPOArguments, dpo_and_evaluate  # noqa: E402
from saev_hf.demo.run import DemoArguments, load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.scene_saev import scene_weighting_rows, train_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402
from saev_hf.weighting import WeightingArguments, compute_feature_weights, model_cosine_score  # noqa: E402

SCORES = MAP_SCORES
PROMPT_ONLY = PROMPT_ONLY_SCORES
MIXES = FAMILIES


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (refusing a --matched-to method that --methods does not run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_output_dir(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clean", type=int, default=600, help="Clean rows per pool.")
    parser.add_argument("--per-kind", type=int, default=100, help="Rows of each defect kind per pool.")
    parser.add_argument("--absent-shares", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--saev", type=json.loads, default={}, help="JSON of SceneSAEVArguments overrides.")
    parser.add_argument("--dpo", action="store_true", help="Also run the DPO sweep on both mixes.")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=["saev_cosine", "saev_cooccur_l0", "saev_cooccur_jaccard",
                                                          "saev_polarity_jaccard", "answer_log_likelihood",
                                                          "image_text_similarity", "random", "oracle"])
    parser.add_argument("--matched-to", type=json.loads,
                        default={"prompt": "saev_cooccur_jaccard", "response": "saev_polarity_jaccard"},
                        help="JSON: per mix, the SAE-V score whose kept subsets the composition-matched random "
                             "subsets copy.")
    parser.add_argument("--dpo-steps", type=int, default=DemoArguments.dpo_steps)
    parser.add_argument("--dpo-sft-weight", type=float, default=DemoArguments.dpo_sft_weight,
                        help="Weight of TRL's SFT loss added to DPO's, as the demo's (0: plain DPO).")
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--weighting-rows", type=int, default=300,
                        help="Held-out prompt-only rows each DPO-trained model's mean cosine score is computed on.")
    parser.add_argument("--name", default="defect_map")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="Instead of running: merge the seeds of these result files (runs of single seeds made "
                             "side by side, one per core) into one report.")
    args = parser.parse_args(argv)
    missing = sorted(set(args.matched_to.values()) - set(args.methods))
    if args.dpo and missing:
        parser.error(f"--matched-to names {missing}, which --methods does not run: add them to --methods.")
    return args


def mean_model_cosine(sae, model, processor, weighting, layer: int) -> float:
    """The paper's model-level score of `model`: `sae`'s weights (on a copy) computed anew with it."""
    copy_of = copy.deepcopy(sae)
    weights = compute_feature_weights(copy_of, LayerReader(model, processor, layer=layer), weighting,
                                      WeightingArguments(num_examples=None, batch_size=32,
                                                         top_k_pool=copy_of.config.feature_weights_info["top_k_pool"]),
                                      store=False)
    return model_cosine_score(weights)


def dpo_sweep(rows, values, sae, model, processor, eval_rows, weighting, args, seed, layer, output) -> dict:
    """DPO on each mix's kept subsets; returns per mix: base, full and per method and fraction the results."""
    dpo_args = SceneDPOArguments(steps=args.dpo_steps, batch_size=DemoArguments.dpo_batch_size,
                                 learning_rate=DemoArguments.dpo_learning_rate, sft_weight=args.dpo_sft_weight,
                                 seed=seed)
    results = {}
    for family, kinds in MIXES.items():
        in_mix = [i for i, row in enumerate(rows) if row["quality"] == "clean" or row["quality"] in kinds]
        mix = [rows[i] for i in in_mix]
        mix_values = {name: score[in_mix] for name, score in values.items()}
        numbered = datasets.Dataset.from_dict({"row": list(range(len(mix))),
                                               **{name: list(score) for name, score in mix_values.items()}})
        subsets = {("full", 1.0): list(range(len(mix)))}
        rng = np.random.default_rng([seed, 41])
        for fraction in args.fractions:
            for method in args.methods:
                if method == "random":
                    kept = sorted(rng.choice(len(mix), size=round(fraction * len(mix)), replace=False).tolist())
                else:
                    kept = sorted(filter_by_score(numbered, FilterArguments(column=method, fraction=fraction))["row"])
                subsets[(method, fraction)] = kept
            subsets[("matched_random", fraction)] = composition_matched(mix, subsets[(args.matched_to[family],
                                                                                       fraction)], rng)
        runs = {}
        for (method, fraction), kept in subsets.items():
            began = time.perf_counter()
            trained = dpo_and_evaluate(model, processor, [mix[i] for i in kept], eval_rows, dpo_args, output,
                                       return_model=True)
            policy = trained.pop("model")
            runs[f"{method}@{fraction}"] = {
                "method": method, "fraction": fraction, "rows": len(kept),
                "accuracy": trained["accuracy"], "hallucination_rate": trained["hallucination_rate"],
                "composition": composition([mix[i] for i in kept]),
                "defect_share": float(np.mean([mix[i]["quality"] != "clean" for i in kept])),
                "mean_cosine_score": mean_model_cosine(sae, policy, processor, weighting, layer),
                "seconds": time.perf_counter() - began}
            print(f"  seed {seed} {family} {method}@{fraction}: acc {trained['accuracy']:.3f} "
                  f"hal {trained['hallucination_rate']:.3f} ({runs[f'{method}@{fraction}']['seconds']:.0f} s)",
                  flush=True)
        results[family] = {"rows": len(mix), "composition": composition(mix), "runs": runs}
    return results


def write(result: dict, args: argparse.Namespace) -> dict:
    """Write `result` as `<name>.json`, `.md` and `.png` to `args.output_dir`; return it."""
    output_path(args, args.name, ".json").write_text(json.dumps(result, indent=2, default=str))
    output_path(args, args.name).write_text(markdown(result))
    plot(result, output_path(args, args.name, ".png"))
    return result


def merge(args: argparse.Namespace) -> dict:
    """One report from the seeds of several result files (each a run of `run` with the same other arguments)."""
    parts = [json.loads(path.read_text()) for path in args.merge]
    arguments = {**parts[0]["arguments"], "seeds": [s["seed"] for p in parts for s in p["seeds"]]}
    per_seed = [s for p in parts for s in p["seeds"]]
    summary = summarise(per_seed, argparse.Namespace(**arguments))
    result = {"command": " ; ".join(p["command"] for p in parts) + " ; python benchmarks/defect_map.py --merge "
              + " ".join(str(path) for path in args.merge),
              "arguments": arguments, "seeds": per_seed, "summary": summary,
              "minutes": max(p["minutes"] for p in parts)}
    return write(result, args)


def run(args: argparse.Namespace) -> dict:
    """Run the map for `args.seeds` (or merge result files with `--merge`); write json, md and png; return
    the result."""
    if args.merge:
        return merge(args)
    started = time.perf_counter()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    model, processor = load_grounded_llava()
    recipe = load_recipe()
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    per_seed = []
    for seed in args.seeds:
        saev_args = replace(DemoArguments(seed=seed).saev_arguments(), **args.saev)
        with tempfile.TemporaryDirectory() as folder:
            sae = train_scene_saev(model, processor, scans, saev_args, folder, progress=False)
        threshold = calibrate_polarity_threshold(sae, model, processor, scans, seed)
        record = {"seed": seed, "polarity_threshold": threshold, "saev": asdict(saev_args), "weighted_features": int(sae.has_feature_weight.sum()),
                  "delta": sae.config.cooccurrence_threshold,
                  "base_mean_cosine_score": sae.config.feature_weights_info["mean_cosine_score"], "pools": {}}
        for share in args.absent_shares:
            rng = np.random.default_rng([seed, 17, int(share * 100)])
            rows = [*defect_rows(scans, args.clean, "train", rng, [], absent_share=share),
                    *defect_rows(scans, args.per_kind * len(DEFECTS), "train", rng, DEFECTS, defect_fraction=1.0,
                                 absent_share=share)]
            values = defect_scores(rows, sae, model, processor, threshold, seed)
            record["pools"][str(share)] = {"composition": composition(rows), "auroc": defect_aurocs(rows, values)}
            print(f"seed {seed} absent share {share}: scored {len(rows)} rows", flush=True)
            if args.dpo and share == 0.25:
                eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([seed, 99]),
                                          absent_fraction=0.25)
                base = answer_accuracy(model, processor, eval_rows)
                weighting = datasets.Dataset.from_list(scene_weighting_rows(scans, args.weighting_rows, seed))
                with tempfile.TemporaryDirectory() as folder:
                    record["dpo"] = dpo_sweep(rows, values, sae, model, processor, eval_rows, weighting, args, seed,
                                              saev_args.layer, folder)
                record["base"] = {"accuracy": base["accuracy"], "hallucination_rate": base["hallucination_rate"],
                                  "mean_cosine_score": mean_model_cosine(sae, model, processor, weighting,
                                                                         saev_args.layer)}
        per_seed.append(record)
    summary = summarise(per_seed, args)
    result = {"command": "python benchmarks/defect_map.py" + "".join(f" {a}" for a in sys.argv[1:]),
              "arguments": {k: v for k, v in vars(args).items() if k not in ("output_dir", "merge")}, "seeds": per_seed,
              "summary": summary, "minutes": (time.perf_counter() - started) / 60}
    return write(result, args)


def summarise(per_seed: list[dict], args: argparse.Namespace) -> dict:
    """Mean ± std over seeds of every AUROC and DPO figure, and the model-level score's rank correlations."""
    summary: dict = {"auroc": {}}
    for share in args.absent_shares:
        tables = [s["pools"][str(share)]["auroc"] for s in per_seed]
        summary["auroc"][str(share)] = {name: {group: mean_std([t[name].get(group) for t in tables])
                                               for group in tables[0][name]} for name in tables[0]}
    share = "0.25" if "0.25" in summary["auroc"] else next(iter(summary["auroc"]))
    summary["brief"] = {"absent_share": share, **brief_map(
        {name: {group: stat["mean"] for group, stat in row.items() if stat} for name, row in
         summary["auroc"][share].items()})}
    if args.dpo:
        summary["dpo"] = {}
        for family in MIXES:
            runs = [s["dpo"][family]["runs"] for s in per_seed]
            summary["dpo"][family] = {key: {field: mean_std([r[key][field] for r in runs])
                                            for field in ("accuracy", "hallucination_rate", "defect_share",
                                                          "mean_cosine_score")}
                                      for key in runs[0]}
        summary["base"] = {field: mean_std([s["base"][field] for s in per_seed])
                           for field in ("accuracy", "hallucination_rate", "mean_cosine_score")}
        correlations = []
        for s in per_seed:
            models = [r for family in MIXES for r in s["dpo"][family]["runs"].values()]
            accuracy = [r["accuracy"] for r in models] + [s["base"]["accuracy"]]
            cosine = [r["mean_cosine_score"] for r in models] + [s["base"]["mean_cosine_score"]]
            constant = len(set(cosine)) < 2 or len(set(accuracy)) < 2  # no rank correlation is defined
            correlations.append({"seed": s["seed"], "models": len(accuracy),
                                 "spearman": None if constant else float(spearmanr(cosine, accuracy).statistic)})
        summary["model_level"] = {"per_seed": correlations,
                                  "spearman": mean_std([c["spearman"] for c in correlations])}
    return summary


def _ms(value: dict | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value['mean']:.1%} ± {value['std']:.1%}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def markdown(result: dict) -> str:
    """The map's report of `result`, as markdown: the brief map first, then every table."""
    summary, args = result["summary"], result["arguments"]
    seeds = result["seeds"]
    lines = ["# A map of defect kinds: where SAE-V's filter works and where it cannot", "",
             f"`{result['command']}` ({result['minutes']:.1f} min, one thread per process); every number per seed in "
             f"`{args['name']}.json`. Mean ± sample std over seeds {', '.join(str(s['seed']) for s in seeds)}; each "
             "seed trains its own SAE-V and draws its own rows.", "",
             f"- **SAE-V**: layer {seeds[0]['saev']['layer']}, expansion {seeds[0]['saev']['expansion_factor']}, "
             f"{seeds[0]['saev']['steps']} steps, weights by the {seeds[0]['saev']['top_k_pool']} rule; weighted "
             f"features {', '.join(str(s['weighted_features']) for s in seeds)} (per seed).",
             f"- **Pools**: {args['clean']} clean rows and {args['per_kind']} rows of each defect kind, per share of "
             "clean rows about absent objects. Prompt-only scores: " + ", ".join(PROMPT_ONLY) + ".",
             "- **Design split**: `saev_cooccur_jaccard` was designed against `noise`, `saev_polarity_jaccard` against "
             "`borrowed_hallucination` and `false_refusal` (before any measurement); every other column is held out "
             "for them. `saev_polarity_jaccard`'s threshold is calibrated per seed on clean held-out questions "
             "(midway between the median `cooccur_jaccard` about present and about absent objects): "
             + ", ".join(f"{s['polarity_threshold']:.3f}" for s in seeds) + ".", ""]
    brief = summary["brief"]
    lines += ["## In brief", "", f"**{brief['sentence']}** (mean AUROCs, clean rows about absent objects: "
              f"{float(brief['absent_share']):.0%}; the best score of each group per kind, so read it as an upper "
              "bound for the group.)", "",
              *brief_map_table(brief), ""]
    groups = [*DEFECTS, "prompt_defects", "response_defects"]
    for share, table in summary["auroc"].items():
        lines += [f"## AUROC, clean rows vs each defect kind (clean rows about absent objects: {float(share):.0%})", "",
                  "| score | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for name, row in table.items():
            lines.append(f"| {name} | " + " | ".join(_ms(row.get(g)) for g in groups) + " |")
        lines.append("")
    share = "0.25" if "0.25" in summary["auroc"] else next(iter(summary["auroc"]))
    columns = [f"clean_{k}_vs_{f}" for f in MIXES for k in CLEAN_KINDS]
    lines += [f"## AUROC per kind of clean row vs each family of defects (absent share {float(share):.0%})", "",
              "| score | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in summary["auroc"][share].items():
        lines.append(f"| {name} | " + " | ".join(_ms(row.get(c)) for c in columns) + " |")
    lines.append("")
    if "dpo" in summary:
        base = summary["base"]
        lines += ["## DPO on each mix (absent share 25%, 40% defects)", "",
                  f"Before DPO: accuracy {_ms(base['accuracy'], True)}, hallucination "
                  f"{_ms(base['hallucination_rate'], True)}. {args['dpo_steps']} DPO steps for every subset"
                  + (f", with TRL's SFT loss at weight {args['dpo_sft_weight']:g} (the demo's)"
                     if args.get("dpo_sft_weight") else ", plain DPO") + "; "
                  f"{args['eval_rows']} held-out questions. *matched_random*: random rows with exactly the "
                  f"composition (defect kind or kind of clean row, and question kind) of the subset kept by "
                  f"{args['matched_to']}.", ""]
        for family, runs in summary["dpo"].items():
            lines += [f"### {family} defects", "",
                      "| method | kept | accuracy | hallucination | defects kept | mean cosine score |",
                      "|---|---:|---:|---:|---:|---:|"]
            for key, r in runs.items():
                method, fraction = key.split("@")
                lines.append(f"| {method} | {float(fraction):.0%} | {_ms(r['accuracy'], True)} | "
                             f"{_ms(r['hallucination_rate'], True)} | {_ms(r['defect_share'], True)} | "
                             f"{_ms(r['mean_cosine_score'])} |")
            comp = seeds[0]["dpo"][family]["runs"]
            lines += ["", "Composition of each kept subset (seed " + str(seeds[0]["seed"]) + "):", ""]
            lines += [f"- {key}: " + ", ".join(f"{k} {v}" for k, v in r["composition"].items())
                      for key, r in comp.items()]
            lines.append("")
        ml = summary["model_level"]
        lines += ["## The paper's model-level score", "",
                  "Spearman rank correlation, across the DPO-trained models of a seed and the model before DPO, "
                  "between the mean cosine score (the seed's SAE-V weighted anew with each model on "
                  f"{args['weighting_rows']} held-out prompt-only rows) and held-out accuracy: "
                  f"{_ms(ml['spearman'])} (" + ", ".join(f"seed {c['seed']}: {c['spearman'] if c['spearman'] is None else round(c['spearman'], 3)} over "
                                                          f"{c['models']} models" for c in ml["per_seed"]) + ").", ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Heat map of the mean AUROCs at absent share 0.25 (scores x defect kinds) and, with DPO, held-out accuracy
    against the kept fraction on each mix (the model before DPO and full data as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    share = summary["brief"]["absent_share"]
    table = summary["auroc"][share]
    groups = [*DEFECTS, "prompt_defects", "response_defects"]
    names = list(table)
    grid = np.array([[(table[n].get(g) or {"mean": np.nan})["mean"] for g in groups] for n in names])
    panels = 3 if "dpo" in summary else 1
    fig, axes = plt.subplots(1, panels, figsize=(9 + 6 * (panels - 1), 6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * (panels - 1)})
    ax = axes[0][0]
    image = ax.imshow(grid, cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(groups)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"AUROC, clean vs defect (absent share {float(share):.0%}); red: inverted")
    fig.colorbar(image, ax=ax, fraction=0.04)
    if "dpo" in summary:
        base = summary["base"]["accuracy"]["mean"]
        for ax, (family, runs) in zip(axes[0][1:], summary["dpo"].items()):
            methods = sorted({key.split("@")[0] for key in runs} - {"full"})
            for method in methods:
                keys = sorted((k for k in runs if k.startswith(f"{method}@")), key=lambda k: float(k.split("@")[1]))
                fractions = [float(k.split("@")[1]) for k in keys]
                means = np.array([runs[k]["accuracy"]["mean"] for k in keys])
                stds = np.array([runs[k]["accuracy"]["std"] for k in keys])
                style = "-" if method.startswith("saev_") else "--"
                line, = ax.plot(fractions, means, style, marker="o", label=method)
                ax.fill_between(fractions, means - stds, means + stds, alpha=0.1, color=line.get_color())
            ax.axhline(base, color="black", lw=1, label="before DPO")
            ax.axhline(runs["full@1.0"]["accuracy"]["mean"], color="grey", lw=1, ls=":", label="full data")
            ax.set_xlabel("kept fraction")
            ax.set_ylabel("held-out accuracy (mean ± std over seeds)")
            ax.set_title(f"DPO on the {family}-defect mix")
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(markdown(run(parse_args())))
