"""Benchmark: how reproducible are the demo's SAE-V and the gate's figures across thread counts? (issue 25, item 5)

The same command gave 72 weighted features on one machine and 66 in the committed gate table. This trains the demo's
SAE-V (`DemoArguments().saev_arguments()`, seed 0) on the embedded grounded LLaVA once per intra-op thread count in
`--threads` (in one process: only the thread count changes), and per run measures what the demo and the gate report:
delta, weighted features, concepts with a shared feature, the gate's AUROCs on image-question pairs, and the AUROC of
each SAE-V score on the demo's preference rows; and, between runs, the largest difference of the trained weights.

Writes `reproducibility.md` / `.json` to `--output-dir`.

    python benchmarks/reproducibility.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, output_path  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from saev_hf.demo.gate import auroc, measure_gate  # noqa: E402
from saev_hf.demo.grounded_llava import answer_accuracy  # noqa: E402
from saev_hf.demo.run import SCORE_COLUMNS, DemoArguments, load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.scene_saev import train_scene_saev  # noqa: E402
from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows  # noqa: E402
from saev_hf.scoring import SAEVScorer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_output_dir(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 1])
    parser.add_argument("--rows", type=int, default=600, help="Demo preference rows scored per run.")
    parser.add_argument("--saev", type=json.loads, default={}, help="JSON of SceneSAEVArguments overrides.")
    parser.add_argument("--name", default="reproducibility")
    return parser.parse_args(argv)


def measure(threads: int, model, processor, scans, held_out, answers, args) -> tuple[dict, dict]:
    """Train the demo's SAE-V with `threads` intra-op threads and measure the demo's and the gate's
    figures; return them and the SAE-V's weights."""
    from dataclasses import replace

    torch.set_num_threads(threads)
    demo = DemoArguments()
    saev_args = replace(demo.saev_arguments(), **args.saev)
    with tempfile.TemporaryDirectory() as folder:
        sae = train_scene_saev(model, processor, scans, saev_args, folder, progress=False)
    gate = measure_gate(model, processor, sae, saev_args.layer, scans, held_out, answers, seed=0)
    rows = preference_rows(scans, args.rows, "train", np.random.default_rng([demo.seed, 5]),
                           low_quality_fraction=demo.low_quality_fraction)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("images", "prompt")} for r in rows])
    scored = dataset.map(SAEVScorer(sae, model, processor), batched=True, batch_size=32, load_from_cache_file=False)
    clean = ~np.array([r["low_quality"] for r in rows])
    result = {"threads": threads, "delta": sae.config.cooccurrence_threshold,
              "weighted_features": gate["weighted_features"], "shared_concepts": gate["shared_concepts"],
              "gate_auroc": gate["auroc"],
              "demo_auroc": {name: auroc(clean, np.array(scored[column], dtype=float))
                             for name, column in SCORE_COLUMNS.items()}}
    return result, {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}


def main(args: argparse.Namespace) -> dict:
    """Measure every thread count of `args.threads`; write the json and md; return the record."""
    started = time.perf_counter()
    datasets.disable_progress_bars()
    model, processor = load_grounded_llava()
    scans = DigitScans(load_recipe().held_out_fraction, seed=load_recipe().seed)
    held_out = question_rows(scans, 600, "held_out", np.random.default_rng([0, 99]), absent_fraction=0.25)
    answers = answer_accuracy(model, processor, held_out)
    runs, states = [], []
    for threads in args.threads:
        result, state = measure(threads, model, processor, scans, held_out, answers, args)
        if states:
            result["max_weight_difference_to_first"] = max(float((state[k] - states[0][k]).abs().max())
                                                          for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
        runs.append(result)
        states.append(state)
        print(result, flush=True)
    record = {"command": "python benchmarks/reproducibility.py" + "".join(f" {a}" for a in sys.argv[1:]),
              "torch": torch.__version__, "runs": runs, "minutes": (time.perf_counter() - started) / 60}
    output_path(args, args.name, ".json").write_text(json.dumps(record, indent=2))
    output_path(args, args.name).write_text(markdown(record))
    return record


def markdown(record: dict) -> str:
    """The reproducibility table of `record`, as markdown."""
    scores = list(record["runs"][0]["demo_auroc"])
    lines = ["# Are the demo's SAE-V and the gate reproducible across thread counts?", "",
             f"`{record['command']}` ({record['minutes']:.1f} min, torch {record['torch']}). The demo's SAE-V (seed 0) "
             "trained once per intra-op thread count, in one process, on the embedded grounded LLaVA.", "",
             "| threads | delta | weighted features | shared concepts | gate AUROC cosine / co-occ. L0 | "
             + " | ".join(f"demo AUROC {s}" for s in scores) + " | max weight difference to run 1 |",
             "|---|---|---|---|---|" + "---|" * len(scores) + "---|"]
    for r in record["runs"]:
        lines.append(f"| {r['threads']} | {r['delta']:.4f} | {r['weighted_features']} | {r['shared_concepts']} | "
                     f"{r['gate_auroc']['cosine']:.3f} / {r['gate_auroc']['cooccur_l0']:.3f} | "
                     + " | ".join(f"{r['demo_auroc'][s]:.3f}" for s in scores)
                     + f" | {r.get('max_weight_difference_to_first', 0.0):.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(main(parse_args())))
