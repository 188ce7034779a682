"""Benchmark: resident memory over long runs, which must stay flat after warm-up (issue 28, item 4).

Three long runs on the tiny LLaVA (`saev_hf.testing.tiny_models`, 32x32 images) with a random SAE-V, each sampled by
a thread that reads the process's resident set size (RSS, `psutil`) every `--interval` seconds beside a progress
counter:

1. **scoring**: `datasets.map(SAEVScorer(...), batched=True)` over `--rows` rows of a dataset saved to disk (the map
   writes to its cache file as it goes); RSS at every 1,000 rows;
2. **weighting a stream**: `compute_feature_weights` over the same rows as a `datasets.IterableDataset` (both passes,
   `num_examples` = all of them); RSS at every 1,000 rows read;
3. **training**: `train_saev` for `--steps` steps (the activation buffer refilled from the dataset, pass after pass);
   RSS at every 1,000 steps.

For each it reports the RSS at each mark, and the growth from the end of warm-up (the mark at `--warmup` of the
total) to the end, in MiB and per 1,000 rows (steps). Usage (about 6 minutes on a 2-core CPU):

    python benchmarks/memory_flat.py
    python benchmarks/memory_flat.py --rows 2000 --steps 1000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import datasets  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from _common import add_output_dir, output_path  # noqa: E402

from saev_hf import SAEV, SAEVConfig  # noqa: E402
from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.scoring import SAEVScorer, ScorerArguments  # noqa: E402
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images  # noqa: E402
from saev_hf.testing.tiny_models import build_tiny_model  # noqa: E402
from saev_hf.training import SAEVTrainer, SAEVTrainingArguments  # noqa: E402
from saev_hf.weighting import WeightingArguments, compute_feature_weights  # noqa: E402

MIB = 1024 * 1024


class RSSSampler:
    """Samples this process's RSS every `interval` seconds, with the value of `progress()` at that moment."""

    def __init__(self, progress, interval: float) -> None:
        self.progress, self.interval = progress, interval
        self.samples: list[tuple[int, int]] = []  # (progress, rss bytes)
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((int(self.progress()), self._process.memory_info().rss))
            time.sleep(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((int(self.progress()), self._process.memory_info().rss))

    def at_marks(self, every: int, total: int) -> list[tuple[int, float]]:
        """(mark, RSS MiB) at each multiple of `every` up to `total`: the first sample taken at or after the mark."""
        marks = []
        for mark in range(every, total + 1, every):
            rss = next((rss for progress, rss in self.samples if progress >= mark), self.samples[-1][1])
            marks.append((mark, rss / MIB))
        return marks


def make_rows(count: int) -> datasets.Dataset:
    """`count` rows of digit images (64 distinct, cycled) and questions."""
    images = digit_images(64, seed=3)
    return datasets.Dataset.from_dict({
        "images": [[images[i % 64][0]] for i in range(count)],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[i % 10]}?" for i in range(count)],
    })


def growth(marks: list[tuple[int, float]], warmup: float) -> dict:
    """RSS growth from the end of warm-up (the first mark at or past `warmup` of the total) to the last mark."""
    total = marks[-1][0]
    start = next(m for m in marks if m[0] >= warmup * total)
    mib = marks[-1][1] - start[1]
    return {"from": start[0], "to": total, "mib": mib,
            "mib_per_1000": mib / max(total - start[0], 1) * 1000, "start_mib": start[1], "end_mib": marks[-1][1]}


def run(args) -> dict:
    """The three runs; their RSS marks and growth."""
    model, processor = build_tiny_model("llava")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=model.config.text_config.hidden_size, d_sae=256, hook_layer=1,
                          cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        make_rows(args.rows).save_to_disk(f"{folder}/rows")
        dataset = datasets.load_from_disk(f"{folder}/rows")

        counter = [0]
        scorer = SAEVScorer(sae, model, processor, args=ScorerArguments(scores=["l0", "cooccur_l0"]))

        def counted(batch, *extra):
            out = scorer(batch, *extra)
            counter[0] += len(batch["prompt"])
            return out

        with RSSSampler(lambda: counter[0], args.interval) as sampler:
            dataset.map(counted, batched=True, batch_size=32, with_indices=True, new_fingerprint="memory-flat",
                        cache_file_name=f"{folder}/scored.arrow", desc="Scoring")
        results["scoring"] = sampler.at_marks(1000, args.rows)

        reader = LayerReader(model, processor, layer=1)
        read = reader.read_inputs
        counter[0] = 0

        def counted_read(inputs, *a, **k):
            counter[0] += inputs["input_ids"].shape[0]
            return read(inputs, *a, **k)

        reader.read_inputs = counted_read
        with RSSSampler(lambda: counter[0], args.interval) as sampler:
            compute_feature_weights(sae, reader, dataset.to_iterable_dataset(),
                                    WeightingArguments(num_examples=args.rows, batch_size=32, threshold_quantile=0.5))
        results["weighting a stream (two passes)"] = sampler.at_marks(1000, 2 * args.rows)

        trainer = SAEVTrainer(SAEVTrainingArguments(output_dir=f"{folder}/sae", layer=1, expansion_factor=4,
                                                    max_steps=args.steps, train_batch_size_tokens=32,
                                                    buffer_size_tokens=512, read_batch_size=8,
                                                    input_scale_estimation_tokens=256, logging_steps=1000,
                                                    disable_tqdm=True), model, processor, dataset)
        with RSSSampler(lambda: trainer.global_step, args.interval) as sampler:
            trainer.train()
        results["training"] = sampler.at_marks(1000, args.steps)
    return {name: {"marks": marks, "growth": growth(marks, args.warmup)} for name, marks in results.items()}


def report_markdown(args, results: dict) -> str:
    """The results as markdown."""
    lines = [f"# Resident memory over long runs (tiny LLaVA, one thread)", "",
             f"Command: `python benchmarks/memory_flat.py --rows {args.rows} --steps {args.steps}`; RSS sampled every "
             f"{args.interval} s; growth measured from the mark at {args.warmup:.0%} of the run to its end.", "",
             "| run | RSS at the end of warm-up (MiB) | at the end (MiB) | growth (MiB) | per 1,000 rows or steps (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        g = result["growth"]
        lines.append(f"| {name} | {g['start_mib']:.1f} | {g['end_mib']:.1f} | {g['mib']:+.1f} | "
                     f"{g['mib_per_1000']:+.2f} |")
    lines += ["", "RSS (MiB) at every 1,000 rows (steps):", ""]
    for name, result in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{mark}: {rss:.0f}" for mark, rss in result["marks"]))
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (checked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows scored, and weighted as a stream")
    parser.add_argument("--steps", type=int, default=10000, help="training steps")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of each run counted as warm-up")
    add_output_dir(parser)
    args = parser.parse_args(argv)
    if args.rows < 1000 or args.steps < 1000 or not 0 <= args.warmup < 1:
        parser.error("--rows and --steps must be at least 1000 (one mark), --warmup in [0, 1)")
    return args


def main(argv=None) -> None:
    """Run, print and write `memory_flat.md` and `.json`."""
    args = parse_args(argv)
    results = run(args)
    text = report_markdown(args, results)
    print(text)
    output_path(args, "memory_flat").write_text(text)
    output_path(args, "memory_flat", ".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
