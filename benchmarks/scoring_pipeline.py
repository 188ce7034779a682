"""Benchmark: the scorer's input pipeline (forward batches grouped by length, prepared ahead by DataLoader workers)
against the scorer as `ds.map(scorer, batched=True, batch_size=8)` runs it without one.

`SAEVScorer` can split each map batch into forward batches of `forward_batch_size` rows, group rows of similar length
within it (`group_by_length`: the map batch is the window) and prepare the next forward batches in
`preprocessing_workers` DataLoader worker processes while the model runs the current one (`saev_hf/pipeline.py`).
This script scores the same rows with each setting, calling the scorer on map batches exactly as `datasets.map`
calls it (with the dataset indices), and reports, side by side in one run:

* **rows/s** with preprocessing included (image decoding, chat template, processor, forward to layer L, SAE-V encode
  and scores), and its ratio to the setting without a pipeline, the median over repetitions of the per-repetition
  ratio, with its interquartile range;
* the **padding fraction**: the share of the forward's positions that are padding, over all forward batches;
* the time of the **preparation alone** (no forward) as a share of the scorer's without a pipeline: the most that
  preparing ahead in workers can hide.

Before timing, it checks that every setting gives the scores of the plain scorer (within 1e-5), in the dataset's
order.

**Model and SAE-V**: the scaled LLaVA of `scoring_speed.py` (Llama text model of hidden size 512, 16 layers, vocabulary
32064; tiny vision tower and processor), layer 8, the x16 SAE-V of that benchmark. **Rows**: digit images stored as
PNG bytes of `--image-size` pixels (undecoded, as `saev score` hands them to the scorer), with either the prompts of
`scoring_speed.py` ("benchmark prompts") or those prompts after 0-6 copies of a 7-word sentence, seeded
("mixed-length prompts", as prompts of real data vary in length).

Usage (about 3 minutes on a 2-core CPU with the defaults):

    python benchmarks/scoring_pipeline.py --json benchmarks/results/scoring_pipeline.json \
        --markdown benchmarks/results/scoring_pipeline.md
    python benchmarks/scoring_pipeline.py --examples 64 --map-batch-size 64 --workers 1 --repeats 5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from _common import add_output_dir, interleaved_timings, output_path, quartiles  # noqa: E402
from layer_capture import PROMPTS, add_scaled_llava_arguments, build_scaled_llava  # noqa: E402
from scoring_speed import counted_hidden, make_sae  # noqa: E402

from saev_hf import SAEVScorer  # noqa: E402
from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.testing.digit_data import digit_images  # noqa: E402
from saev_hf.data.pipeline import prepared_batches  # noqa: E402
from saev_hf.scoring import ScorerArguments  # noqa: E402

SENTENCE = "look at the picture carefully before answering . "
COLUMNS = ("saev_cosine_score", "saev_l0", "saev_cooccur_l0")
PREPARATION = "preparation alone"


def make_rows(num_examples: int, image_size: int, mixed: bool, seed: int) -> dict[str, list]:
    """Rows as `saev score` hands them to the scorer: PNG bytes (undecoded) and a prompt."""
    rng = random.Random(seed)
    images = []
    for image, _ in digit_images(num_examples, seed=0):
        buffer = io.BytesIO()
        image.convert("RGB").resize((image_size, image_size)).save(buffer, format="PNG")
        images.append([{"bytes": buffer.getvalue(), "path": None}])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_examples)]
    if mixed:
        prompts = [SENTENCE * rng.randrange(7) + prompt for prompt in prompts]
    return {"images": images, "prompt": prompts}


def map_batches(rows: dict[str, list], size: int) -> list[tuple[dict[str, list], list[int]]]:
    """`(batch, indices)` as `ds.map(scorer, batched=True, batch_size=size, with_indices=True)` passes them."""
    n = len(rows["prompt"])
    return [({name: values[s : s + size] for name, values in rows.items()}, list(range(s, min(s + size, n))))
            for s in range(0, n, size)]


def score_all(scorer: SAEVScorer, batches) -> dict[str, list]:
    """The score columns of every row, `scorer` called on each map batch in turn."""
    out = {name: [] for name in COLUMNS}
    for batch, indices in batches:
        for name, values in scorer(batch, indices).items():
            out[name] += values
    return out


def padding_fraction(reader: LayerReader, batches, forward_batch_size: int | None, group: bool) -> float:
    """Padding positions / all positions of the forward batches that a setting runs."""
    padded = total = 0
    for batch, indices in batches:
        for prepared in prepared_batches(reader, batch, forward_batch_size or len(indices), row_ids=indices,
                                         group_by_length=group):
            mask = prepared.check()["attention_mask"]
            padded += int((mask == 0).sum())
            total += mask.numel()
    return padded / total


@torch.no_grad()
def main(argv=None) -> None:
    """Time the scorer per pipeline setting (scores checked equal) on both row sets; print and write the md and json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="rows scored per repetition")
    parser.add_argument("--batch-size", type=int, default=8, help="map batch size without a pipeline, and "
                        "forward_batch_size with one")
    parser.add_argument("--map-batch-size", type=int, default=64, help="map batch size with the pipeline (the "
                        "length-grouping window)")
    parser.add_argument("--workers", type=int, default=1, help="preprocessing_workers of the pipelined settings")
    parser.add_argument("--image-size", type=int, default=336, help="side of the stored PNG images, in pixels")
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=32064)
    add_scaled_llava_arguments(parser)
    add_output_dir(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    model, processor = build_scaled_llava(args.vocab_size, args)
    reader = LayerReader(model, processor, layer=args.layer)
    datasets_ = {name: make_rows(args.examples, args.image_size, mixed, args.seed)
                 for name, mixed in (("benchmark prompts", False), ("mixed-length prompts", True))}
    sample = reader.read_inputs(reader.prepare(datasets_["mixed-length prompts"]))
    sae = make_sae(args.expansion, args.layer, [counted_hidden(sample)], 0.99, args.seed)
    b, m = args.batch_size, args.map_batch_size
    settings = {  # name: (map batch size, scorer arguments)
        f"no pipeline (map batch {b})": (b, ScorerArguments()),
        f"grouped (map batch {m}, forward {b})": (m, ScorerArguments(forward_batch_size=b, group_by_length=True)),
        f"workers={args.workers} (map batch {m}, forward {b})":
            (m, ScorerArguments(forward_batch_size=b, preprocessing_workers=args.workers)),
        f"grouped + workers={args.workers}":
            (m, ScorerArguments(forward_batch_size=b, group_by_length=True, preprocessing_workers=args.workers)),
    }
    scorers = {name: SAEVScorer(sae, model, processor, args=arguments) for name, (_, arguments) in settings.items()}
    names = list(settings)
    results = {}
    for data_name, rows in datasets_.items():
        batches = {name: map_batches(rows, size) for name, (size, _) in settings.items()}
        want = score_all(scorers[names[0]], batches[names[0]])
        for name in names[1:]:  # every setting gives the same scores, in the dataset's order
            got = score_all(scorers[name], batches[name])
            for column in COLUMNS:
                torch.testing.assert_close(torch.tensor(got[column], dtype=torch.float64),
                                           torch.tensor(want[column], dtype=torch.float64), rtol=1e-5, atol=1e-5)
        padding = {name: padding_fraction(reader, batches[name], arguments.forward_batch_size,
                                          arguments.group_by_length) for name, (_, arguments) in settings.items()}
        for _ in range(args.warmup):
            for name in names:
                score_all(scorers[name], batches[name])
        calls = {name: (lambda name=name: score_all(scorers[name], batches[name])) for name in names}
        # the preparation alone, in this process: what overlapping it with the forward can hide at most
        calls[PREPARATION] = lambda: [b.check() for batch, indices in batches[names[0]]
                                      for b in prepared_batches(reader, batch, len(indices), row_ids=indices)]
        times = interleaved_timings(calls, args.repeats, warmup=0)
        results[data_name] = {}
        for name in names:
            ratios = [t0 / t for t0, t in zip(times[names[0]], times[name])]
            results[data_name][name] = {
                "rows_per_s": args.examples / statistics.median(times[name]),
                "speedup": statistics.median(ratios), "speedup_iqr": quartiles(ratios),
                "padding_fraction": padding[name],
            }
        results[data_name][PREPARATION] = {
            "share_of_no_pipeline": statistics.median(t / t0 for t, t0 in zip(times[PREPARATION], times[names[0]]))}
        print(f"{data_name}: scores equal in every setting; timed", flush=True)

    lines = [
        f"SAEVScorer with and without the input pipeline: scaled LLaVA (hidden {args.hidden_size}, {args.num_layers} "
        f"layers, vocab {args.vocab_size}), layer {args.layer}, SAE-V x{args.expansion} (d_sae {sae.config.d_sae}); "
        f"{args.examples} rows with {args.image_size}x{args.image_size} PNG images; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread in the main process; median of {args.repeats} interleaved repetitions "
        f"after {args.warmup} warm-up. Throughput ratios are medians of per-repetition ratios.",
        "",
        "| rows | setting | rows/s | **throughput / no pipeline** | padding fraction |",
        "|---|---|---:|---:|---:|",
    ]
    for data_name, by_setting in results.items():
        for name in names:
            r = by_setting[name]
            low, high = r["speedup_iqr"]
            lines.append(f"| {data_name} | {name} | {r['rows_per_s']:.1f} | **{r['speedup']:.3f}x** (IQR {low:.3f}-"
                         f"{high:.3f}) | {100 * r['padding_fraction']:.1f} % |")
    lines.append("")
    lines += [f"Preparation alone (decoding, chat template, processor; no forward), {data_name}: "
              f"{100 * r[PREPARATION]['share_of_no_pipeline']:.1f} % of the time of the scorer without a pipeline."
              for data_name, r in results.items()]
    print("\n" + "\n".join(lines))
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")
    output_path(args, "scoring_pipeline").write_text("\n".join(lines) + "\n")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    output_path(args, "scoring_pipeline", ".json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
