"""Benchmark: labels that are scored, in the grounded miniature where every concept is known (issue 26, item 3).

The embedded grounded LLaVA of `saev demo` and the demo's SAE-V (trained as `saev demo` trains it). For each of the
15 concepts (10 digits, 5 colours), `saev_hf.demo.gate.concept_features` finds the feature that best fires both on the
concept's word in questions and on the image cells showing it (*shared* when it clears the gate's bars). Those
features, and as many random other features (a control), are labelled by `label_features` on question rows about
held-out scenes:

- the explainer is the grounded model itself (`saev_hf.demo.concept_labels.ConceptExplainer`): each of a feature's
  top explanation scenes is masked to the one cell where the feature fires most (`image_evidence="mask"`,
  `max_patches=1`) and the model answers "which digit is <colour> ?" for every colour (and "what colour is the
  <digit> ?" back); the concept it sees on most of them is the label;
- the judge (`ConceptJudge`) predicts that the feature fires on a held-out row when the model answers "is there a
  <digit> ?" with yes (for a colour: "which digit is <colour> ?" with a digit) or the row's question names the
  concept; detection scoring as delphi defines it: the held-out rows where the feature fires most and as many where it
  never fires.

Reported per concept: the label, whether it names the true concept, and its detection accuracy and F1. Two controls
give the numbers a floor: the concept features scored with *shuffled* labels (each concept feature given another
concept feature's label, a seeded derangement), and *random* features labelled the same way. Usage (about 3 minutes
on a 2-core CPU):

    python benchmarks/feature_labels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
import datasets  # noqa: E402
import numpy as np  # noqa: E402
from _common import add_output_dir, output_path  # noqa: E402

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.demo.concept_labels import ConceptExplainer, ConceptJudge, label_concept  # noqa: E402
from saev_hf.demo.gate import concept_features  # noqa: E402
from saev_hf.demo.run import DemoArguments, load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.scene_saev import train_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402
from saev_hf.interpret.labels import LabelArguments, collect_examples, label_features, score_label  # noqa: E402
from saev_hf.runtime.progress import disable_progress_bars  # noqa: E402


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A seeded permutation of range(n) that moves every index (n >= 2)."""
    while True:
        order = rng.permutation(n).tolist()
        if all(i != j for i, j in enumerate(order)):
            return order


def mean(values: list[float]) -> float | None:
    """The mean of `values`, None when there are none."""
    return statistics.fmean(values) if values else None


