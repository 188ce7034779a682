"""Benchmark: steering the grounded miniature with its SAE-V's concept features (issue 26, item 1).

The embedded grounded LLaVA of `saev demo` and the demo's SAE-V (trained as `saev demo` trains it: layer 0, 256
features, delta at the median positive activation). For each digit d, `saev_hf.demo.gate.concept_features` finds the
feature that best fires both on the word "d" in questions and on the image cells showing d (and says whether it clears
the gate's bars: a *shared* concept feature). Then, on held-out scenes, with questions "which digit is <colour> ?":

- **clamp**: on questions whose answer is another digit, the feature is held at `--scale` times its mean activation
  on cells showing d, on the image positions only (`steer(..., positions="image")`); the measure is how often the
  model's answer becomes d, against how often it is d without steering;
- **ablate**: the feature held at 0 on the image positions; the measure is the accuracy on questions whose answer is
  d, against the accuracy on questions whose answer is another digit (which an ablation of d's feature should spare).

Answers are the grounded model's own ranking of the task's candidate answers (`predict_answers`). Usage (about 4
minutes on a 2-core CPU):

    python benchmarks/steering_concepts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
import numpy as np  # noqa: E402
from _common import add_output_dir, output_path  # noqa: E402

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.demo.gate import concept_features  # noqa: E402
from saev_hf.demo.grounded_llava import predict_answers  # noqa: E402
from saev_hf.demo.run import DemoArguments, load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.scene_saev import train_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DIGITS, DigitScans, ask, question_rows, random_scene  # noqa: E402
from saev_hf.interpret import steer  # noqa: E402


def which_rows(scans: DigitScans, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` "which digit is <colour> ?" questions about held-out scenes, with their answers."""
    rows = []
    while len(rows) < count:
        scene = random_scene(rng, scans, "held_out")
        question = ask(scene, "which", rng)
        rows.append({"images": [scene.image(scans)], "prompt": question.text, "response": question.answer,
                     "kind": "which", "present": True})
    return rows


def run(args) -> dict:
    """Train the demo's SAE-V, find the digits' concept features, clamp and ablate each; the measurements."""
    model, processor = load_grounded_llava()
    recipe = load_recipe(None)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    demo = DemoArguments(**({"saev_steps": args.saev_steps} if args.saev_steps else {}))
    with tempfile.TemporaryDirectory() as folder:
        sae = train_scene_saev(model, processor, scans, demo.saev_arguments(), folder, progress=False)
    reader = LayerReader(model, processor, layer=demo.layer)
    held_out = question_rows(scans, args.concept_rows, "held_out", np.random.default_rng([args.seed, 1]))
    concepts = {c.concept: c for c in concept_features(sae, reader, held_out)}
    rows = which_rows(scans, args.rows, np.random.default_rng([args.seed, 2]))
    plain = predict_answers(model, processor, rows)
    results = []
    for digit in DIGITS:
        concept = concepts[digit]
        feature = concept.feature
        others = [i for i, row in enumerate(rows) if row["response"] != digit]
        own = [i for i, row in enumerate(rows) if row["response"] == digit]
        value = args.scale * concept.image_mean
        with steer(model, sae, {feature: value}, positions="image"):
            clamped = predict_answers(model, processor, [rows[i] for i in others])
        with steer(model, sae, {feature: 0.0}, positions="image"):
            ablated = predict_answers(model, processor, rows)

        def accuracy(answers: list[str], indices: list[int]) -> float:
            return float(np.mean([answers[i] == rows[i]["response"] for i in indices])) if indices else float("nan")

        results.append({
            "digit": digit, "feature": feature, "shared": concept.shared, "clamp_value": value,
            "questions_other": len(others), "questions_own": len(own),
            "answer_is_digit_plain": float(np.mean([plain[i] == digit for i in others])),
            "answer_is_digit_clamped": float(np.mean([answer == digit for answer in clamped])),
            "accuracy_own_plain": accuracy(plain, own), "accuracy_own_ablated": accuracy(ablated, own),
            "accuracy_other_plain": accuracy(plain, others), "accuracy_other_ablated": accuracy(ablated, others),
        })
    return {"rows": len(rows), "scale": args.scale, "layer": demo.layer, "d_sae": sae.config.d_sae,
            "plain_accuracy": float(np.mean([p == r["response"] for p, r in zip(plain, rows)])), "digits": results}


def report_markdown(args, result: dict) -> str:
    """The results as markdown."""
    lines = ["# Steering the grounded miniature with its digits' concept features", "",
             f"Command: `python benchmarks/steering_concepts.py --rows {args.rows} --scale {args.scale}`. SAE-V as "
             f"`saev demo` trains it (layer {result['layer']}, {result['d_sae']} features); {result['rows']} "
             f"\"which digit is <colour> ?\" questions about held-out scenes (plain accuracy "
             f"{result['plain_accuracy']:.1%}). Clamp: the feature at {args.scale} x its mean activation on cells "
             f"showing the digit, image positions only. Ablate: the feature at 0 on image positions.", "",
             "| digit | feature | shared | answer is the digit, plain | clamped | accuracy where it is the answer, "
             "plain | ablated | accuracy elsewhere, plain | ablated |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["digits"]:
        lines.append(f"| {r['digit']} | {r['feature']} | {'yes' if r['shared'] else 'no'} | "
                     f"{r['answer_is_digit_plain']:.1%} | **{r['answer_is_digit_clamped']:.1%}** | "
                     f"{r['accuracy_own_plain']:.1%} | **{r['accuracy_own_ablated']:.1%}** | "
                     f"{r['accuracy_other_plain']:.1%} | {r['accuracy_other_ablated']:.1%} |")
    shared = [r for r in result["digits"] if r["shared"]]
    if shared:
        def mean(key: str) -> float:
            return statistics.mean(r[key] for r in shared)

        lines += ["", f"Over the {len(shared)} digits with a shared feature: the answer becomes the digit "
                  f"{mean('answer_is_digit_plain'):.1%} -> {mean('answer_is_digit_clamped'):.1%} of the time when it "
                  f"is clamped; accuracy where the digit is the answer {mean('accuracy_own_plain'):.1%} -> "
                  f"{mean('accuracy_own_ablated'):.1%} when it is ablated, elsewhere "
                  f"{mean('accuracy_other_plain'):.1%} -> {mean('accuracy_other_ablated'):.1%}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Run, print and write `steering_concepts.md` and `.json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="which-questions about held-out scenes")
    parser.add_argument("--concept-rows", type=int, default=300, help="question rows the concept features are found on")
    parser.add_argument("--scale", type=float, default=3.0, help="clamp value, in means of the feature on its cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--saev-steps", type=int, default=None, help="SAE-V training steps (default: the demo's)")
    add_output_dir(parser)
    args = parser.parse_args(argv)
    result = run(args)
    text = report_markdown(args, result)
    print(text)
    output_path(args, "steering_concepts").write_text(text)
    output_path(args, "steering_concepts", ".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
