"""Benchmark: the gate before any DPO sweep (issue 12): does the grounded tiny LLaVA have what SAE-V's filter needs?

1. Train the grounded tiny LLaVA with its three-stage recipe (`saev_hf.demo.grounded_llava.train_grounded_llava`:
   language model on described scenes, then the vision tower and projector with a dense image-token objective and the
   language model frozen, then instruction tuning), or load one with `--model-dir`.
2. Per decoder layer in `--layers`: train an SAE-V with the library's `train_saev` on question-answer rows about
   training scenes, set delta from its activations, compute its cross-modal weights on prompt-only rows about held-out
   scenes (`saev_hf.demo.scene_saev.train_scene_saev`).
3. Measure the gate (`saev_hf.demo.gate.measure_gate`) on held-out scenes: (a) weighted features >= 50, (b) concept
   features shared by a word and the cells that show it for most of the 15 concepts, (c) prompt-only SAE-V cosine
   AUROC >= 0.75 for consistent vs inconsistent image-question pairs, (d) answer accuracy >= 80%. Also a diagnostic:
   how much of each concept's word and cells share a direction in the residual stream, per layer.

Writes `grounding_gate.md` and `grounding_gate.json` to `--output-dir`. One thread.

    python benchmarks/grounding_gate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saev_hf.demo.gate import GateThresholds, measure_gate  # noqa: E402
from saev_hf.demo.grounded_llava import (  # noqa: E402
    GroundedLlavaArguments,
    answer_accuracy,
    concept_alignment,
    save_grounded_llava,
    train_grounded_llava,
)
from saev_hf.demo.scene_saev import SceneSAEVArguments, train_scene_saev, weigh_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--model-dir", default=None, help="A trained grounded LLaVA to load instead of training one.")
    parser.add_argument("--save-model-dir", default=None, help="Where to save the trained model (with recipe.json).")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pools", nargs="+", default=["pooled", "per_modality"],
                        help="Weighting rules (WeightingArguments.top_k_pool): the paper's 'pooled' first.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--num-pairs", type=int, default=300)
    parser.add_argument("--recipe", default="{}", help="JSON of GroundedLlavaArguments overrides.")
    parser.add_argument("--saev", default="{}", help="JSON of SceneSAEVArguments overrides (layer comes from --layers).")
    return parser.parse_args(argv)


def run_gate(args: argparse.Namespace) -> dict:
    """Train or load the grounded LLaVA, measure the gate per layer and rule, write json and md; return the record."""
    started = time.perf_counter()
    recipe = GroundedLlavaArguments(**{"seed": args.seed, **json.loads(args.recipe)})
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    if args.model_dir:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model_dir).eval()
        processor = AutoProcessor.from_pretrained(args.model_dir)
        recipe_file = Path(args.model_dir) / "recipe.json"
        training = {"loaded_from": args.model_dir,
                    **(json.loads(recipe_file.read_text()) if recipe_file.is_file() else {})}
        recipe = GroundedLlavaArguments(**training.get("arguments", asdict(recipe)))
        scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    else:
        model, processor, training = train_grounded_llava(recipe, scans, eval_rows=args.eval_rows)
        if args.save_model_dir:
            save_grounded_llava(model, processor, training, args.save_model_dir)
    held_out = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([args.seed, 99]),
                             absent_fraction=0.25)
    answers = answer_accuracy(model, processor, held_out)
    alignment = concept_alignment(model, processor, held_out[:300])
    layers = {}
    for layer in args.layers:
        saev_args = SceneSAEVArguments(**{"seed": args.seed, **json.loads(args.saev), "layer": layer,
                                          "top_k_pool": args.pools[0]})
        with tempfile.TemporaryDirectory() as folder:
            sae = train_scene_saev(model, processor, scans, saev_args, folder)
        for pool in args.pools:  # the same SAE-V, weighted by each rule
            if pool != saev_args.top_k_pool:
                saev_args = replace(saev_args, top_k_pool=pool)
                weigh_scene_saev(sae, model, processor, scans, saev_args)
            layers[f"{layer} ({pool})"] = {"saev": asdict(saev_args),
                                          **measure_gate(model, processor, sae, layer, scans, held_out, answers,
                                                         num_pairs=args.num_pairs, seed=args.seed)}
    record = {
        "command": "python benchmarks/grounding_gate.py " + " ".join(sys.argv[1:]),
        "recipe": asdict(recipe),
        "training": training,
        "answers": answers,
        "concept_alignment": alignment,
        "layers": {str(k): v for k, v in layers.items()},
        "thresholds": asdict(GateThresholds()),
        "passed_any_layer": any(v["passed_all"] for v in layers.values()),
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "grounding_gate.json").write_text(json.dumps(record, indent=2))
    (output / "grounding_gate.md").write_text(markdown(record))
    return record


def _weight(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(record: dict) -> str:
    """The gate's report of `record`, as markdown."""
    t = record["thresholds"]
    lines = [
        "# The gate: does the grounded tiny LLaVA have what SAE-V's filter needs?",
        "",
        f"`{record['command']}` ({record['seconds'] / 60:.1f} min, {record['threads']} thread). Held-out scenes use "
        "digit scans never seen in training."
        + (f" The model's recipe took {record['training']['summary']['seconds'] / 60:.1f} min on one CPU thread "
           f"(`train_grounded_llava` with the arguments in `recipe.json`)."
           if "summary" in record["training"] else ""),
        "",
        f"Held-out answer accuracy {record['answers']['accuracy']:.1%} on {record['answers']['rows']} questions "
        f"(25% about absent objects); hallucination rate {record['answers']['hallucination_rate']:.1%}. By kind: "
        + ", ".join(f"{k} {v:.0%}" for k, v in record["answers"]["by_kind"].items()) + ".",
        "",
        "| layer (weighting rule) | d_sae | delta | (a) weighted features | (b) concepts with a shared feature | (c) cosine AUROC "
        "| L0 AUROC | co-occurring L0 AUROC | (d) accuracy | passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, g in record["layers"].items():
        mark = {True: "yes", False: "**no**"}
        p = g["passed"]
        lines.append(
            f"| {layer} | {g['d_sae']} | {g['cooccurrence_threshold']:.3f} | {g['weighted_features']} "
            f"({mark[p['a_weighted_features']]}) | {g['shared_concepts']} of {len(g['concepts'])} "
            f"({mark[p['b_concept_features']]}) | {g['auroc']['cosine']:.3f} ({mark[p['c_auroc']]}) | "
            f"{g['auroc']['l0']:.3f} | {g['auroc']['cooccur_l0']:.3f} | {g['accuracy']:.1%} "
            f"({mark[p['d_accuracy']]}) | {'**all**' if g['passed_all'] else 'not all'} |")
    lines += [
        "",
        f"Bars: (a) >= {t['min_weighted_features']}; (b) more than {t['min_concept_fraction']:.0%} of the concepts "
        f"have a feature firing above delta on >= {t['min_text_rate']:.0%} of the concept's words in questions and "
        f">= {t['min_image_rate']:.0%} of the cells showing it, {t['min_image_ratio']:g}x more often than on other "
        f"cells; (c) >= {t['min_auroc']}; (d) >= {t['min_accuracy']:.0%}.",
        "",
        "## Do a concept's word and its image cells share a direction? (per layer, before any SAE)",
        "",
        "Cosine between the mean hidden state of a concept's word (text positions, minus the mean text state) and of "
        "the image cells showing it (minus the mean image state), for the same concept vs other concepts; "
        "'matched': share of concepts whose word is closest to their own cells.",
        "",
        "| layer | same concept | other concepts | matched |",
        "|---|---|---|---|",
        *(f"| {layer} | {a['same']:.3f} | {a['other']:.3f} | {a['matched']:.0%} |"
          for layer, a in record["concept_alignment"].items()),
        "",
        "## Concept features (best feature per concept)",
        "",
    ]
    for layer, g in record["layers"].items():
        lines += [f"Layer {layer}:", "", "| concept | feature | word rate | cell rate | other cells | shared | "
                  "mean on words | mean on cells | top-30: text / image | weight |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['concept']} | {c['feature']} | {c['text_rate']:.2f} | {c['image_rate']:.2f} | "
                  f"{c['elsewhere_rate']:.3f} | {'yes' if c['shared'] else 'no'} | {c['text_mean']:.2f} | "
                  f"{c['image_mean']:.2f} | {c['top_k_text']} / {c['top_k_image']} | {_weight(c['weight'])} |"
                  for c in g["concepts"]]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    result = run_gate(parse_args())
    print(markdown(result))
