"""Benchmark: the paper's image patch filtering experiment (Algorithms 4-7), in miniature, on handwritten digits.

The SAE-V paper scores every image patch from the SAE-V activations of the image tokens covering it (L0, L1,
co-occurring L0 or cosine), keeps the top p% of patches, blacks out the rest, and asks the MLLM to classify the image
(LLaVA-NeXT, 10 ImageNet classes: 0.896 with every patch; keeping 25% of patches, 0.67 by L0 / cosine vs 0.43 at
random). This script repeats that on a model small enough for a CPU:

1. Per seed, a tiny LLaVA (`build_tiny_model("llava")`, 32x32 images, a 4x4 grid of 8-pixel patches) is pretrained on
   captions of real scikit-learn digits, an SAE-V is trained on its decoder layer `--layer` on captioned digits and
   its cross-modal feature weights are computed from the question and image alone, as the paper's code does (the
   responses are not fed): stages 1-2 of `saev demo` (`digit_captioning.pretrain_mllm`, `train_scoring_saev`).
2. Held-out digits (never seen by the model or the SAE-V) are scored patch by patch with the classification prompt
   "what digit is this ?" (`PatchFilter.score_patches`): every score of Algorithms 4-7 on the 16 patches.
3. For each score, for random selection (the paper's baseline) and for "ink" (a reference that knows where the digit
   is: patches ranked by the darkness of their pixels), keep 25 / 50 / 75% of the patches and fill the rest, then
   measure the model's digit accuracy (`digit_accuracy`: the best of ten captions by log-likelihood; chance is 10%).
   `--rule exact` (default) keeps exactly p% of the 16 patches, ties broken at random: on these digits most patches
   have no co-occurring or weighted feature, so their co-occurring-L0 and cosine scores tie at 0, and the paper's rule
   (`--rule paper`: keep every patch scoring >= percentile(scores, 100 - p)) then keeps far more than p% (the json
   records the fraction each rule really keeps), which would flatter those scorers.
   Fill colours: white (the digits' background: masking removes ink) and black (the paper's choice; on these digits
   black is the ink colour, so it paints fake strokes).
4. Mean +- sample standard deviation over `--seeds` (each seed: its own model, SAE-V, weights and random masks).

Writes `patch_filtering.md`, `patch_filtering.json`, `patch_filtering.png` (accuracy vs kept fraction) and
`patch_filtering_examples.png` (one digit masked by each scorer) to `--output-dir`. One thread. About 5 minutes with
the defaults on a 2-core CPU.

    python benchmarks/patch_filtering.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402

from digit_captioning import DigitCaptioningArguments, DemoDigits, pretrain_mllm, train_scoring_saev  # noqa: E402
from saev_hf.patches import PATCH_SCORES, PatchFilter, PatchFilterArguments, keep_mask, mask_patches  # noqa: E402
from saev_hf.testing.digit_data import digit_images  # noqa: E402
from saev_hf.testing.tiny_pretraining import digit_accuracy  # noqa: E402

BASELINES = ("random", "ink")
SCORERS = (*PATCH_SCORES, *BASELINES)
FILLS = {"white": (255, 255, 255), "black": (0, 0, 0)}
PAPER = {  # LLaVA-NeXT, 10 ImageNet classes (the method page); all patches: 0.896
    "l0": (0.674, 0.826, 0.874), "l1": (0.645, 0.827, 0.866), "cooccur_l0": (0.580, 0.793, 0.862),
    "cosine": (0.677, 0.820, 0.868), "random": (0.431, 0.748, 0.852),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds (model, SAE-V, random masks).")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="Kept patch fractions.")
    parser.add_argument("--layer", type=int, default=2, help="Decoder layer of the tiny LLaVA (of 4) read.")
    parser.add_argument("--pretrain-digits", type=int, default=800, help="Digits the tiny LLaVA is pretrained on.")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="Pretraining steps of the tiny LLaVA.")
    parser.add_argument("--saev-digits", type=int, default=300, help="Digits the SAE-V is trained on.")
    parser.add_argument("--saev-steps", type=int, default=600, help="SAE-V training steps (512 tokens each).")
    parser.add_argument("--expansion-factor", type=int, default=8, help="d_sae / d_in of the SAE-V.")
    parser.add_argument("--delta", type=float, default=0.1, help="Co-occurrence bound (the tiny model's scale).")
    parser.add_argument("--eval-digits", type=int, default=300, help="Held-out digits classified.")
    parser.add_argument("--fills", nargs="+", default=list(FILLS), choices=list(FILLS), help="Fill colours.")
    parser.add_argument("--rule", default="exact", choices=["exact", "paper"],
                        help="exact: keep exactly p%% of the patches (ties at random); paper: score >= percentile.")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"),
                        help="Folder for the md/json/png results.")
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Print `message` with the script's name and the time, flushed."""
    print(f"[patch_filtering {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(seed: int, args: argparse.Namespace, digits: list, eval_digits: list, workdir: str):
    """The tiny LLaVA and its SAE-V with feature weights: the `saev demo` pipeline's stages 1-2 (weights from the
    question and image alone). Returns the model, its processor, the SAE-V and the pretraining summary (its held-out
    accuracy on `eval_digits`)."""
    settings = DigitCaptioningArguments(layer=args.layer, pretrain_digits=args.pretrain_digits, pretrain_steps=args.pretrain_steps,
                             saev_digits=args.saev_digits, saev_steps=args.saev_steps,
                             expansion_factor=args.expansion_factor, cooccurrence_threshold=args.delta, num_pairs=0,
                             eval_digits=len(eval_digits), batch_size=16, seed=seed)
    split = DemoDigits(pretrain=digits[: args.pretrain_digits],
                       saev=digits[args.pretrain_digits : args.pretrain_digits + args.saev_digits],
                       pairs=[], eval=eval_digits)
    model, processor, pretrain = pretrain_mllm(settings, split, progress=False)
    model.eval()
    sae = train_scoring_saev(settings, model, processor, split, f"{workdir}/saev-{seed}", weights_from_questions=True,
                             progress=False)
    return model, processor, sae, pretrain


def run_seed(seed: int, args: argparse.Namespace, eval_digits: list, workdir: str) -> dict:
    """One seed's held-out digit accuracy with the patches each scorer keeps, per fill and fraction."""
    # the evaluation digits are the same for every seed; each seed draws its training digits from the others
    eval_arrays = {np.asarray(image).tobytes() for image, _ in eval_digits}
    pool = [pair for pair in digit_images(1797, seed=100 + seed) if np.asarray(pair[0]).tobytes() not in eval_arrays]
    log(f"seed {seed}: pretraining the tiny LLaVA, training the SAE-V, weighting features")
    model, processor, sae, pretrain = build(seed, args, pool, eval_digits, workdir)
    patch_filter = PatchFilter(sae, model, processor, args=PatchFilterArguments(score="cosine"))
    rows = {"images": [[image] for image, _ in eval_digits], "prompt": ["what digit is this ?"] * len(eval_digits)}
    scores = []
    for start in range(0, len(eval_digits), 16):
        batch = {k: v[start : start + 16] for k, v in rows.items()}
        scores += [item[0] for item in patch_filter.score_patches(batch, start)]
    full = pretrain["digit_accuracy_after"]  # with every patch: the pretrained model on the held-out digits
    log(f"seed {seed}: {int(sae.has_feature_weight.sum())} weighted features; accuracy with every patch {full:.1%}")
    rng = np.random.default_rng(seed)
    for (image, _), item in zip(eval_digits, scores):  # the baselines, as extra score grids
        item.scores["random"] = torch.from_numpy(rng.random(item.grid.shape))
        item.scores["ink"] = ink_scores(image, item.grid)
    exact = args.rule == "exact"
    result = {"all_patches": full, "num_weighted_features": int(sae.has_feature_weight.sum()), "accuracy": {}}
    for fill_name in args.fills:
        fill = FILLS[fill_name]
        for scorer in SCORERS:
            for fraction in args.fractions:
                masked = []
                for index, ((image, label), item) in enumerate(zip(eval_digits, scores)):
                    masked.append((mask_patches(image, item.grid, item.scores[scorer].numpy(), fraction, fill,
                                                exact=exact, seed=[seed, index]), label))
                accuracy = digit_accuracy(model, processor, masked)
                result["accuracy"][f"{fill_name}/{scorer}/{fraction}"] = accuracy
        log(f"seed {seed}, fill {fill_name}: " + ", ".join(
            f"{s} {result['accuracy'][f'{fill_name}/{s}/{args.fractions[0]}']:.1%}" for s in SCORERS)
            + f" at {args.fractions[0]:.0%} kept")
    result["kept_fraction_paper_rule"] = {  # ties at the threshold keep more than p%
        f"{scorer}/{fraction}": float(np.mean([keep_mask(item.scores[scorer].numpy(), fraction).mean()
                                                for item in scores]))
        for scorer in SCORERS for fraction in args.fractions}
    if seed == args.seeds[0]:
        result["_examples"] = (eval_digits[:3], scores[:3])
    return result


def ink_scores(image, grid) -> torch.Tensor:
    """Reference ranking that knows where the digit is: the mean darkness (ink) of each patch's pixels."""
    darkness = 255.0 - np.asarray(image.convert("L"), dtype=np.float64)
    values = [darkness[top:bottom, left:right].mean() for left, top, right, bottom in grid.cell_boxes(*image.size)]
    return torch.tensor(values).view(grid.shape)


def mean_std(values: list[float]) -> dict:
    """The mean, the sample standard deviation (0 for one value) and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: list[dict], args: argparse.Namespace) -> dict:
    """Over seeds: mean ± std of each accuracy and of the weighted features; the paper rule's mean kept fractions."""
    summary = {"all_patches": mean_std([r["all_patches"] for r in runs]), "accuracy": {}, "kept_paper_rule": {},
               "num_weighted_features": mean_std([r["num_weighted_features"] for r in runs])}
    for key in runs[0]["accuracy"]:
        summary["accuracy"][key] = mean_std([r["accuracy"][key] for r in runs])
    for key in runs[0]["kept_fraction_paper_rule"]:
        summary["kept_paper_rule"][key] = statistics.fmean(r["kept_fraction_paper_rule"][key] for r in runs)
    return summary


def fmt(stat: dict) -> str:
    """`stat` as 'mean ± std', three decimals."""
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def table(summary: dict, fill: str, fractions: list[float]) -> str:
    """The markdown table of accuracies with `fill`: a row per scorer, a column per kept fraction."""
    lines = ["| scorer | " + " | ".join(f"keep {f:.0%}" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for scorer in SCORERS:
        cells = [fmt(summary["accuracy"][f"{fill}/{scorer}/{f}"]) for f in fractions]
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(summary: dict, args: argparse.Namespace) -> list[str]:
    """Markdown lines: per fill and kept fraction, each scorer's accuracy gap to random, beyond the spread or not."""
    out = []
    for fill in args.fills:
        for fraction in args.fractions:
            random = summary["accuracy"][f"{fill}/random/{fraction}"]
            better = []
            for scorer in (*PATCH_SCORES, "ink"):
                stat = summary["accuracy"][f"{fill}/{scorer}/{fraction}"]
                gap = stat["mean"] - random["mean"]
                spread = max(stat["std"], random["std"])
                verdict = "above" if gap > 2 * spread and gap > 0 else "below" if gap < -2 * spread else "within"
                better.append(f"{scorer} {gap:+.3f} ({verdict})")
            out.append(f"- {fill} fill, keep {fraction:.0%}: vs random " + ", ".join(better) + ".")
    return out


def plot(summary: dict, args: argparse.Namespace, path: Path) -> None:
    """Plot accuracy vs kept fraction per scorer, a panel per fill, to the png `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"l0": "#4c72b0", "l1": "#55a868", "cooccur_l0": "#c44e52", "cosine": "#ff9d00", "random": "#888888",
               "ink": "#222222"}
    fig, axes = plt.subplots(1, len(args.fills), figsize=(5.2 * len(args.fills), 3.6), squeeze=False)
    for ax, fill in zip(axes[0], args.fills):
        xs = [*args.fractions, 1.0]
        for scorer in SCORERS:
            stats = [summary["accuracy"][f"{fill}/{scorer}/{f}"] for f in args.fractions] + [summary["all_patches"]]
            means = np.array([s["mean"] for s in stats])
            stds = np.array([s["std"] for s in stats])
            ax.plot(xs, means, marker="o", color=colours[scorer], label=scorer,
                    linestyle="--" if scorer in BASELINES else "-")
            ax.fill_between(xs, means - stds, means + stds, color=colours[scorer], alpha=0.15)
        ax.axhline(0.1, color="black", linewidth=0.8, linestyle=":", label="chance")
        ax.set(xlabel="fraction of patches kept", ylabel="held-out digit accuracy", ylim=(0, 1),
               title=f"{fill} fill (mean ± std over {len(args.seeds)} seeds)")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(examples, args: argparse.Namespace, path: Path) -> None:
    """Plot the example digits with the patches each scorer keeps at each fraction to the png `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits, scores = examples
    fill = FILLS[args.fills[0]]
    columns = [("original", None, None)] + [(s, s, f) for s in SCORERS for f in args.fractions]
    fig, axes = plt.subplots(len(digits), len(columns), figsize=(1.05 * len(columns), 1.25 * len(digits)),
                             squeeze=False)
    for r, ((image, label), item) in enumerate(zip(digits, scores)):
        for c, (title, scorer, fraction) in enumerate(columns):
            ax = axes[r, c]
            if scorer is None:
                shown = image
            else:
                shown = mask_patches(image, item.grid, item.scores[scorer].numpy(), fraction, fill,
                                     exact=args.rule == "exact", seed=[args.seeds[0], r])
            ax.imshow(shown)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title if scorer is None else f"{title}\n{fraction:.0%}", fontsize=7)
    fig.suptitle(f"Held-out digits, patches kept by each scorer ({args.fills[0]} fill)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(path: Path, record: dict, args: argparse.Namespace) -> None:
    """Write the report (set-up, tables per fill, the paper's numbers, findings) to the markdown `path`."""
    summary = record["summary"]
    lines = [
        "# Image patch filtering (Algorithms 4-7) in miniature",
        "",
        f"Tiny LLaVA (32x32 digits, a 4x4 grid of patches) pretrained on {args.pretrain_digits} scikit-learn digits "
        f"({args.pretrain_steps} steps), SAE-V on decoder layer {args.layer} (d_sae = {64 * args.expansion_factor}, "
        f"{args.saev_steps} steps, delta {args.delta}), feature weights from question + image "
        f"({summary['num_weighted_features']['mean']:.0f} ± {summary['num_weighted_features']['std']:.0f} weighted "
        f"features); {args.eval_digits} held-out digits classified with a fraction of their patches kept "
        f"({'exactly p% of the patches, ties at random' if args.rule == 'exact' else 'the paper rule: score >= percentile'}"
        f"). Seeds: {args.seeds} (each: its own model, SAE-V, weights and random masks). Mean ± sample std over "
        f"seeds. Run time {record['seconds']:.0f} s.",
        "",
        f"Accuracy with every patch: {fmt(summary['all_patches'])} (chance 0.100).",
        "",
    ]
    for fill in args.fills:
        lines += [f"## {fill} fill", "", table(summary, fill, args.fractions), ""]
    lines += [
        "## The paper (LLaVA-NeXT-7B, 10 ImageNet classes, black fill; every patch: 0.896)",
        "",
        "| scorer | keep 25% | keep 50% | keep 75% |",
        "|---|---|---|---|",
        *(f"| {s} | " + " | ".join(f"{v:.3f}" for v in PAPER[s]) + " |" for s in PAPER),
        "",
        "## What this shows",
        "",
        "Gap to random selection at each kept fraction (above / below: by more than twice the larger seed std; "
        "within: not distinguishable over these seeds):",
        "",
        *findings(summary, args),
        "",
        *record["conclusion"],
        "",
        *rule_note(summary, args),
        "",
        "![accuracy](patch_filtering.png)",
        "",
        "![examples](patch_filtering_examples.png)",
        "",
        "Command: `python benchmarks/patch_filtering.py`",
    ]
    path.write_text("\n".join(lines) + "\n")


def rule_note(summary: dict, args: argparse.Namespace) -> list[str]:
    """A markdown note on ties: what the paper's percentile rule would really keep at the first fraction."""
    kept = summary["kept_paper_rule"]
    cells = ", ".join(f"{s} {kept[f'{s}/{args.fractions[0]}']:.0%}" for s in SCORERS)
    return [f"Ties: with the paper's rule (score >= percentile), 'keep {args.fractions[0]:.0%}' would really keep "
            f"{cells} of the patches (mean over digits and seeds), because many patches tie"
            + (f"; this run keeps exactly {args.fractions[0]:.0%}." if args.rule == "exact" else
               "; this run used that rule, so its fractions are nominal.")]


def conclusion(summary: dict, args: argparse.Namespace) -> list[str]:
    """Plain statements computed from the numbers."""
    out = []
    for fill in args.fills:
        wins = []
        for fraction in args.fractions:
            random = summary["accuracy"][f"{fill}/random/{fraction}"]["mean"]
            best = max(PATCH_SCORES, key=lambda s: summary["accuracy"][f"{fill}/{s}/{fraction}"]["mean"])
            wins.append((fraction, best, summary["accuracy"][f"{fill}/{best}/{fraction}"]["mean"] - random))
        out.append(f"- {fill} fill: the best SAE-V scorer beats random by " + ", ".join(
            f"{gap:+.3f} ({best}) at {fraction:.0%}" for fraction, best, gap in wins) + ".")
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run every seed, write the md, json and two pngs to args.output_dir and print the md; return the record."""
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    started = time.perf_counter()
    eval_digits = digit_images(1797, seed=12345)[-args.eval_digits:]
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            runs.append(run_seed(seed, args, eval_digits, workdir))
    examples = runs[0].pop("_examples")
    summary = summarise(runs, args)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record = {"arguments": vars(args), "runs": runs, "summary": summary, "paper": PAPER,
              "seconds": time.perf_counter() - started}
    record["conclusion"] = conclusion(summary, args)
    (output / "patch_filtering.json").write_text(json.dumps(record, indent=2))
    plot(summary, args, output / "patch_filtering.png")
    plot_examples(examples, args, output / "patch_filtering_examples.png")
    write_markdown(output / "patch_filtering.md", record, args)
    print((output / "patch_filtering.md").read_text())
    return record


if __name__ == "__main__":
    main()
