"""Benchmark: feature weights and scores on 2 processes (torchrun, gloo, one thread each) against one process.

The script builds a scaled LLaVA (the Llama text model of `layer_capture.py`, smaller by default: hidden 256, 8
layers, vocabulary 32064; the tiny vision tower and processor), an SAE-V on its layer 4 (x8) and `--examples` digit
rows with varied prompts, saved to a temporary folder. Then, in one run:

1. one process (this one) runs `compute_feature_weights` and `score_dataset` (the `saev score` path: `ds.map` with
   the scorer, saved to disk), each timed;
2. `torchrun --standalone --nproc_per_node 2` starts this script again as two workers: each loads the same model,
   waits for the other (a barrier), and runs the same two calls, timed from the barrier to the end of the call on
   every process (the slower process's time counts: the job waits for it);
3. the results are compared: the weights of both workers `torch.equal` (NaN positions included) to one process's,
   `feature_weights_info` equal but for `num_processes`, and the scored dataset equal to one process's, every column.

It reports each step's time on one process, on two (the slower worker), and their ratio (the speed-up). Model loading
and process start-up are not timed: they are the same fixed cost with one process or many.

On a 2-core machine shared with other jobs the two workers compete with whatever else runs, so the speed-up is a
measurement of this machine at that moment, bounded by 2; on N GPUs each process has its own device.

Usage (about 2-3 minutes on a 2-core CPU with the defaults):

    python benchmarks/distributed_weights.py --markdown benchmarks/results/distributed_weights.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, output_path  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

SCRIPT = Path(__file__).resolve()
SHAPE = ("examples", "batch_size", "hidden_size", "intermediate_size", "num_layers", "heads", "kv_heads", "layer",
         "expansion")  # what the workers are told: the run's settings


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line."""
    from layer_capture import add_scaled_llava_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="rows weighted and scored")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward (weights) and per map batch")
    add_scaled_llava_arguments(parser, hidden_size=256, intermediate_size=688, num_layers=8)
    parser.add_argument("--layer", type=int, default=4, help="the layer L the SAE-V reads")
    parser.add_argument("--expansion", type=int, default=8, help="SAE-V expansion factor")
    parser.add_argument("--timeout", type=int, default=900, help="seconds the 2-process run may take")
    add_output_dir(parser)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set for the torchrun workers
    return parser.parse_args(argv)


def build(folder: Path, args: argparse.Namespace) -> None:
    """The model, the SAE-V and the rows, saved to `folder`."""
    import datasets

    from layer_capture import PROMPTS, build_scaled_llava

    from saev_hf import SAEV, SAEVConfig
    from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

    model, processor = build_scaled_llava(32064, args)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=args.hidden_size, expansion_factor=args.expansion, hook_layer=args.layer))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.set_cooccurrence_threshold(0.05, info={"method": "benchmark"})
    sae.save_pretrained(folder / "sae")
    pairs = digit_images(args.examples, seed=1)
    datasets.Dataset.from_dict({
        "images": [[image] for image, _ in pairs],
        "prompt": [f"{PROMPTS[i % len(PROMPTS)]} {'it is ' * (i % 5)}{DIGIT_NAMES[label]}"
                   for i, (_, label) in enumerate(pairs)],
    }).save_to_disk(str(folder / "data"))


def run_both(folder: Path, args: argparse.Namespace, out: Path) -> dict:
    """Weights then scores, each timed (from a barrier when distributed); results saved under `out`."""
    import datasets

    from saev_hf import SAEV, LayerReader, SAEVScorer, WeightingArguments, compute_feature_weights, score_dataset
    from saev_hf.runtime.distributed import distributed_state
    from saev_hf.activations import load_model_and_processor

    state = distributed_state(cpu=True)
    model, processor = load_model_and_processor(str(folder / "model"), device="cpu")
    reader = LayerReader(model, processor, layer=args.layer)
    data = datasets.load_from_disk(str(folder / "data"))
    sae = SAEV.from_pretrained(folder / "sae")
    times = {}

    def barrier() -> None:
        if state is not None:
            state.wait_for_everyone()

    barrier()
    start = time.perf_counter()
    weights = compute_feature_weights(sae, reader, data, WeightingArguments(
        num_examples=None, batch_size=args.batch_size))
    times["weights"] = time.perf_counter() - start
    barrier()
    start = time.perf_counter()
    score_dataset(SAEVScorer(sae, model, processor), data, batch_size=args.batch_size, output_dir=out / "scored",
                  desc="scores")
    times["scores"] = time.perf_counter() - start
    rank = state.process_index if state is not None else "one"
    from safetensors.torch import save_file

    save_file({"weights": weights.contiguous()}, str(out / f"weights_{rank}.safetensors"))
    (out / f"record_{rank}.json").write_text(json.dumps({"times": times,
                                                         "info": sae.config.feature_weights_info}, default=str))
    if state is not None:
        from saev_hf import end_distributed

        end_distributed()
    return times


