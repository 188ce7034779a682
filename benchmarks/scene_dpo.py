"""Benchmark: does DPO on the scene preference rows help the grounded tiny LLaVA? (issue 12, item 5)

Before a filtering sweep can show anything, DPO on the clean rows must raise held-out accuracy and lower the
hallucination rate over the model before DPO, and DPO on all rows (clean + a known 40% of low-quality rows:
hallucinated answers about absent objects, swapped images) must do worse than on the clean rows. For each DPO set-up in
`--configs` (JSON list of `SceneDPOArguments` overrides) this trains a copy of the model on the clean rows and on all
rows (`saev_hf.demo.preference.dpo_and_evaluate`) and measures both on held-out scenes. `--on-policy` replaces each
clean row's rejected answer by the model's own most likely wrong answer; `--refusal-rejected` makes that share of the
clean rows about a present object reject the over-cautious "none"; `--seeds` repeats everything per seed (rows,
held-out questions, batch order) and reports mean ± std, and whether each effect exceeds the seed spread. The
accuracy per question kind shows what DPO changed: for example, answering "none" more often to every "where"
question is a prior, not grounding.

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
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402

from saev_hf.demo.run import load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.grounded_llava import answer_accuracy, predict_answers  # noqa: E402
from saev_hf.demo.preference import SceneDPOArguments, dpo_and_evaluate  # noqa: E402
from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows  # noqa: E402

DEFAULT_CONFIGS = [{"steps": 200, "learning_rate": 5e-5}, {"steps": 200, "learning_rate": 1e-5},
                   {"steps": 200, "learning_rate": 5e-5, "beta": 0.5},
                   {"steps": 200, "learning_rate": 2e-4, "lora": True},
                   {"steps": 200, "learning_rate": 5e-5, "beta": 0.5, "sft_weight": 1.0}]


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--model-dir", default=None, help="A grounded LLaVA folder (default: the embedded one).")
    parser.add_argument("--configs", default=json.dumps(DEFAULT_CONFIGS))
    parser.add_argument("--num-pairs", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--on-policy", action="store_true")
    parser.add_argument("--refusal-rejected", type=float, default=0.0,
                        help="preference_rows' refusal_rejected_fraction: share of clean rows about a present object "
                             "that reject the over-cautious 'none'.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Seeds of the rows, the held-out questions and DPO's batch order (mean ± std over them).")
    return parser.parse_args(argv)


def on_policy(model, processor, rows):
    """Each row with its rejected answer replaced by the model's most likely answer other than the chosen one."""
    rejected = predict_answers(model, processor, rows, exclude=[row["chosen"] for row in rows])
    return [{**row, "rejected": answer} for row, answer in zip(rows, rejected)]


def run_seed(seed: int, args: argparse.Namespace, model, processor, scans: DigitScans) -> dict:
    """One seed: the model's held-out answers before DPO and after DPO with each config on the clean and all rows."""
    eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([seed, 99]),
                              absent_fraction=0.25)
    rows = preference_rows(scans, args.num_pairs, "train", np.random.default_rng([seed, 5]),
                           low_quality_fraction=0.4, refusal_rejected_fraction=args.refusal_rejected)
    if args.on_policy:
        # the clean rows of both subsets reject the model's own answer, so that the subsets differ only by the
        # low-quality rows
        clean = iter(on_policy(model, processor, [row for row in rows if not row["low_quality"]]))
        rows = [row if row["low_quality"] else next(clean) for row in rows]
    clean = [row for row in rows if not row["low_quality"]]
    results = []
    for overrides in json.loads(args.configs):
        config = SceneDPOArguments(**{"seed": seed, **overrides})
        entry = {"config": overrides}
        for name, subset in (("clean", clean), ("all", rows)):
            with tempfile.TemporaryDirectory() as folder:
                entry[name] = dpo_and_evaluate(model, processor, subset, eval_rows, config, folder)
        results.append(entry)
    return {"seed": seed, "base": answer_accuracy(model, processor, eval_rows), "num_pairs": len(rows),
            "num_clean": len(clean), "results": results}


def run(args: argparse.Namespace) -> dict:
    """Run every seed, write scene_dpo.json and scene_dpo.md to args.output_dir; return the record."""
    started = time.perf_counter()
    model, processor = load_grounded_llava(args.model_dir)
    recipe = load_recipe(args.model_dir)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    seeds = [run_seed(seed, args, model, processor, scans) for seed in args.seeds]
    record = {"command": "python benchmarks/scene_dpo.py " + " ".join(sys.argv[1:]),
              "model": args.model_dir or "the embedded grounded LLaVA", "recipe": asdict(recipe),
              "on_policy": args.on_policy, "refusal_rejected": args.refusal_rejected, "seeds": seeds,
              "seconds": time.perf_counter() - started}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "scene_dpo.json").write_text(json.dumps(record, indent=2))
    (output / "scene_dpo.md").write_text(markdown(record))
    return record


def _stat(values: list[float]) -> str:
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{mean:.1%} ± {std:.1%}" if len(values) > 1 else f"{mean:.1%}"


def _beyond(a: list[float], b: list[float]) -> bool:
    """Whether mean(a) exceeds mean(b) by more than their two sample stds summed (one seed: by anything)."""
    spread = sum(float(np.std(v, ddof=1)) for v in (a, b)) if len(a) > 1 else 0.0
    return float(np.mean(a)) - float(np.mean(b)) > spread


