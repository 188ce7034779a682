"""Benchmark: does DPO on the scene preference rows help the grounded tiny LLaVA? (issue 12, item 5)

Before a filtering sweep can show anything, DPO on the clean rows must raise held-out accuracy and lower the
hallucination rate over the model before DPO, and DPO on all rows (clean + a known 40% of low-quality rows:
hallucinated answers about absent objects, swapped images) must do worse than on the clean rows. For each DPO set-up in
`--configs` (JSON list of `SceneDPOArguments` overrides) this trains a copy of the model on the clean rows and on all
rows (`saev_hf.demo.preference.dpo_and_evaluate`) and measures both on held-out scenes. `--on-policy` replaces each
clean row's rejected answer by the model's own most likely wrong answer.

Writes `scene_dpo.md` and `scene_dpo.json` to `--output-dir`. One thread.

    python benchmarks/scene_dpo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from saev_hf.demo import load_grounded_llava  # noqa: E402
from saev_hf.demo.grounded_llava import answer_accuracy, predict_answers  # noqa: E402
from saev_hf.demo.preference import SceneDPOArguments, dpo_and_evaluate  # noqa: E402
from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows  # noqa: E402

DEFAULT_CONFIGS = [{"steps": 200, "learning_rate": 5e-5}, {"steps": 200, "learning_rate": 1e-5},
                   {"steps": 200, "learning_rate": 5e-5, "beta": 0.5},
                   {"steps": 200, "learning_rate": 2e-4, "lora": True},
                   {"steps": 200, "learning_rate": 5e-5, "beta": 0.5, "sft_weight": 1.0}]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--model-dir", default=None, help="A grounded LLaVA folder (default: the embedded one).")
    parser.add_argument("--configs", default=json.dumps(DEFAULT_CONFIGS))
    parser.add_argument("--num-pairs", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--on-policy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def on_policy(model, processor, rows):
    """Each row with its rejected answer replaced by the model's most likely answer other than the chosen one."""
    rejected = predict_answers(model, processor, rows, exclude=[row["chosen"] for row in rows])
    return [{**row, "rejected": answer} for row, answer in zip(rows, rejected)]


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model, processor = load_grounded_llava(args.model_dir)
    scans = DigitScans()
    eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([args.seed, 99]),
                              absent_fraction=0.25)
    rows = preference_rows(scans, args.num_pairs, "train", np.random.default_rng([args.seed, 5]),
                           low_quality_fraction=0.4)
    clean = [row for row in rows if not row["low_quality"]]
    if args.on_policy:
        clean = on_policy(model, processor, clean)
    base = answer_accuracy(model, processor, eval_rows)
    results = []
    for overrides in json.loads(args.configs):
        config = SceneDPOArguments(**{"seed": args.seed, **overrides})
        entry = {"config": overrides}
        for name, subset in (("clean", clean), ("all", rows)):
            with tempfile.TemporaryDirectory() as folder:
                entry[name] = dpo_and_evaluate(model, processor, subset, eval_rows, config, folder)
        results.append(entry)
    record = {"command": "python benchmarks/scene_dpo.py " + " ".join(sys.argv[1:]), "base": base,
              "num_pairs": len(rows), "num_clean": len(clean), "on_policy": args.on_policy, "results": results,
              "seconds": time.perf_counter() - started}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "scene_dpo.json").write_text(json.dumps(record, indent=2))
    (output / "scene_dpo.md").write_text(markdown(record))
    return record


def markdown(record: dict) -> str:
    base = record["base"]
    policy = ", clean rows rejecting the model's own likeliest wrong answer" if record["on_policy"] else ""
    lines = [
        "# Does DPO on the scene preference rows help the grounded tiny LLaVA?",
        "",
        f"`{record['command']}` ({record['seconds'] / 60:.1f} min, one thread). {record['num_pairs']} preference rows "
        f"({record['num_clean']} clean){policy}; "
        f"{base['rows']} held-out questions (25% about absent objects). Before DPO: accuracy {base['accuracy']:.1%}, "
        f"hallucination rate {base['hallucination_rate']:.1%}.",
        "",
        "| DPO set-up | clean rows: accuracy | clean rows: hallucination | all rows: accuracy | all rows: hallucination | clean helps? |",
        "|---|---|---|---|---|---|",
    ]
    for entry in record["results"]:
        c, a = entry["clean"], entry["all"]
        helps = c["accuracy"] > base["accuracy"] and c["hallucination_rate"] < base["hallucination_rate"]
        lines.append(f"| `{json.dumps(entry['config'])}` | {c['accuracy']:.1%} | {c['hallucination_rate']:.1%} | "
                     f"{a['accuracy']:.1%} | {a['hallucination_rate']:.1%} | {'yes' if helps else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(run(parse_args())))
