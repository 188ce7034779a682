"""Benchmark: grounded LLaVAs that differ only in their instruction tuning (issue 12, item 5's search for a model on
which DPO matters).

Stages 1-2 of the grounded LLaVA's recipe (`saev_hf.demo.grounded_llava`: language model, then feature alignment) run
once with the default arguments; stage 3 (instruction tuning) then runs from that same state once per
`--variants` entry `[absent_fraction, steps]` or `[absent_fraction, steps, hallucination_fraction]`: fewer questions
about absent objects leave more hallucinations, fewer steps leave the model less trained, and a share of absent-object
questions answered with a borrowed hallucination teaches the model to hallucinate as imperfect instruction data does. Each variant is saved (model, processor, `recipe.json` with its arguments)
under `--output-dir/abs{fraction}_s{steps}` and its held-out answers measured (600 questions, 25% about absent
objects): accuracy, hallucination rate, accuracy per question kind. The variants stop after stage 3
(`imperfect_steps=0`); `imperfect_instruction.py` varies stage 4. `benchmarks/scene_dpo.py --model-dir` then asks
whether DPO on the scene preference rows helps that model.

The stages are the recipe's own (`grounded_llava.train_stage`); they draw every random row from numpy, seeded per
stage, and consume no torch randomness, so a variant with the default fraction and steps is exactly the model
`train_grounded_llava` trains (tested). About 14 min for stages 1-2 plus 3-11 min per variant on one thread (measured on a shared 2-core machine).

    python benchmarks/instruction_variants.py --variants '[[0.03, 2000], [0.1, 400]]' --output-dir scratch/variants
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
import torch  # noqa: E402

from saev_hf.demo import grounded_llava as gl  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="[[0.03, 2000], [0.1, 400]]",
                        help="JSON list of [instruction_absent_fraction, instruction_steps] or [instruction_absent_"
                             "fraction, instruction_steps, instruction_hallucination_fraction].")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--recipe", default="{}", help="JSON of GroundedLlavaArguments overrides for every stage.")
    return parser.parse_args(argv)


def aligned_model(args: gl.GroundedLlavaArguments, scans: DigitScans):
    """The recipe's model after stages 1-2 (language model, feature alignment)."""
    model, processor = gl.build_grounded_llava(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        for offset in (0, 1):
            gl.train_stage(model, processor, scans, args, offset)
    return model, processor


def run(options: argparse.Namespace) -> list[dict]:
    """Train and save each stage-3 variant of one aligned model, write instruction_variants.json; return the results."""
    recipe = gl.GroundedLlavaArguments(**json.loads(options.recipe))
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    started = time.perf_counter()
    aligned, processor = aligned_model(recipe, scans)
    held_out = question_rows(scans, options.eval_rows, "held_out", np.random.default_rng([recipe.seed, 99]),
                             absent_fraction=0.25)
    results = []
    for fraction, steps, *hallucination in json.loads(options.variants):
        args = replace(recipe, instruction_absent_fraction=fraction, instruction_steps=steps,
                       instruction_hallucination_fraction=hallucination[0] if hallucination else 0.0,
                       imperfect_steps=0)  # stage-3 variants: no stage 4 (benchmarks/imperfect_instruction.py)
        model = copy.deepcopy(aligned)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 1)
            gl.train_stage(model, processor, scans, args, gl.RECIPE_STAGES.index("instruction"))
        measured = gl.answer_accuracy(model, processor, held_out)
        folder = Path(options.output_dir) / (f"abs{fraction}_s{steps}" + (f"_hal{hallucination[0]}" if hallucination
                                                                          else ""))
        gl.save_grounded_llava(model, processor, {"arguments": asdict(args), "held_out": measured,
                                                  "made_by": "benchmarks/instruction_variants.py"}, folder)
        results.append({"instruction_absent_fraction": fraction, "instruction_steps": steps,
                        "instruction_hallucination_fraction": args.instruction_hallucination_fraction,
                        "folder": str(folder),
                        **measured})
        print(json.dumps(results[-1]), flush=True)
    (Path(options.output_dir) / "instruction_variants.json").write_text(json.dumps(
        {"command": "python benchmarks/instruction_variants.py " + " ".join(sys.argv[1:]), "variants": results,
         "minutes": (time.perf_counter() - started) / 60}, indent=2))
    return results


if __name__ == "__main__":
    run(parse_args())
