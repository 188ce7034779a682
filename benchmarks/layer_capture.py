"""Benchmark: capturing decoder layer L with `LayerReader` versus a full forward of the model.

`LayerReader.read_inputs` runs an MLLM only up to decoder layer L: a forward hook on layer L raises an exception that
ends the forward, so layers L+1..N-1, the final norm and the lm_head (the logits of every position over the whole
vocabulary) never run. This script measures how much that saves, as the ratio

    speed-up = time of `model(**inputs)` (default outputs: all layers, final norm, lm_head) / time of capturing layer L

for a LLaVA whose text model has sizes in the spirit of real ones but small enough for a CPU: a Llama decoder with
hidden size 512, 16 layers, intermediate size 1376, 8 attention heads (2 key/value heads), and a 32064-token
(LLaVA-NeXT-Mistral-like) or 128256-token (Llama-3-like) vocabulary, randomly initialised. The vision tower, the
projector and the processor (tokenizer, 32x32 image processor) are those of `build_tiny_model("llava")`, so every token
id the processor produces is in range of the larger vocabulary and the image token id matches the config.

Timings on a shared machine swing widely, so the script
* runs with one thread (OMP_NUM_THREADS=1 before torch is imported, `torch.set_num_threads(1)`);
* warms every measured call up first;
* interleaves the measurements: each repetition times the full forward and the capture of every requested layer once,
  in an order rotated from one repetition to the next, so that a slow phase of the machine hits them all alike;
* reports, per layer, the median over repetitions of the paired ratio full/capture (the two timed within the same
  repetition), with its interquartile range. Median times in ms are printed as secondary information only: compare
  ratios, not absolute times, across runs.

Before timing, it checks (no timing involved) that the captured states equal `output_hidden_states[L + 1]` of a full
forward at every real (non-padding) position for L < N-1, and, for L = N-1, that the final norm applied to them does.

Usage (defaults finish in about 2-3 minutes on a 2-core CPU):

    python benchmarks/layer_capture.py
    python benchmarks/layer_capture.py --layers 0 4 8 12 15 --batch-size 8 --repeats 15 --vocab-sizes 32064
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import interleaved_timings, quartiles  # noqa: E402

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.testing.tiny_models import build_tiny_model  # noqa: E402
from saev_hf.testing.digit_data import digit_images  # noqa: E402

PROMPTS = (
    "what digit is this ?",
    "which number is shown in the image ? answer with one word .",
    "describe the image .",
    "is it an even or odd number ?",
    "what number do you see in this picture ?",
    "read the digit .",
    "is this digit larger than five ?",
    "what is written here ?",
)


def add_scaled_llava_arguments(parser: argparse.ArgumentParser, hidden_size: int = 512, intermediate_size: int = 1376,
                               num_layers: int = 16) -> None:
    """The text model's shape options that [`build_scaled_llava`] reads (`--hidden-size`, `--intermediate-size`,
    `--num-layers`, `--heads`, `--kv-heads`), one definition for every benchmark that builds the scaled LLaVA."""
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=intermediate_size)
    parser.add_argument("--num-layers", type=int, default=num_layers, help="decoder layers N of the text model")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)


def build_scaled_llava(vocab_size: int, args: argparse.Namespace, seed: int = 0):
    """The tiny LLaVA's vision tower, projector config and processor with a scaled-up Llama text model."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    tiny_model, processor = build_tiny_model("llava")
    tiny_config = tiny_model.config
    del tiny_model
    tokenizer = processor.tokenizer
    if vocab_size < len(tokenizer):
        raise ValueError(f"--vocab-sizes must be at least the tokenizer's {len(tokenizer)} tokens, got {vocab_size}.")

    text = tiny_config.text_config.to_dict()
    text.update(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
    )
    config = copy.deepcopy(tiny_config)
    config.text_config = LlamaConfig(**text)

    # the processor and the config must still agree on the image token and the number of image positions
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    assert image_token_id == processor.image_token_id == tiny_config.image_token_index < vocab_size
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert processor.patch_size == config.vision_config.patch_size and config.image_seq_length == patches
    assert config.text_config.vocab_size == vocab_size and config.get_text_config().num_hidden_layers == args.num_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    assert model.get_output_embeddings().weight.shape == (vocab_size, args.hidden_size)
    return model, processor


