"""Benchmark: what stage 4 of the grounded LLaVA's recipe (imperfect instruction tuning) does, and whether DPO then has
something it can fix (issue 12, item 5).

DPO from a few hundred preference rows moves the model's preferences between answers it already tells apart; it does
not teach it to see. So before any DPO run this measures, on 600 held-out questions (25% about absent objects), what
the model knows about absence (`saev_hf.demo.gate.absence_knowledge`): per question kind, the AUROC of its own refusal
margin (absent vs present), its accuracy, and the accuracy a better threshold on that margin alone would reach (the
room a preference correction has).

It starts from a model after stage 3 (`--base-dir`; without it, stages 1-3 of the recipe are trained first, about 15
min on one thread), runs stage 4 from it once per `--variants` entry `[absent_fraction, steps, hallucination_fraction,
learning_rate]` (the recipe's default is `[0.25, 1800, 0.5, 3e-4]`: the embedded model), and measures the base, each
variant and any saved model named in `--measure` (e.g. a stage-3 variant of `instruction_variants.py`). Writes
`imperfect_instruction.md` and `.json` to `--output-dir`; `--save-dir` also saves each variant. One thread.

    python benchmarks/imperfect_instruction.py --base-dir <stage-3 model> --measure <other model>
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402

import numpy as np  # noqa: E402

from saev_hf.demo.run import load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo import grounded_llava as gl  # noqa: E402
from saev_hf.demo.gate import absence_knowledge  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402

DEFAULT_VARIANTS = [[0.25, 300, 0.4, 3e-4], [0.25, 300, 0.5, 3e-4], [0.25, 300, 0.6, 3e-4],
                    [0.25, 1800, 0.5, 3e-4], [0.25, 1800, 0.6, 3e-4]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", default=None, help="A grounded LLaVA after stage 3 (default: train stages 1-3).")
    parser.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS),
                        help="JSON list of [imperfect_absent_fraction, imperfect_steps, imperfect_hallucination_"
                             "fraction, imperfect_learning_rate].")
    parser.add_argument("--measure", nargs="*", default=[], help="Saved grounded LLaVAs to measure as they are.")
    parser.add_argument("--recipe", default="{}", help="JSON of GroundedLlavaArguments overrides (without "
                                                       "--base-dir).")
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--save-dir", default=None, help="Save each variant under this folder.")
    return parser.parse_args(argv)


def measure(name: str, model, processor, rows, recipe: gl.GroundedLlavaArguments) -> dict:
    """`name`'s held-out answer accuracy on `rows` and its knowledge of absent objects, with its recipe."""
    return {"model": name, "recipe": asdict(recipe), **gl.answer_accuracy(model, processor, rows),
            "absence": absence_knowledge(model, processor, rows)}


def run(options: argparse.Namespace) -> dict:
    """Measure the base model, the stage-4 variants and the --measure models, write json and md; return the record."""
    started = time.perf_counter()
    if options.base_dir:
        base, processor = load_grounded_llava(options.base_dir)
        recipe = load_recipe(options.base_dir)
        if recipe.imperfect_steps:
            raise ValueError(f"--base-dir {options.base_dir} was trained with stage 4 (imperfect_steps="
                             f"{recipe.imperfect_steps}); give a model after stage 3 (imperfect_steps=0).")
    else:
        recipe = gl.GroundedLlavaArguments(**{**json.loads(options.recipe), "imperfect_steps": 0})
        base, processor, _ = gl.train_grounded_llava(recipe, eval_rows=0)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    rows = question_rows(scans, options.eval_rows, "held_out", np.random.default_rng([recipe.seed, 99]),
                         absent_fraction=0.25)
    results = [measure(options.base_dir or "stages 1-3 of the recipe", base, processor, rows, recipe)]
    for absent, steps, hallucination, learning_rate in json.loads(options.variants):
        args = replace(recipe, imperfect_absent_fraction=absent, imperfect_steps=steps,
                       imperfect_hallucination_fraction=hallucination, imperfect_learning_rate=learning_rate)
        model = copy.deepcopy(base)
        gl.train_stage(model, processor, scans, args, gl.RECIPE_STAGES.index("imperfect_instruction"))
        name = f"+ stage 4: {steps} steps, {absent:.0%} absent, {hallucination:.0%} hallucinated, lr {learning_rate:g}"
        results.append(measure(name, model, processor, rows, args))
        if options.save_dir:
            folder = Path(options.save_dir) / f"abs{absent}_s{steps}_hal{hallucination}_lr{learning_rate:g}"
            gl.save_grounded_llava(model, processor, {"arguments": asdict(args), "held_out": results[-1]}, folder)
        print(json.dumps({k: v for k, v in results[-1].items() if k != "recipe"}), flush=True)
    for folder in options.measure:
        model, other_processor = load_grounded_llava(folder)
        results.append(measure(folder, model, other_processor, rows, load_recipe(folder)))
    record = {"command": "python benchmarks/imperfect_instruction.py " + " ".join(sys.argv[1:]),
              "models": results, "minutes": (time.perf_counter() - started) / 60}
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "imperfect_instruction.json").write_text(json.dumps(record, indent=2))
    (output / "imperfect_instruction.md").write_text(markdown(record))
    return record


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _auroc(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(record: dict) -> str:
    """The report of `record`: a markdown table, a row per model."""
    kinds = ("which", "colour", "where", "exists")
    lines = [
        "# Imperfect instruction tuning: does the model know what it gets wrong?",
        "",
        f"`{record['command']}` ({record['minutes']:.1f} min, one thread). {record['models'][0]['rows']} held-out "
        "questions, 25% about absent objects. Per question kind: the AUROC of the model's own refusal margin "
        "(log-likelihood of none / no minus its likeliest other answer; absent vs present objects), its accuracy now "
        "-> with the best threshold on that margin (what correcting its preference to refuse, and nothing else, "
        "would reach). 'Room' is the overall accuracy that threshold correction adds.",
        "",
        "| model | accuracy | hallucination | " + " | ".join(f"{k}: AUROC, accuracy now -> best threshold"
                                                     for k in kinds) + " | room |",
        "|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for result in record["models"]:
        absence = result["absence"]
        room = sum((absence[k]["best_shift_accuracy"] - absence[k]["accuracy"]) * absence[k]["rows"]
                   for k in kinds if k in absence) / result["rows"]
        cells = [f"{_auroc(absence[k]['auroc'])}, {_pct(absence[k]['accuracy'])} -> "
                 f"{_pct(absence[k]['best_shift_accuracy'])}" if k in absence else "-" for k in kinds]
        lines.append(f"| {result['model']} | {_pct(result['accuracy'])} | {_pct(result['hallucination_rate'])} | "
                     + " | ".join(cells) + f" | +{100 * room:.1f} points |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(parse_args())