def _paired(a: list[float], b: list[float], better: int) -> str:
    """Per-seed differences a - b in points: mean ± std, and in how many seeds their sign is `better` (+1 / -1)."""
    diff = 100 * (np.array(a) - np.array(b))
    spread = f" ± {np.std(diff, ddof=1):.1f}" if len(diff) > 1 else ""
    return f"{np.mean(diff):+.1f}{spread} ({int((np.sign(diff) == better).sum())}/{len(diff)} seeds)"


def _imperfect(recipe: dict) -> str:
    """The recipe's stage 4 in words (recipes saved before it existed, or with it off, have none)."""
    if not recipe.get("imperfect_steps"):
        return ""
    return (f"; then imperfect instruction tuning: {recipe['imperfect_steps']} steps, "
            f"{recipe['imperfect_absent_fraction']:.0%} about absent objects, "
            f"{recipe['imperfect_hallucination_fraction']:.0%} of those answered with a borrowed hallucination")


def markdown(record: dict) -> str:
    """The report of `record`: each DPO config on clean vs all rows, per-seed paired effects, accuracy per kind."""
    seeds = record["seeds"]
    base = {key: [s["base"][key] for s in seeds] for key in ("accuracy", "hallucination_rate")}
    policy = ", clean rows rejecting the model's own likeliest wrong answer" if record["on_policy"] else ""
    refusal = (f", {record['refusal_rejected']:.0%} of the clean rows about a present object rejecting 'none'"
               if record["refusal_rejected"] else "")
    recipe = record["recipe"]
    lines = [
        "# Does DPO on the scene preference rows help the grounded tiny LLaVA?",
        "",
        f"`{record['command']}` ({record['seconds'] / 60:.1f} min, one thread). Model: {record['model']} "
        f"(instruction tuning: {recipe['instruction_steps']} steps, {recipe['instruction_absent_fraction']:.0%} of "
        f"its questions about absent objects{_imperfect(recipe)}). {seeds[0]['num_pairs']} preference rows per seed "
        f"({seeds[0]['num_clean']} clean){policy}{refusal}; {seeds[0]['base']['rows']} held-out questions (25% about "
        f"absent objects). Seeds {', '.join(str(s['seed']) for s in seeds)} (mean ± sample std). Before DPO: "
        f"accuracy {_stat(base['accuracy'])}, hallucination rate {_stat(base['hallucination_rate'])}.",
        "",
        "'Clean helps' needs higher accuracy and a lower hallucination rate than before DPO, each beyond the seed "
        "spread; 'all worse' needs the clean rows' accuracy above all rows' and their hallucination rate below, "
        "likewise.",
        "",
        "| DPO set-up | clean rows: accuracy | clean rows: hallucination | all rows: accuracy | all rows: hallucination "
        "| clean helps? | all worse? |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, entry in enumerate(seeds[0]["results"]):
        got = {subset: {key: [s["results"][i][subset][key] for s in seeds] for key in base}
               for subset in ("clean", "all")}
        c, a = got["clean"], got["all"]
        helps = _beyond(c["accuracy"], base["accuracy"]) and _beyond(base["hallucination_rate"],
                                                                      c["hallucination_rate"])
        worse = _beyond(c["accuracy"], a["accuracy"]) and _beyond(a["hallucination_rate"], c["hallucination_rate"])
        lines.append(f"| `{json.dumps(entry['config'])}` | {_stat(c['accuracy'])} | "
                     f"{_stat(c['hallucination_rate'])} | {_stat(a['accuracy'])} | {_stat(a['hallucination_rate'])} "
                     f"| {'yes' if helps else 'no'} | {'yes' if worse else 'no'} |")
    lines += ["", "The same effects paired per seed (each seed's DPO runs and its model before DPO answer the same "
              "held-out questions, so a per-seed difference carries no sampling noise of the questions): mean ± "
              "sample std of the differences in points, and the seeds where the effect goes the right way.", "",
              "| DPO set-up | clean − before: accuracy | clean − before: hallucination | clean − all: accuracy | "
              "clean − all: hallucination |", "|---|---|---|---|---|"]
    for i, entry in enumerate(seeds[0]["results"]):
        cells = []
        for minus in ("base", "all"):
            for key, better in (("accuracy", 1), ("hallucination_rate", -1)):
                other = [s["base"][key] if minus == "base" else s["results"][i]["all"][key] for s in seeds]
                cells.append(_paired([s["results"][i]["clean"][key] for s in seeds], other, better))
        lines.append(f"| `{json.dumps(entry['config'])}` | " + " | ".join(cells) + " |")
    kinds = sorted({k for s in seeds for k in s["base"]["by_kind"]})

    def share(values: list[float]) -> str:  # a kind a small run drew no question of has no accuracy
        present = [v for v in values if v is not None]
        return f"{np.mean(present):.0%}" if present else "-"

    lines += ["", "Accuracy per question kind (mean over seeds; `_absent`: about an object the image lacks, where "
              "the faithful answer is none / no):", "",
              "| DPO set-up | subset | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds),
              "| (before DPO) | - | " + " | ".join(
                  share([s["base"]["by_kind"].get(k) for s in seeds]) for k in kinds) + " |"]
    for i, entry in enumerate(seeds[0]["results"]):
        for subset in ("clean", "all"):
            lines.append(f"| `{json.dumps(entry['config'])}` | {subset} | " + " | ".join(
                share([s["results"][i][subset]["by_kind"].get(k) for s in seeds]) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(run(parse_args())))