def main(argv=None) -> None:
    """Time weights and scores in 1 process, then 2 (torchrun), checked equal; print and write the md.
    With --worker: one process of the 2."""
    args = parse_args(argv)
    if args.worker is not None:
        run_both(args.worker, args, args.worker / "two")
        return
    import datasets
    from safetensors.torch import load_file

    load = os.getloadavg()[0]  # the machine's load before the run: other jobs on the same cores
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build(folder, args)
        print(f"built the model, SAE-V and {args.examples} rows in {time.perf_counter() - start:.0f} s", flush=True)
        (folder / "one").mkdir()
        (folder / "two").mkdir()
        one = run_both(folder, args, folder / "one")
        print(f"one process: {one}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        shape = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHAPE]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(SCRIPT), *shape, "--worker", str(folder)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise SystemExit(f"the 2-process run did not finish in {args.timeout} s")
        if process.returncode != 0:
            raise SystemExit(f"the 2-process run failed:\n{stderr[-4000:]}")
        records = [json.loads((folder / "two" / f"record_{r}.json").read_text()) for r in range(2)]
        reference = load_file(folder / "one" / "weights_one.safetensors")["weights"]
        info = json.loads((folder / "one" / "record_one.json").read_text())["info"]
        for r, record in enumerate(records):
            weights = load_file(folder / "two" / f"weights_{r}.safetensors")["weights"]
            assert torch.equal(weights.isnan(), reference.isnan()), f"process {r}: other features weighted"
            assert torch.equal(weights.nan_to_num(), reference.nan_to_num()), f"process {r}: other weights"
            assert record["info"] == {**info, "num_processes": 2}, f"process {r}: another feature_weights_info"
        scored_one = datasets.load_from_disk(str(folder / "one" / "scored"))
        scored_two = datasets.load_from_disk(str(folder / "two" / "scored"))
        undecoded = datasets.Sequence(datasets.Image(decode=False))
        assert scored_two.cast_column("images", undecoded).to_dict() == \
            scored_one.cast_column("images", undecoded).to_dict(), "the 2-process scored dataset differs"
        weighted = int((~reference.isnan()).sum())
        two = {step: max(record["times"][step] for record in records) for step in one}
        lines = [
            "# Feature weights and scores: 2 processes (torchrun, gloo, 1 thread each) vs 1 process",
            "",
            f"Command: `python benchmarks/distributed_weights.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            "",
            f"Scaled LLaVA (hidden {args.hidden_size}, {args.num_layers} layers, vocabulary 32064), layer {args.layer}, "
            f"SAE-V x{args.expansion} (d_sae {args.hidden_size * args.expansion}); {args.examples} digit rows, batches "
            f"of {args.batch_size}. {weighted} features weighted.",
            "",
            "Checked: the weights of both processes `torch.equal` (NaN positions included) to one process's, "
            "`feature_weights_info` equal but for `num_processes`; the 2-process scored dataset equal to one "
            "process's in every column and row.",
            "",
            "| step | 1 process (s) | 2 processes (s, slower process) | speed-up |",
            "|---|---|---|---|",
            *[f"| {step} | {one[step]:.2f} | {two[step]:.2f} | {one[step] / two[step]:.2f}x |" for step in one],
            "",
            f"Measured on a CPU with {os.cpu_count()} cores shared with other jobs (load average {load:.2f} when the "
            f"run started): the two workers share those cores with everything else running, so the speed-up is "
            f"bounded by 2 here and varies with the machine's load; times exclude model loading and process start-up "
            f"(about the same fixed cost per process). Ratios from one run.",
        ]
        report = "\n".join(lines) + "\n"
        print(report)
        output_path(args, "distributed_weights").write_text(report)


if __name__ == "__main__":
    main()
