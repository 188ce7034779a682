"""`saev demo`: SAE-V's data filter on a grounded miniature, offline on a CPU in minutes.

1. The grounded tiny LLaVA ([`grounded_llava`]): the embedded one (trained by [`train_grounded_llava`] with its
   recorded recipe and seed), or `--train_model` to train it again (about half an hour on one CPU thread).
2. An SAE-V on its layer `layer` with cross-modal feature weights and a calibrated delta ([`train_scene_saev`]).
3. A preference dataset about scenes of which a known `low_quality_fraction` is low quality, of the kinds the paper
   names: hallucinated answers about absent objects and swapped images ([`preference_rows`]).
4. Every row scored by [`SAEVScorer`] from its question and image (the paper's default), each score's AUROC for
   clean rows (below 0.5: inverted), and the top `keep_fraction` kept by each score.
5. DPO from the same model on all rows, on the clean rows only (the oracle), on each SAE-V subset and on a random
   subset of the same size; each evaluated on held-out scenes (digit scans never seen in training): answer accuracy
   and hallucination rate.

Writes `report.md`, `summary.json`, `scores.png` and `dpo.png` (and the SAE-V in `saev/`) to `output_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..activations.reader import layer_field
from ..runtime.folders import OutputArguments, mark_output_complete
from .gate import auroc
from .report import SCORE_COLUMNS, _plots, report

EMBEDDED_MODEL = Path(__file__).resolve().parent / "grounded_llava_model"
"""The grounded tiny LLaVA that ships with the package (its recipe and seed in `recipe.json` beside it)."""


DEFAULT_OUTPUT_DIR = "saev_demo"
"""Where the demo writes when no `output_dir` is given."""


@dataclass
class DemoArguments(OutputArguments):
    """Run SAE-V's data filter end to end on a grounded tiny MLLM and real handwritten-digit scenes (written to
    `output_dir`, `saev_demo` by default)."""

    grounded_llava: str | None = field(
        default=None, metadata={"help": "A grounded LLaVA folder (trained by the recipe, saved with save_pretrained); "
                                "default: the one embedded in the package."})
    train_model: bool = field(default=False, metadata={"help": "Train the grounded LLaVA with its recipe (about "
                                                       "18 min on one CPU thread, measured) instead of loading it."})
    layer: int = layer_field(default=0)
    expansion_factor: int = field(default=2, metadata={"help": "d_sae / d_in of the SAE-V."})
    saev_steps: int = field(default=1000, metadata={"help": "SAE-V training steps (512 tokens each)."})
    delta_quantile: float = field(default=0.5, metadata={"help": "delta = this quantile of the SAE-V's positive "
                                                         "activations on the weighting rows."})
    top_k_pool: str = field(
        default="per_modality", metadata={"help": "Feature-weighting rule: 'per_modality' (each feature's top 5 text "
                                          "and top 5 image positions; on these scenes a concept is shown in many more "
                                          "cells than it is named in questions, so the paper's 'pooled' top 30 holds "
                                          "image cells only and weights almost no feature: see "
                                          "benchmarks/results/grounding_gate.md) or 'pooled' (the paper's).",
                                          "choices": ["per_modality", "pooled"]})
    num_pairs: int = field(default=600, metadata={"help": "Rows of the preference dataset."})
    low_quality_fraction: float = field(default=0.4, metadata={"help": "Known fraction of low-quality rows."})
    keep_fraction: float = field(default=0.5, metadata={"help": "Top fraction kept by each score."})
    dpo_steps: int = field(default=200, metadata={"help": "DPO steps for every subset (the same for all)."})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO batch size."})
    dpo_learning_rate: float = field(default=5e-5, metadata={"help": "DPO learning rate (full fine-tuning)."})
    dpo_sft_weight: float = field(
        default=1.0, metadata={"help": "Weight of TRL's SFT loss on the chosen answer added to DPO's (as in RPO); 0 is "
                               "plain DPO. On the embedded model, over 3 seeds, DPO with it on the clean rows raises "
                               "held-out accuracy by 3.1 ± 0.5 points (plain DPO: 0.2 ± 1.2) and on all rows ends 11 "
                               "points below the clean rows (benchmarks/results/scene_dpo.md)."})
    eval_rows: int = field(default=400, metadata={"help": "Held-out questions (25% about absent objects)."})
    map_clean_rows: int = field(default=120, metadata={"help": "Clean rows of the brief defect map (saev_hf.demo."
                                                       "defects; benchmarks/defect_map.py is the full one)."})
    map_rows_per_kind: int = field(default=30, metadata={"help": "Rows of each of the 8 defect kinds in the brief "
                                                         "defect map (0: no map)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per forward when scoring."})
    seed: int = field(default=0, metadata={"help": "Seed of the SAE-V, the data and DPO."})

    def __post_init__(self) -> None:
        if not 0 < self.low_quality_fraction < 1:
            raise ValueError(f"low_quality_fraction={self.low_quality_fraction} must be in (0, 1).")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction={self.keep_fraction} must be in (0, 1].")
        if self.dpo_sft_weight < 0:
            raise ValueError(f"dpo_sft_weight={self.dpo_sft_weight} must be >= 0 (0 is plain DPO).")
        if self.map_rows_per_kind < 0 or (self.map_rows_per_kind and self.map_clean_rows <= 0):
            raise ValueError(f"map_rows_per_kind={self.map_rows_per_kind} must be >= 0 and, with a map, "
                             f"map_clean_rows={self.map_clean_rows} positive.")
        for name in ("num_pairs", "eval_rows", "dpo_steps", "saev_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")


    def saev_arguments(self):
        """The [`SceneSAEVArguments`] of the demo's SAE-V (what `saev explore` and the miniature's benchmarks train
        too)."""
        from .scene_saev import SceneSAEVArguments

        return SceneSAEVArguments(layer=self.layer, expansion_factor=self.expansion_factor, steps=self.saev_steps,
                                  delta_quantile=self.delta_quantile, top_k_pool=self.top_k_pool, seed=self.seed)


def _log(message: str) -> None:
    print(f"[saev demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def require_demo_packages() -> None:
    """Refuse at once, naming the install, when the demo's own packages (the digits, the plots) are missing, rather
    than minutes into a run."""
    import importlib.util

    missing = [package for module, package in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"saev demo needs {', '.join(missing)}, which the library alone does not install: "
                                  f"pip install 'saev-hf[demo]'.")


def load_grounded_llava(path: str | Path | None = None):
    """The embedded grounded tiny LLaVA (or the one in `path`) and its processor, in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else EMBEDDED_MODEL
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"No grounded LLaVA in {path} (no model.safetensors). Pass a folder written by "
                                f"save_pretrained, or --train_model to train one.")
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def load_recipe(path: str | Path | None = None):
    """The [`GroundedLlavaArguments`] a grounded LLaVA folder was trained with (its ``recipe.json``; default: the
    embedded model's), or the default recipe where the folder has none. The recipe's seed and held-out fraction
    fix which digit scans are held out, so every evaluation of that model must draw its scenes with them. A recipe
    saved before the recipe had stage 4 (no ``imperfect_steps``) was trained without it: ``imperfect_steps=0``."""
    from .grounded_llava import GroundedLlavaArguments

    recipe_file = Path(path or EMBEDDED_MODEL) / "recipe.json"
    if not recipe_file.is_file():
        return GroundedLlavaArguments()
    arguments = json.loads(recipe_file.read_text())["arguments"]
    return GroundedLlavaArguments(**{"imperfect_steps": 0, **arguments})


