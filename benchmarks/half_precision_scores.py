"""Benchmark: how SAE-V's scores move when the MLLM runs in bfloat16 (issue 28, item 8).

The tiny LLaVA (`saev_hf.testing.tiny_models`) scores `--rows` digit rows with a data-driven SAE-V (features along
sampled token states, as the scoring tests build it, so that rows differ in what co-occurs) and its feature weights,
three ways: the model and the SAE-V in float32 (the reference); the model in bfloat16 with the SAE-V in float32 (the
default: the states are upcast before the encode); both in bfloat16. It counts the rows whose each score moved, and
the largest change. Usage (seconds):

    python benchmarks/half_precision_scores.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
from _common import add_output_dir, output_path  # noqa: E402

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.scoring import SAEVScorer  # noqa: E402
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images  # noqa: E402
from saev_hf.testing.tiny_models import build_tiny_model  # noqa: E402
from saev_hf.testing.tiny_saes import data_driven_sae  # noqa: E402
from saev_hf.weighting import WeightingArguments, compute_feature_weights  # noqa: E402


def run(args) -> dict:
    """The three scorings and how far each half-precision one moved from the reference."""
    model, processor = build_tiny_model("llava")
    images = digit_images(args.rows, seed=5)
    rows = datasets.Dataset.from_dict({
        "images": [[image] for image, _ in images],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(images)],
    })
    reader = LayerReader(model, processor, layer=1)
    sae = data_driven_sae(reader, rows)
    compute_feature_weights(sae, reader, rows, WeightingArguments(num_examples=None))
    reference = SAEVScorer(sae, model, processor).score_rows(rows[:])
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    settings = {"bfloat16 model, float32 SAE-V (default)": SAEVScorer(sae, half_model, processor),
                "bfloat16 model, bfloat16 SAE-V": SAEVScorer(copy.deepcopy(sae).to(torch.bfloat16), half_model,
                                                             processor)}
    results = {}
    for name, scorer in settings.items():
        scores = scorer.score_rows(rows[:])
        results[name] = {column: {"rows_moved": sum(abs(a - b) > 1e-6 for a, b in zip(reference[column], values)),
                                  "largest_change": max(abs(a - b) for a, b in zip(reference[column], values))}
                         for column, values in scores.items()}
    return results


def main(argv=None) -> None:
    """Run, print and write `half_precision_scores.md` and `.json`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=26)
    add_output_dir(parser)
    args = parser.parse_args(argv)
    results = run(args)
    columns = list(next(iter(results.values())))
    lines = [f"# Scores from a bfloat16 MLLM against float32 ({args.rows} rows, tiny LLaVA)", "",
             f"Command: `python benchmarks/half_precision_scores.py --rows {args.rows}`. Rows moved (largest change):",
             "", "| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, by_column in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{by_column[c]['rows_moved']} ({by_column[c]['largest_change']:.3g})" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    output_path(args, "half_precision_scores").write_text(text)
    output_path(args, "half_precision_scores", ".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