def batch_rows(batch_size: int) -> dict[str, list]:
    """`batch_size` rows (a digit image and a prompt each), as `LayerReader.prepare` takes them."""
    images = [image for image, _ in digit_images(batch_size, seed=0)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return {"images": [[image] for image in images], "prompt": prompts}


@torch.no_grad()
def check_capture(model, reader: LayerReader, inputs) -> None:
    """Captured states of layer L == output_hidden_states[L + 1] of a full forward (exactly, at real positions)."""
    acts = reader.read_inputs(inputs)
    full = model(**inputs, output_hidden_states=True).hidden_states
    captured, expected = acts.hidden_states, full[reader.layer + 1]
    assert captured.shape == expected.shape, (captured.shape, expected.shape)
    if reader.layer == len(reader.layers) - 1:
        # transformers reports the last layer after the final norm; the reader keeps the residual stream itself
        captured = model.model.language_model.norm(captured)
    keep = acts.token_mask
    torch.testing.assert_close(captured[keep], expected[keep], rtol=0, atol=0)


def param_count(module: torch.nn.Module) -> int:
    """The number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())


def matmul_estimate(model, inputs, num_layers: int):
    """Speed-up expected if time were proportional to weight-matmul FLOPs (parameters x positions they touch).

    Ignores attention scores (short sequences), norms, the embedding lookup and overheads; padding positions count,
    since the model computes them too.
    """
    vision_config = model.config.vision_config
    images = inputs["pixel_values"].shape[0]
    vision_positions = images * ((vision_config.image_size // vision_config.patch_size) ** 2 + 1)  # + CLS
    text_positions = inputs["input_ids"].numel()
    vision = param_count(model.model.vision_tower) * vision_positions
    vision += param_count(model.model.multi_modal_projector) * images * model.config.image_seq_length
    layer = param_count(model.model.language_model.layers[0]) * text_positions
    head = param_count(model.get_output_embeddings()) * text_positions
    return lambda read: (vision + num_layers * layer + head) / (vision + (read + 1) * layer)


@torch.no_grad()
def benchmark(vocab_size: int, args: argparse.Namespace) -> list[dict]:
    """Time full forwards against each layer's capture (checked exact) for one vocabulary; return a row per layer."""
    model, processor = build_scaled_llava(vocab_size, args)
    readers = {layer: LayerReader(model, processor, layer=layer) for layer in args.layers}
    first = readers[args.layers[0]]
    inputs = first.prepare(batch_rows(args.batch_size))
    num_layers = len(first.layers)
    tokens = int(inputs["attention_mask"].sum())
    print(
        f"vocab {vocab_size}: {param_count(model) / 1e6:.1f}M parameters, {num_layers} decoder layers, batch "
        f"{args.batch_size}, input_ids {tuple(inputs['input_ids'].shape)} ({tokens} real tokens)",
        flush=True,
    )
    estimate = matmul_estimate(model, inputs, num_layers)

    for reader in readers.values():
        check_capture(model, reader, inputs)

    calls = {"full": lambda: model(**inputs)}  # noqa: F821  (ruff: `model` is deleted below, after the calls)
    for layer, reader in readers.items():
        calls[layer] = lambda reader=reader: reader.read_inputs(inputs)
    times = interleaved_timings(calls, args.repeats, args.warmup)

    full = times["full"]
    rows = []
    for layer in args.layers:
        ratios = [f / c for f, c in zip(full, times[layer])]
        low, high = quartiles(ratios)
        rows.append(
            {
                "vocab": vocab_size,
                "layer": layer,
                "num_layers": num_layers,
                "full_ms": 1e3 * statistics.median(full),
                "capture_ms": 1e3 * statistics.median(times[layer]),
                "speedup": statistics.median(ratios),
                "estimate": estimate(layer),
                "iqr": (low, high),
            }
        )
    del model, readers, calls
    gc.collect()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (--layers checked, sorted, without duplicates)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 8, 15], help="0-based decoder layers L to read")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per batch (one digit image each)")
    parser.add_argument("--repeats", type=int, default=21, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32064, 128256], help="text model vocabularies")
    add_scaled_llava_arguments(parser)
    args = parser.parse_args(argv)
    bad = [layer for layer in args.layers if not 0 <= layer < args.num_layers]
    if bad:
        parser.error(f"--layers {bad} out of range for --num-layers {args.num_layers} (0 to {args.num_layers - 1})")
    if args.repeats < 1 or args.batch_size < 1 or args.warmup < 0:
        parser.error("--repeats and --batch-size must be positive, --warmup non-negative")
    args.layers = sorted(set(args.layers))
    return args


def main(argv=None) -> None:
    """Benchmark every vocabulary size and print the markdown table of speed-ups."""
    args = parse_args(argv)
    start = time.perf_counter()
    rows = []
    for vocab_size in args.vocab_sizes:
        rows.extend(benchmark(vocab_size, args))
    print(
        f"\nLayerReader capture vs full forward: LLaVA, Llama text model hidden {args.hidden_size}, intermediate "
        f"{args.intermediate_size}, {args.heads} heads ({args.kv_heads} KV), batch {args.batch_size}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread; median of {args.repeats} interleaved repetitions "
        f"after {args.warmup} warm-up.\n"
    )
    print(
        "| vocab | layer L | N layers | full forward median (ms) | capture median (ms) | speed-up (full/capture) "
        "| matmul-FLOP estimate |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        low, high = row["iqr"]
        print(
            f"| {row['vocab']} | {row['layer']} | {row['num_layers']} | {row['full_ms']:.1f} | {row['capture_ms']:.1f} "
            f"| **{row['speedup']:.2f}x** (IQR {low:.2f}-{high:.2f}) | {row['estimate']:.2f}x |"
        )
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