def map_defects(model, processor, sae, scans, args: DemoArguments) -> dict[str, Any]:
    """The brief defect map: `args.map_clean_rows` clean rows and `args.map_rows_per_kind` rows of each defect kind
    ([`saev_hf.demo.defects`]) about training scenes, 25% of the clean rows about absent objects, scored by SAE-V's
    scores and the baselines; per kind, the AUROCs and [`brief_map`]'s verdict and sentence."""
    from .defects import (DEFECTS, brief_map, calibrate_polarity_threshold, composition, defect_aurocs, defect_rows,
                          defect_scores)

    rng = np.random.default_rng([args.seed, 17, 25])
    rows = [*defect_rows(scans, args.map_clean_rows, "train", rng, [], absent_share=0.25),
            *defect_rows(scans, args.map_rows_per_kind * len(DEFECTS), "train", rng, DEFECTS, defect_fraction=1.0,
                         absent_share=0.25)]
    threshold = calibrate_polarity_threshold(sae, model, processor, scans, args.seed)
    aurocs = defect_aurocs(rows, defect_scores(rows, sae, model, processor, threshold, args.seed, args.batch_size))
    return {"composition": composition(rows), "polarity_threshold": threshold, "auroc": aurocs, **brief_map(aurocs)}


def run_demo(args: DemoArguments) -> dict[str, Any]:
    """Run the demo and return its summary (also written to `output_dir/summary.json`, with `report.md` and plots)."""
    import datasets

    from ..alignment.filtering import FilterArguments, filter_by_score
    from ..runtime.folders import prepare_output_dir
    from ..scoring.scorer import SAEVScorer
    from .grounded_llava import GroundedLlavaArguments, answer_accuracy, train_grounded_llava
    from .preference import SceneDPOArguments, dpo_and_evaluate
    from .scene_saev import train_scene_saev
    from .defects import DEFECTS
    from .scenes import DigitScans, preference_rows, question_rows

    require_demo_packages()
    started = time.perf_counter()
    output = prepare_output_dir(args.output_dir or DEFAULT_OUTPUT_DIR, "saev demo", overwrite=args.overwrite_output_dir)
    progress = not args.disable_tqdm

    # 1. the grounded MLLM
    if args.train_model:
        recipe = GroundedLlavaArguments()
        _log("1/5 Training the grounded tiny LLaVA (language model, feature alignment, instruction tuning, imperfect "
             "instruction tuning)")
        model, processor, _ = train_grounded_llava(recipe, eval_rows=0, progress=progress)
        source = "trained now with the default recipe"
    else:
        model, processor = load_grounded_llava(args.grounded_llava)
        recipe = load_recipe(args.grounded_llava)
        source = str(args.grounded_llava or "embedded in the package")
        _log(f"1/5 Loaded the grounded tiny LLaVA ({source})")
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([args.seed, 99]),
                              absent_fraction=0.25)
    base = answer_accuracy(model, processor, eval_rows)
    _log(f"    held-out accuracy {base['accuracy']:.1%}, hallucination rate {base['hallucination_rate']:.1%}")

    # 2. the SAE-V
    _log(f"2/5 Training an SAE-V on layer {args.layer} and computing its feature weights")
    sae = train_scene_saev(model, processor, scans, args.saev_arguments(), output / "saev", progress=progress)
    defect_map = None
    if args.map_rows_per_kind:
        _log(f"    mapping which defect kinds its scores catch ({args.map_clean_rows} clean rows, "
             f"{args.map_rows_per_kind} of each of {len(DEFECTS)} defect kinds)")
        defect_map = map_defects(model, processor, sae, scans, args)

    # 3-4. the preference data, its scores and their AUROCs
    rows = preference_rows(scans, args.num_pairs, "train", np.random.default_rng([args.seed, 5]),
                           low_quality_fraction=args.low_quality_fraction)
    columns = ("images", "prompt", "chosen", "rejected", "low_quality", "quality", "kind")
    dataset = datasets.Dataset.from_list([{key: row[key] for key in columns} for row in rows])
    _log(f"3/5 Scoring {len(dataset)} preference rows ({sum(r['low_quality'] for r in rows)} low quality)")
    scored = dataset.map(SAEVScorer(sae, model, processor), batched=True, batch_size=args.batch_size,
                         desc="SAE-V scores")
    clean = ~np.array(scored["low_quality"], dtype=bool)
    scores = {name: np.array(scored[column], dtype=float) for name, column in SCORE_COLUMNS.items()}
    aurocs = {name: auroc(clean, values) for name, values in scores.items()}

    # 5. DPO on each subset
    by_index = dict(enumerate(rows))
    n_keep = max(1, round(args.keep_fraction * len(rows)))
    rng = np.random.default_rng([args.seed, 6])
    subsets = {"full": list(range(len(rows))), "clean_only": [i for i in range(len(rows)) if clean[i]]}
    uninformative = [name for name, values in scores.items() if np.ptp(values) == 0]
    numbered = scored.add_column("row", list(range(len(rows))))
    for name, column in SCORE_COLUMNS.items():
        if name in uninformative:  # every row ties: a filter by this score would keep rows by index
            continue
        kept = filter_by_score(numbered, FilterArguments(column=column, fraction=args.keep_fraction))
        subsets[f"saev_{name}"] = list(kept["row"])
    subsets["random"] = sorted(rng.choice(len(rows), size=n_keep, replace=False).tolist())
    dpo_args = SceneDPOArguments(steps=args.dpo_steps, batch_size=args.dpo_batch_size,
                                 learning_rate=args.dpo_learning_rate, sft_weight=args.dpo_sft_weight,
                                 seed=args.seed)
    results = {}
    for i, (name, indices) in enumerate(subsets.items()):
        _log(f"4/5 DPO {i + 1}/{len(subsets)}: {name} ({len(indices)} rows, {args.dpo_steps} steps)")
        trained = dpo_and_evaluate(model, processor, [by_index[j] for j in indices], eval_rows, dpo_args,
                                   output / "dpo", progress=progress)
        results[name] = {**trained, "eval_rows": trained["rows"], "rows": len(indices),
                         "kept_fraction": len(indices) / len(rows),
                         "low_quality_fraction": float(np.mean(~clean[indices]))}

    summary = {
        "arguments": asdict(args),
        "model": source,
        "recipe": asdict(recipe),
        "num_rows": len(rows),
        "num_low_quality": int((~clean).sum()),
        "low_quality_kinds": {kind: int(sum(r["quality"] == kind for r in rows)) for kind in ("hallucination", "swap")},
        "base": base,
        "saev": {"layer": args.layer, "d_sae": sae.config.d_sae, "weighted_features": int(sae.has_feature_weight.sum()),
                 "top_k_pool": args.top_k_pool,
                 "cooccurrence_threshold": sae.config.cooccurrence_threshold},
        "auroc": aurocs,
        "uninformative_scores": uninformative,
        "score_means": {n: {"clean": float(v[clean].mean()), "low_quality": float(v[~clean].mean())}
                        for n, v in scores.items()},
        "dpo": results,
        "defect_map": defect_map,
        "seconds": time.perf_counter() - started,
    }
    _log("5/5 Writing the report")
    _plots(output, scores, clean, results, base)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "report.md").write_text(report(summary))
    mark_output_complete(output)
    print(report(summary))
    return summary