def run(args) -> dict:
    """Train the demo's SAE-V, find the concept features, label and score them and the controls."""
    start = time.perf_counter()
    model, processor = load_grounded_llava()
    recipe = load_recipe(None)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    demo = DemoArguments(**({"saev_steps": args.saev_steps} if args.saev_steps else {}))
    with tempfile.TemporaryDirectory() as folder:
        sae = train_scene_saev(model, processor, scans, demo.saev_arguments(), folder, progress=False)
    trained = time.perf_counter()
    reader = LayerReader(model, processor, layer=demo.layer)
    concept_rows = question_rows(scans, args.concept_rows, "held_out", np.random.default_rng([args.seed, 1]))
    concepts = concept_features(sae, reader, concept_rows)
    rows = question_rows(scans, args.rows, "held_out", np.random.default_rng([args.seed, 3]))
    dataset = datasets.Dataset.from_list([{"images": row["images"], "prompt": row["prompt"]} for row in rows])

    concept_ids = list(dict.fromkeys(c.feature for c in concepts))
    others = [f for f in range(sae.config.d_sae) if f not in concept_ids]
    random_ids = sorted(np.random.default_rng([args.seed, 4]).choice(others, size=args.random_features,
                                                                      replace=False).tolist())
    label_args = LabelArguments(num_rows=None, top_n=args.top_n, num_detection=args.num_detection,
                                image_evidence="mask", max_patches=1, seed=args.seed, batch_size=32)
    judge = ConceptJudge(model, processor)
    labels = label_features(sae, reader, dataset, concept_ids + random_ids, ConceptExplainer(model, processor), judge,
                            label_args)

    # control: each concept feature scored with another concept feature's label, on the same held-out examples
    examples = collect_examples(sae, reader, dataset, concept_ids, label_args)
    labelled = [f for f in concept_ids if f in labels]
    shuffled = {}
    if len(labelled) >= 2:
        order = derangement(len(labelled), np.random.default_rng([args.seed, 5]))
        for f, k in zip(labelled, order):
            label = labels[labelled[k]].label
            shuffled[f] = {"label": label, "detection": score_label(judge, label, examples[f].detection, args.seed)}

    per_concept = []
    for c in concepts:
        label = labels.get(c.feature)
        swap = shuffled.get(c.feature)
        per_concept.append({
            "concept": c.concept, "feature": c.feature, "shared": c.shared,
            "label": label.label if label else None,
            "agrees": bool(label and label_concept(label.label) == c.concept),
            "detection": label.detection if label else None,
            "shuffled_label": swap["label"] if swap else None,
            "shuffled_agrees": bool(swap and label_concept(swap["label"]) == c.concept),
            "shuffled_detection": swap["detection"] if swap else None,
        })
    random_features = [{"feature": f, "label": labels[f].label if f in labels else None,
                        "detection": labels[f].detection if f in labels else None} for f in random_ids]

    def f1s(records: list[dict], key: str = "detection") -> list[float]:
        return [r[key]["f1"] for r in records if r[key] is not None]

    def accuracies(records: list[dict], key: str = "detection") -> list[float]:
        return [r[key]["accuracy"] for r in records if r[key] is not None]

    shared = [r for r in per_concept if r["shared"]]
    summary = {
        "concepts": len(per_concept), "shared_concepts": len(shared),
        "agreement": sum(r["agrees"] for r in per_concept) / len(per_concept),
        "agreement_shared": sum(r["agrees"] for r in shared) / len(shared) if shared else None,
        "mean_f1": mean(f1s(per_concept)), "mean_accuracy": mean(accuracies(per_concept)),
        "scored_concepts": len(f1s(per_concept)),
        "shuffled_agreement": sum(r["shuffled_agrees"] for r in per_concept) / len(per_concept),
        "shuffled_mean_f1": mean(f1s(per_concept, "shuffled_detection")),
        "shuffled_mean_accuracy": mean(accuracies(per_concept, "shuffled_detection")),
        "random_mean_f1": mean(f1s(random_features)), "random_mean_accuracy": mean(accuracies(random_features)),
        "random_scored": len(f1s(random_features)),
    }
    return {"rows": args.rows, "layer": demo.layer, "d_sae": sae.config.d_sae, "top_n": args.top_n,
            "num_detection": args.num_detection, "concepts": per_concept, "random_features": random_features,
            "summary": summary, "seconds": {"saev_training": trained - start,
                                            "labelling": time.perf_counter() - trained}}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_markdown(args, result: dict) -> str:
    """The results as markdown."""
    s = result["summary"]
    command = (f"python benchmarks/feature_labels.py --rows {args.rows} --top-n {args.top_n} --num-detection "
               f"{args.num_detection} --random-features {args.random_features} --seed {args.seed}"
               + (f" --saev-steps {args.saev_steps}" if args.saev_steps else ""))
    lines = ["# Feature labels in the grounded miniature, scored by detection", "",
             f"Command: `{command}`. SAE-V as `saev demo` trains it (layer {result['layer']}, {result['d_sae']} "
             f"features); {result['rows']} question rows about held-out scenes, half of them (seeded) explain, half "
             f"are held out. Explainer: the grounded model asked about each of the top {result['top_n']} scenes "
             f"masked to the cell where the feature fires most. Judge: the grounded model asked whether the concept "
             f"is in a held-out scene (or the question names it), on up to {result['num_detection']} activating and "
             f"as many non-activating held-out rows.", "",
             "| concept | feature | shared | label | agrees | detection accuracy | F1 | activating / non-activating | "
             "shuffled label | its F1 |",
             "|---|---:|---|---|---|---:|---:|---:|---|---:|"]
    for r in result["concepts"]:
        d, sd = r["detection"], r["shuffled_detection"]
        counts = f"{d['num_activating']} / {d['num_non_activating']}" if d else "-"
        lines.append(f"| {r['concept']} | {r['feature']} | {'yes' if r['shared'] else 'no'} | {r['label'] or '-'} | "
                     f"{'**yes**' if r['agrees'] else 'no'} | {_num(d and d['accuracy'])} | {_num(d and d['f1'])} | "
                     f"{counts} | {r['shuffled_label'] or '-'} | {_num(sd and sd['f1'])} |")
    lines += ["", "| | agreement with the true concept | mean detection accuracy | mean detection F1 |",
              "|---|---:|---:|---:|",
              f"| concept features, their labels | **{_pct(s['agreement'])}** ({s['shared_concepts']} shared: "
              f"{_pct(s['agreement_shared'])}) | {_num(s['mean_accuracy'])} | **{_num(s['mean_f1'])}** |",
              f"| control: concept features, shuffled labels | {_pct(s['shuffled_agreement'])} | "
              f"{_num(s['shuffled_mean_accuracy'])} | {_num(s['shuffled_mean_f1'])} |",
              f"| control: {len(result['random_features'])} random features, their labels | - | "
              f"{_num(s['random_mean_accuracy'])} | {_num(s['random_mean_f1'])} |",
              "", "Random features' labels: " + ", ".join(f"{r['feature']}: {r['label'] or '-'}"
                                                          for r in result["random_features"]) + ".",
              "", f"Time: SAE-V training {result['seconds']['saev_training']:.0f} s, labelling and scoring "
                  f"{result['seconds']['labelling']:.0f} s (one thread)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Run, print and write `feature_labels.md` and `.json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="question rows about held-out scenes to label from")
    parser.add_argument("--concept-rows", type=int, default=300, help="question rows the concept features are found on")
    parser.add_argument("--top-n", type=int, default=8, help="top explanation scenes shown to the explainer")
    parser.add_argument("--num-detection", type=int, default=20, help="held-out activating (and non-activating) rows")
    parser.add_argument("--random-features", type=int, default=15, help="random features labelled as a control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--saev-steps", type=int, default=None, help="SAE-V training steps (default: the demo's)")
    add_output_dir(parser)
    args = parser.parse_args(argv)
    disable_progress_bars()
    result = run(args)
    text = report_markdown(args, result)
    print(text)
    output_path(args, "feature_labels").write_text(text)
    output_path(args, "feature_labels", ".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
