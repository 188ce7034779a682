"""Benchmark: N SAE-Vs trained from one pass of activations (`train_saevs`, `saev train --sweep`) against N separate
runs and against one run (one CPU thread).

Three ways to train, timed side by side in each round (their order rotated from round to round, so that a slow phase
of the shared machine hits them alike):

* **one run**: `train_saev` with the base arguments (the sweep's first member): one base-model pass, one SAE-V;
* **sweep of N**: `train_saevs` with N members: one base-model pass, N SAE-Vs stepped on each batch;
* **N separate runs**: `train_saev` once per member: N base-model passes.

Each includes everything a run does: the input-scale estimate, reading the base model into the shuffling buffer, the
training steps, saving. Reported: the median over rounds of the per-round ratios sweep / one run and N separate runs /
one run (with the range over rounds), in CPU time of this one-thread process (robust to other jobs on a shared
machine) and in wall time, and the share of one run's time spent reading the base model (the forward to
layer L, measured around `LayerReader.read`). The issue's goal: a sweep of 4 under 1.5x the time of one run. The ratio
depends on how the forward's cost compares with one SAE-V's step: reported so that the result can be transposed.

Before timing, the first round checks that each sweep member's SAE-V equals (torch.equal, every tensor) the one its
separate run gives: the sweep does the same work, once per batch read.

**Model**: the tiny LLaVA's forward is too cheap to resemble a real MLLM against an SAE-V's step, so this uses the
scaled LLaVA of `layer_capture.py` / `scoring_pipeline.py` (Llama text model of hidden size 512, 16 layers, 8 heads,
vocabulary 32064; the tiny vision tower and processor), read at layer 8. **SAE-Vs**: d_in 512, a grid over
`l1_coefficient` x `expansion_factor` (x4, x8 by default). **Data**: digit images with the benchmark prompts.

Usage (about 6 minutes on a shared 2-core CPU with the defaults):

    python benchmarks/sweep_training.py --markdown benchmarks/results/sweep_training.md
    python benchmarks/sweep_training.py --l1-coefficients 1 2 5 10 --expansions 4 \
        --markdown benchmarks/results/sweep_training.md --append   # 4 members of one width
    python benchmarks/sweep_training.py --steps 10 --rounds 1 --expansions 2 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, output_path  # noqa: E402

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402

from layer_capture import PROMPTS, add_scaled_llava_arguments, build_scaled_llava  # noqa: E402

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.testing.digit_data import digit_images  # noqa: E402
from saev_hf.training import sweep_members  # noqa: E402
from saev_hf.training import SAEVTrainingArguments, train_saev, train_saevs  # noqa: E402


class ReadClock:
    """CPU time spent in `LayerReader.read` (the base model's forward to layer L), summed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._read = LayerReader.read
        clock = self

        def timed_read(reader, *args, **kwargs):
            start = time.process_time()
            try:
                return clock._read(reader, *args, **kwargs)
            finally:
                clock.seconds += time.process_time() - start

        LayerReader.read = timed_read


def main(argv=None) -> None:
    """Time one run, a sweep and its separate runs (sweep checked equal to them); print and write the md table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=96, help="dataset rows (digit images with prompts)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--buffer-tokens", type=int, default=2048)
    parser.add_argument("--read-batch-size", type=int, default=8)
    parser.add_argument("--l1-coefficients", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--expansions", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32064)
    add_scaled_llava_arguments(parser)
    add_output_dir(parser)
    parser.add_argument("--append", action="store_true", help="append to --markdown instead of replacing it")
    args = parser.parse_args(argv)
    logging.getLogger("saev_hf").setLevel(logging.ERROR)  # "starting pass 1 over the data" with few rows
    datasets.disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model, processor = build_scaled_llava(args.vocab_size, args)
    images = [image for image, _ in digit_images(args.rows, seed=0)]
    dataset = datasets.Dataset.from_dict({"images": [[image] for image in images],
                                          "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]})
    sweep = {"l1_coefficient": args.l1_coefficients, "expansion_factor": args.expansions}
    work = Path(tempfile.mkdtemp(prefix="sweep_training_"))
    base = SAEVTrainingArguments(
        layer=args.layer, output_dir=str(work / "x"), expansion_factor=args.expansions[0],
        l1_coefficient=args.l1_coefficients[0], max_steps=args.steps, train_batch_size_tokens=args.batch_tokens,
        buffer_size_tokens=args.buffer_tokens, read_batch_size=args.read_batch_size, learning_rate=1e-3,
        input_scale_estimation_tokens=args.batch_tokens * 2, logging_steps=8, dead_feature_window=8, save_steps=0,
        disable_tqdm=True,
    )
    members = sweep_members(base, sweep)
    n = len(members)
    clock = ReadClock()

    def one_run(folder):
        return train_saev(dataclasses.replace(members[0].args, output_dir=str(folder)), model, processor, dataset)

    def swept(folder):
        return train_saevs(dataclasses.replace(base, output_dir=str(folder)), sweep, model, processor, dataset)

    def separate(folder):
        return {m.name: train_saev(dataclasses.replace(m.args, output_dir=str(folder / m.name)), model, processor,
                                   dataset) for m in members}

    settings = {"one run": one_run, f"sweep of {n}": swept, f"{n} separate runs": separate}
    times: dict[str, list[float]] = {name: [] for name in settings}  # CPU seconds of this (one-thread) process
    walls: dict[str, list[float]] = {name: [] for name in settings}
    read_share = []
    for round_index in range(args.rounds):
        names = list(settings)
        names = names[round_index % len(names):] + names[: round_index % len(names)]
        results = {}
        for name in names:
            folder = work / f"r{round_index}-{name.replace(' ', '_')}"
            gc.collect()
            clock.seconds = 0.0
            start, start_wall = time.process_time(), time.perf_counter()
            results[name] = settings[name](folder)
            elapsed, wall = time.process_time() - start, time.perf_counter() - start_wall
            times[name].append(elapsed)
            walls[name].append(wall)
            if name == "one run":
                read_share.append(clock.seconds / elapsed)
            print(f"round {round_index}: {name}: CPU {elapsed:.1f} s (reading the base model {clock.seconds:.1f} s), "
                  f"wall {wall:.1f} s", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        if round_index == 0:  # the sweep does the separate runs' work: each member equals its run
            for member in members:
                a, b = results[f"sweep of {n}"][member.name], results[f"{n} separate runs"][member.name]
                assert all(torch.equal(x, y) or (x.isnan().all() and y.isnan().all())
                           for x, y in zip(a.state_dict().values(), b.state_dict().values())), member.name
            assert torch.equal(results["one run"].W_enc, results[f"sweep of {n}"][members[0].name].W_enc)
    shutil.rmtree(work, ignore_errors=True)

    def ratio(name, clock=times):
        values = [t / o for t, o in zip(clock[name], clock["one run"])]
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    command = "python benchmarks/sweep_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"SAE-V sweep training, one CPU thread, {args.rounds} rounds (order rotated); scaled LLaVA (Llama text model "
        f"hidden {args.hidden_size}, {args.num_layers} layers, vocabulary {args.vocab_size}; tiny vision tower), "
        f"layer {args.layer}; {args.steps} steps of {args.batch_tokens} tokens, buffer {args.buffer_tokens}; sweep "
        f"{sweep} = {n} SAE-Vs of d_in {args.hidden_size}. Each sweep member's SAE-V equals its separate run's "
        f"(torch.equal, checked in round 0).",
        "",
        f"Reading the base model (its forward to layer {args.layer}, for the input-scale estimate and the buffer) was "
        f"{statistics.median(read_share):.0%} of one run's time; the x{args.expansions[0]} SAE-V's steps and saving "
        f"are the rest. The sweep's extra cost is its members' SAE-V steps"
        + (f" (x{max(args.expansions)} members step on {max(args.expansions) // args.expansions[0]} times as many "
           f"features)." if len(set(args.expansions)) > 1 else "."),
        "",
        "| training | CPU time / one run's (median, range over rounds) | wall time / one run's |",
        "|---|---|---|",
        "| one run (1 SAE-V) | 1.00x | 1.00x |",
        f"| sweep of {n} (one pass, `train_saevs` / `saev train --sweep`) | **{ratio(f'sweep of {n}')}** | "
        f"{ratio(f'sweep of {n}', walls)} |",
        f"| {n} separate runs | **{ratio(f'{n} separate runs')}** | {ratio(f'{n} separate runs', walls)} |",
        "",
        "CPU time: `time.process_time()` of this one-thread process, which other jobs on the shared machine disturb "
        "much less than wall time (reported beside it).",
        "",
        f"Command: `{command}`",
    ]
    print("\n".join(lines))
    with output_path(args, "sweep_training").open("a" if args.append else "w") as handle:  # --append: add a table
        handle.write(("\n" if args.append else "") + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
