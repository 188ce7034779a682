"""Benchmark: sparse probing of the grounded miniature's SAE-V on its concepts (issue 26, item 4).

The embedded grounded LLaVA of `saev demo` and the demo's SAE-V (trained as `saev demo` trains it: layer 0, 256
features). The rows are held-out scenes holding one handwritten digit (scans never seen in training) in one of the five
colours, in one of the nine cells, asked a question that names neither ("how many digits are there ?"). `saev eval`'s
sparse probing (`evaluate_saev(..., probe_label_column=...)`) then asks, per split (all, text, image positions):
which digit is shown (10 classes) and in which colour (5 classes), each as one balanced one-vs-rest task per class,
from the top-k SAE-V features by the difference of class means, mean-pooled per row, against a logistic regression on
the mean-pooled residual stream (128 dims). A control probes the digit labels shuffled across the rows (chance: 0.5).
A harder probe binds the question to the image: held-out scenes of two or three digits, each asked "which digit is
<colour> ?", probed for the answer (the image alone does not say which of its digits is asked about; the image
positions come before the question, so they cannot see it).

Usage (under a minute on one CPU thread):

    python benchmarks/sparse_probing.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
import datasets  # noqa: E402
import numpy as np  # noqa: E402
from _common import add_output_dir, output_path  # noqa: E402

from saev_hf.demo.run import DemoArguments, load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.scene_saev import train_scene_saev  # noqa: E402
from saev_hf.demo.scenes import COLOURS, GRID, DigitScans, Scene, SceneObject, ask, random_scene  # noqa: E402
from saev_hf.evaluation import evaluate_saev  # noqa: E402
from saev_hf.evaluation.report import format_probing_table  # noqa: E402

PROBES = (("digit", "one_digit"), ("colour", "one_digit"), ("shuffled_digit", "one_digit"), ("answer", "which"))
"""The label columns probed, each with its rows: the digit shown, its colour, the digits shuffled across rows (the
control), on one-digit scenes; the answer to "which digit is <colour> ?" on scenes of two or three digits."""

QUESTION = "how many digits are there ?"
"""The question every row asks: it names neither the digit nor the colour."""


def probing_rows(scans: DigitScans, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` held-out scenes of one digit each: every digit and colour equally often (in a random order), each in a
    random cell, drawn from the held-out scans; with the labels as columns."""
    digits = rng.permutation(np.resize(np.arange(10), count))
    colours = rng.permutation(np.resize(np.array(list(COLOURS)), count))
    rows = []
    for digit, colour in zip(digits, colours):
        scan = int(rng.choice(scans.scans_of(int(digit), "held_out")))
        scene = Scene((SceneObject(int(digit), str(colour), int(rng.integers(GRID * GRID)), scan),))
        rows.append({"images": [scene.image(scans)], "prompt": QUESTION, "digit": str(digit), "colour": str(colour)})
    shuffled = rng.permutation([row["digit"] for row in rows])
    for row, label in zip(rows, shuffled):
        row["shuffled_digit"] = str(label)
    return rows


def which_rows(scans: DigitScans, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` held-out scenes of two or three digits, each asked "which digit is <colour> ?" about one of them, with
    the answer (a digit) as a column."""
    rows = []
    while len(rows) < count:
        scene = random_scene(rng, scans, "held_out")
        if len(scene.objects) < 2:
            continue
        question = ask(scene, "which", rng)
        rows.append({"images": [scene.image(scans)], "prompt": question.text, "answer": question.answer})
    return rows


def run(args) -> dict:
    """Train the demo's SAE-V and probe each label; the measurements."""
    started = time.perf_counter()
    model, processor = load_grounded_llava()
    recipe = load_recipe(None)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    demo = DemoArguments(**({"saev_steps": args.saev_steps} if args.saev_steps else {}))
    with tempfile.TemporaryDirectory() as folder:
        sae = train_scene_saev(model, processor, scans, demo.saev_arguments(), folder, progress=False)
    trained = time.perf_counter()
    rows = {"one_digit": probing_rows(scans, args.rows, np.random.default_rng([args.seed, 3])),
            "which": which_rows(scans, args.rows, np.random.default_rng([args.seed, 4]))}
    probes = {}
    for label, name in PROBES:
        dataset = datasets.Dataset.from_list(rows[name])
        metrics = evaluate_saev(sae, model, processor, dataset, batch_size=32, num_examples=None,
                                compute_ce_loss=False, probe_label_column=label, probe_k=args.k,
                                probe_test_fraction=args.test_fraction, probe_seed=args.seed)
        probes[label] = metrics["sparse_probing"]
        if name == "one_digit":
            l0 = {split: metrics[split]["l0"] for split in ("all", "text", "image")}
            image_positions = metrics["image"]["tokens"] / len(dataset)
    return {"rows": args.rows, "layer": demo.layer, "d_sae": sae.config.d_sae, "d_in": sae.config.d_in,
            "saev_steps": args.saev_steps or demo.saev_steps, "question": QUESTION,
            "l0": l0, "image_positions_per_row": image_positions,
            "seconds": {"saev_training": trained - started, "probing": time.perf_counter() - trained},
            "probes": probes}


def command(args) -> str:
    """The command line that reproduces a run."""
    return (f"python benchmarks/sparse_probing.py --rows {args.rows} --k {' '.join(map(str, args.k))} "
            f"--test-fraction {args.test_fraction} --seed {args.seed}"
            + (f" --saev-steps {args.saev_steps}" if args.saev_steps else ""))


def report_markdown(args, result: dict) -> str:
    """The results as markdown: one table per label (rows: probes; columns: all, text, image positions)."""
    lines = ["# Sparse probing of the grounded miniature's SAE-V on its concepts", "",
             (f"Command: `{command(args)}` (SAE-V training and probing: {result['seconds']['saev_training']:.0f} s "
              f"and {result['seconds']['probing']:.0f} s on one CPU thread). SAE-V as `saev demo` trains it (layer "
              f"{result['layer']}, {result['d_sae']} features, {result['saev_steps']} steps; L0 "
              f"{result['l0']['image']:.1f} on image positions, {result['l0']['text']:.1f} on text positions). "
              f"{result['rows']} held-out scenes of one digit in one colour in one of 9 cells "
              f"({result['image_positions_per_row']:.0f} image positions per row), asked \"{result['question']}\"; "
              f"and {result['rows']} held-out scenes of two or three digits, each asked \"which digit is <colour> ?\". "
              f"Accuracy on balanced one-vs-rest test sets, mean over classes (chance 0.5); the residual-stream "
              f"probe reads all {result['d_in']} dimensions."), ""]
    titles = {"digit": "Which digit is shown", "colour": "Which colour it is in",
              "shuffled_digit": "Control: the digit labels shuffled across rows",
              "answer": "The answer to \"which digit is <colour> ?\" about a scene of two or three digits"}
    for label, _ in PROBES:
        lines += [f"## {titles[label]} (`{label}`)", "", *format_probing_table(result["probes"][label]), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Run, print and write `sparse_probing.md` and `.json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="held-out scenes probed, of each kind")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50], help="features per sparse probe")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class held out for testing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--saev-steps", type=int, default=None, help="SAE-V training steps (default: the demo's)")
    add_output_dir(parser)
    args = parser.parse_args(argv)
    result = run(args)
    result["command"] = command(args)
    text = report_markdown(args, result)
    print(text)
    output_path(args, "sparse_probing").write_text(text)
    output_path(args, "sparse_probing", ".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
