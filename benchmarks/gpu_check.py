"""Benchmark: the prepared GPU check, every figure issue 16 asks of one GPU at LLaVA-NeXT-7B's real shapes, in one run.

The model is `LlavaNextForConditionalGeneration` with the shapes of llava-hf/llava-v1.6-mistral-7b-hf and random
weights, built offline from configs: the real CLIP-L/336 vision tower (hidden 1024, 24 layers, 16 heads, patch 14,
336-pixel tiles, intermediate 4096, projection 768), LLaVA-NeXT's anyres grid pinpoints (336x672 ... 1008x336) and a
Mistral-7B text model (hidden 4096, intermediate 14336, 32 heads, 8 key/value heads, vocabulary 32064) cut to
`--text-layers` decoder layers (2 by default: the check reads layer L, and every layer costs the same), in bfloat16.
The tokenizer is the tiny test tokenizer (no Hub): its image token is the config's, so the processor and the model
agree on every image position. Rows are real photographs (scikit-learn's two sample images, cropped and resized) of
the anyres sizes 336x336, 672x336, 1008x336 and 672x672, stored as JPEG bytes (undecoded, as `saev score` hands
them to the scorer), with prompts of mixed length (the `scoring_pipeline.py` prompts after 0-6 copies of a sentence).

It measures, and writes to `--json` and `--markdown`:

* **scorer rows/s**, preprocessing included: `datasets.Dataset.map(SAEVScorer(...), batched=True)` over the rows,
  once as a plain map (map batch = forward batch, no pipeline) and once with the input pipeline
  (`ScorerArguments(forward_batch_size=..., group_by_length=True, preprocessing_workers=...)`, a larger map batch);
  the median of `--repeats` timed maps after a warm-up map;
* **scorer / bare forward**: the time per row of each scorer over the time of `LayerReader.read_inputs` (the forward
  to layer L and nothing else: no preprocessing, no SAE-V) on the same forward batches, prepared beforehand;
* **GPU busy fraction** of the pipelined scorer: the union of the CUDA kernels' intervals (torch.profiler with the
  CUDA activity only, so that no CPU-side tracing slows the Python code) over the wall time of one extra map, with the
  GPU synchronised at both ends; where pynvml is installed, also the mean of `torch.cuda.utilization()` sampled every
  50 ms during a timed map (NVML's "a kernel ran during the sample period": coarser, an upper bound). Null on the CPU;
* **padding fraction**: padding positions / all positions of the forward batches, without and with `group_by_length`,
  for the anyres rows and for the same prompts with one image size (the length estimate counts images and characters,
  not image sizes: with anyres images of several sizes, grouping by it cuts little padding);
* **SAE-V training tokens/s** at d_in 4096, d_sae 65,536 (a batch of 4096 tokens) from a stream of synthetic
  activations (`training_throughput.py`'s), saev_hf's `SAEVTrainer` step against SAELens's `SAETrainer` step (the
  same classes as `training_throughput.py`, on the device), each timed over `--train-steps` steps after
  `--train-warmup`, synchronised at both ends;
* **weighting peak memory**: `torch.cuda.max_memory_allocated` around `compute_feature_weights` (the SAE-V of the
  scorer, `--weighting-rows` rows), as a total and above what was allocated before; on the CPU the peak resident set
  size (VmHWM, reset before) above the RSS before, from `weighting_memory.py`;
* **activation-cache write and read MB/s**: a slot, reported as not available until the activation cache (issue 15)
  exists: fill in [`activation_cache`].

`--device cpu` (the default without CUDA) runs everything at reduced sizes (hidden 64, 2 text layers, a 2-layer
vision tower with 56-pixel tiles, d_sae 1024, 12 rows, float32) in well under a minute: the tests run it so that the
script cannot rot. Its numbers say nothing about a GPU.

Usage:

    python benchmarks/gpu_check.py --device cuda      # under 5 minutes on one H200 (estimate: not run yet)
    python benchmarks/gpu_check.py --device cpu --json benchmarks/results/gpu_check_cpu.json \\
        --markdown benchmarks/results/gpu_check_cpu.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, output_path  # noqa: E402

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

from layer_capture import PROMPTS  # noqa: E402
from scoring_pipeline import COLUMNS, SENTENCE, map_batches  # noqa: E402
from scoring_speed import counted_hidden, make_sae  # noqa: E402
from training_throughput import SAELensStep, Shape, saev_trainer, synthetic_activations  # noqa: E402

from saev_hf import SAEVScorer  # noqa: E402
from saev_hf.training.buffer import input_scale_from_norms  # noqa: E402
from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.data.pipeline import prepared_batches  # noqa: E402
from saev_hf.scoring import ScorerArguments  # noqa: E402
from saev_hf.weighting import WeightingArguments, compute_feature_weights  # noqa: E402

IMAGE_TILES = ((1, 1), (2, 1), (3, 1), (2, 2))
"""Row image sizes in tiles (width, height): 336x336, 672x336, 1008x336, 672x672 at the real 336-pixel tile."""
PINPOINT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""LLaVA-NeXT's image_grid_pinpoints in tiles: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]."""


@dataclass(frozen=True)
class Shapes:
    """The model's shapes: LLaVA-NeXT-Mistral-7B's (`REAL`) or a reduced set for the CPU (`REDUCED`)."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vision_projection: int
    patch: int
    tile: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    vocab: int


REAL = Shapes(1024, 4096, 24, 16, 768, 14, 336, 4096, 14336, 32, 8, 32064)
REDUCED = Shapes(32, 64, 2, 2, 32, 14, 56, 64, 128, 4, 2, 32064)

# Per device: the defaults of the options left unset. GPU: sized to finish in under 5 minutes on one H200.
PRESETS = {
    "cuda": dict(shapes=REAL, dtype="bfloat16", text_layers=2, rows=96, forward_batch_size=8, map_batch_size=48,
                 workers=4, repeats=3, d_sae=65536, train_batch_tokens=4096, train_steps=50, train_warmup=5,
                 weighting_rows=32),
    "cpu": dict(shapes=REDUCED, dtype="float32", text_layers=2, rows=12, forward_batch_size=4, map_batch_size=12,
                workers=1, repeats=1, d_sae=1024, train_batch_tokens=512, train_steps=4, train_warmup=1,
                weighting_rows=8),
}


def progress(message: str) -> None:
    """Print `message` with the script's name and the time, flushed."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# Model and rows
# ---------------------------------------------------------------------------------------------------------------------


def build_llava_next(shapes: Shapes, text_layers: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """LLaVA-NeXT with `shapes` (random weights, built on `device` in `dtype`) and its processor, offline."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from saev_hf.testing.tiny_processing import build_tiny_tokenizer  # no Hub: a tokenizer built here

    tokenizer = build_tiny_tokenizer("llava_next")
    tokenizer.model_max_length = 32768  # Mistral's context: anyres rows hold up to ~3000 positions
    tile = shapes.tile
    pinpoints = [[h * tile, w * tile] for w, h in PINPOINT_TILES]  # [height, width], as transformers reads them
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shapes.patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tokenizer.chat_template)
    vision = CLIPVisionConfig(
        hidden_size=shapes.vision_hidden, intermediate_size=shapes.vision_intermediate,
        num_hidden_layers=shapes.vision_layers, num_attention_heads=shapes.vision_heads,
        projection_dim=shapes.vision_projection, patch_size=shapes.patch, image_size=tile, hidden_act="quick_gelu",
        layer_norm_eps=1e-5)
    text = MistralConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.text_hidden, intermediate_size=shapes.text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=shapes.text_heads,
        num_key_value_heads=shapes.text_kv_heads, head_dim=shapes.text_hidden // shapes.text_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        image_grid_pinpoints=pinpoints, image_seq_length=(tile // shapes.patch) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
    assert processor.image_token_id < shapes.vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialised in its dtype, on its device: no float32 copy of 1B weights
        try:
            with torch.device(device):
                model = LlavaNextForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default_dtype)
    return model.eval(), processor


def photo_rows(num_rows: int, tile: int, tiles: tuple[tuple[int, int], ...], seed: int) -> dict[str, list]:
    """Rows `{"images": [[{"bytes", "path"}]], "prompt": [...]}`: crops of scikit-learn's two sample photographs at
    the sizes `tiles` (cycled, in tiles of `tile` pixels), as JPEG bytes; prompts of mixed length."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = random.Random(seed)
    images, prompts = [], []
    for i in range(num_rows):
        w, h = tiles[i % len(tiles)]
        photo = photos[i % len(photos)]
        crop_w = min(photo.width, round(photo.height * w / h))  # the largest crop of the target's aspect ratio
        crop_h = round(crop_w * h / w)
        left, top = rng.randrange(photo.width - crop_w + 1), rng.randrange(photo.height - crop_h + 1)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((w * tile, h * tile))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append([{"bytes": buffer.getvalue(), "path": None}])
        prompts.append(SENTENCE * rng.randrange(7) + PROMPTS[i % len(PROMPTS)])
    return {"images": images, "prompt": prompts}


def as_dataset(rows: dict[str, list]):
    """A `datasets.Dataset` of `rows` with the images undecoded, as `saev score` maps it."""
    import datasets

    features = datasets.Features({"images": datasets.List(datasets.Image(decode=False)),
                                  "prompt": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def forward_batches(reader: LayerReader, rows: dict[str, list], map_batch_size: int, forward_batch_size: int,
                    group: bool) -> list:
    """The prepared inputs of the forward batches a scorer with these settings runs, in order."""
    return [prepared.check() for batch, indices in map_batches(rows, map_batch_size)
            for prepared in prepared_batches(reader, batch, forward_batch_size, row_ids=indices,
                                             group_by_length=group)]


def padding_fraction(batches: list) -> float:
    """Padding positions / all positions of `batches`."""
    padded = sum(int((inputs["attention_mask"] == 0).sum()) for inputs in batches)
    return padded / sum(inputs["attention_mask"].numel() for inputs in batches)


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def timed_map(dataset, scorer: SAEVScorer, map_batch_size: int, device: torch.device) -> tuple[float, dict]:
    """Wall time of `dataset.map(scorer, batched=True)` (synchronised at both ends) and its score columns."""
    synchronize(device)
    start = time.perf_counter()
    out = dataset.map(scorer, batched=True, batch_size=map_batch_size, with_indices=True, keep_in_memory=True,
                      load_from_cache_file=False)
    synchronize(device)
    return time.perf_counter() - start, {name: out[name] for name in COLUMNS}


class UtilizationSampler:
    """Samples `torch.cuda.utilization()` (NVML) every `interval` s in a thread while it is entered; `mean` is None
    where NVML is not available (no pynvml) or nothing was sampled."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device, self.interval, self.samples = device, interval, []
        self.available = device.type == "cuda"
        if self.available:
            try:
                torch.cuda.utilization(device)
            except Exception:  # noqa: BLE001 (no pynvml / amdsmi: no sampling)
                self.available = False

    def __enter__(self):
        self._stop = threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) / 100 if self.samples else None


def kernel_busy_fraction(run, device: torch.device) -> dict:
    """The share of the wall time of `run()` during which the GPU ran at least one kernel (or memory copy), from
    torch.profiler's CUDA activity: the union of the device events' intervals, so that work overlapping on several
    streams counts once. CPU-side tracing stays off, so that the profiler does not slow the Python code it measures."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        synchronize(device)
        wall_ns = 1e9 * (time.perf_counter() - start)
    sources = (  # the raw device events first; torch's FunctionEvent list where that API is missing
        lambda: [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                 if e.device_type() == DeviceType.CUDA],
        lambda: [(1e3 * e.time_range.start, 1e3 * e.time_range.end) for e in prof.events()
                 if e.device_type == DeviceType.CUDA],
    )
    intervals, errors = [], []
    for source in sources:
        try:
            intervals = sorted((lo, hi) for lo, hi in source() if hi > lo)
        except Exception as exc:  # noqa: BLE001 (an API that moved: try the next source)
            errors.append(f"{type(exc).__name__}: {exc}")
        if intervals:
            break
    busy, end = 0.0, -math.inf
    for lo, hi in intervals:  # union of intervals
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    if busy <= 0:
        raise RuntimeError(f"torch.profiler recorded no CUDA device events ({'; '.join(errors) or 'none listed'})")
    return {"value": min(1.0, busy / wall_ns),
            "method": "union of CUDA kernel and copy intervals (torch.profiler, CUDA activity) / wall time of one "
                      "pipelined map",
            "device_events": len(intervals), "device_busy_s": busy / 1e9, "wall_s": wall_ns / 1e9}


def measure_scorer(model, processor, args, device: torch.device) -> tuple:
    """Scorer rows/s (plain map and pipelined map), the bare forward, the padding fractions and the GPU busy
    fraction. Returns `(results, sae, reader, dataset)`: the SAE-V, the reader and the rows the weighting reuses."""
    layer = args.layer
    reader = LayerReader(model, processor, layer=layer)
    rows = photo_rows(args.rows, args.shapes.tile, IMAGE_TILES, args.seed)
    dataset = as_dataset(rows)
    fbs, mbs = args.forward_batch_size, args.map_batch_size

    progress(f"preparing the forward batches of {args.rows} rows (without and with length grouping)")
    grouped_batches = forward_batches(reader, rows, mbs, fbs, group=True)
    one_size = photo_rows(args.rows, args.shapes.tile, IMAGE_TILES[:1], args.seed)
    padding = {
        "anyres images": {"without_grouping": padding_fraction(forward_batches(reader, rows, mbs, fbs, False)),
                          "with_grouping": padding_fraction(grouped_batches)},
        "one image size": {"without_grouping": padding_fraction(forward_batches(reader, one_size, mbs, fbs, False)),
                           "with_grouping": padding_fraction(forward_batches(reader, one_size, mbs, fbs, True))},
    }
    image_tokens = {}
    for k, (w, h) in enumerate(IMAGE_TILES[: args.rows]):
        ids = reader.prepare({name: values[k : k + 1] for name, values in rows.items()})["input_ids"]
        image_tokens[f"{w * args.shapes.tile}x{h * args.shapes.tile}"] = int((ids == reader.image_token_id).sum())
    progress(f"image tokens per image: {image_tokens}; padding fractions: {padding}")

    with torch.no_grad():
        sample = reader.read_inputs(grouped_batches[0])
        # delta calibrated on 1024 tokens: enough for a quantile, and a (tokens, 65536) tensor stays small
        hidden = counted_hidden(sample)[:1024]
        sae = make_sae(args.d_sae // args.shapes.text_hidden, layer, [hidden], 0.99, args.seed)
    del sample, hidden
    settings = {
        "plain": (fbs, ScorerArguments()),
        "pipeline": (mbs, ScorerArguments(forward_batch_size=fbs, group_by_length=True,
                                          preprocessing_workers=args.workers)),
    }
    scorers = {name: SAEVScorer(sae, model, processor, args=arguments) for name, (_, arguments) in settings.items()}

    progress("warm-up maps")
    warm = dataset.select(range(min(len(dataset), mbs)))
    for name, (size, _) in settings.items():
        timed_map(warm, scorers[name], size, device)

    @torch.no_grad()
    def bare() -> float:
        synchronize(device)
        start = time.perf_counter()
        for inputs in grouped_batches:
            reader.read_inputs(inputs)
        synchronize(device)
        return time.perf_counter() - start

    bare()
    times = {name: [] for name in (*settings, "bare")}
    scores = {}
    sampler = UtilizationSampler(device)
    for rep in range(args.repeats):
        progress(f"timing the scorers and the bare forward, repetition {rep + 1}/{args.repeats}")
        for name, (size, _) in settings.items():
            with sampler if name == "pipeline" else contextlib.nullcontext():
                seconds, scores[name] = timed_map(dataset, scorers[name], size, device)
            times[name].append(seconds)
        times["bare"].append(bare())
    difference = max(abs(a - b) / max(1.0, abs(a)) for column in COLUMNS
                     for a, b in zip(scores["plain"][column], scores["pipeline"][column]))

    busy = {"value": None, "method": None, "nvml_mean_utilization": sampler.mean}
    if device.type == "cuda":
        progress("GPU busy fraction: one more pipelined map under torch.profiler (CUDA activity)")
        size, _ = settings["pipeline"]
        try:
            busy.update(kernel_busy_fraction(lambda: timed_map(dataset, scorers["pipeline"], size, device), device))
        except Exception as exc:  # noqa: BLE001 (report it, keep the other measurements)
            busy["error"] = f"{type(exc).__name__}: {exc}"
    else:
        busy["method"] = "not measured on the CPU"

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "rows": args.rows, "layer": layer, "d_sae": sae.config.d_sae, "image_tokens": image_tokens,
        "settings": {name: {"map_batch_size": size, **{k: getattr(a, k) for k in
                                                          ("forward_batch_size", "group_by_length",
                                                           "preprocessing_workers")},
                            "rows_per_s": args.rows / median[name], "seconds": times[name]}
                     for name, (size, a) in settings.items()},
        "bare_forward_rows_per_s": args.rows / median["bare"],
        "bare_forward_seconds": times["bare"],
        "scorer_over_bare": median["pipeline"] / median["bare"],
        "plain_scorer_over_bare": median["plain"] / median["bare"],
        "max_relative_score_difference": difference,
        "padding_fraction": padding,
        "gpu_busy_fraction": busy,
    }
    return result, sae, reader, dataset


def measure_training(args, device: torch.device) -> dict:
    """Tokens/s of saev_hf's SAEVTrainer step and SAELens's SAETrainer step at (d_in, d_sae, batch)."""
    d_in = args.shapes.text_hidden
    if args.d_sae % d_in:
        raise ValueError(f"--d-sae {args.d_sae} must be a multiple of the hidden size {d_in}.")
    shape = Shape(d_in, args.d_sae // d_in, args.train_batch_tokens)
    data = synthetic_activations(d_in, 2 * shape.batch, seed=args.seed)
    scale = input_scale_from_norms(d_in, float(data.double().norm(dim=-1).sum()), len(data))
    batches = [b.to(device) for b in data.split(shape.batch)]
    warmup, steps = args.train_warmup, args.train_steps
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = saev_trainer(shape, scale, warmup + steps + 1, tmp, device=device.type)
        saelens = SAELensStep(shape, trainer, scale, device=str(device))
        marks = {}

        def feed():  # the time between handing over batch `warmup` and being asked for batch `warmup + steps`
            for k in range(warmup + steps + 1):
                if k in (warmup, warmup + steps):
                    synchronize(device)
                    marks[k] = time.perf_counter()
                yield batches[k % len(batches)]

        progress(f"training: saev_hf, {warmup} + {steps} steps of {shape.batch} tokens at d_in {d_in}, "
                 f"d_sae {shape.d_sae}")
        trainer.train(feed())
        seconds["saev_hf"] = marks[warmup + steps] - marks[warmup]
        del trainer
        progress(f"training: SAELens, {warmup} + {steps} steps")
        for k in range(warmup + steps):
            if k == warmup:
                synchronize(device)
                start = time.perf_counter()
            saelens(batches[k % len(batches)])
        synchronize(device)
        seconds["SAELens"] = time.perf_counter() - start
        del saelens
    import sae_lens

    tps = {name: steps * shape.batch / value for name, value in seconds.items()}
    return {"d_in": d_in, "d_sae": shape.d_sae, "batch_tokens": shape.batch, "steps": steps, "warmup_steps": warmup,
            "saev_hf_tokens_per_s": tps["saev_hf"], "saelens_tokens_per_s": tps["SAELens"],
            "saev_hf_over_saelens": tps["saev_hf"] / tps["SAELens"], "sae_lens_version": sae_lens.__version__}


def measure_weighting(sae, reader: LayerReader, dataset, args, device: torch.device) -> dict:
    """Peak memory of `compute_feature_weights` over `--weighting-rows` rows (the weights are not stored)."""
    weighting_args = WeightingArguments(num_examples=min(args.weighting_rows, len(dataset)),
                                        batch_size=args.forward_batch_size)
    progress(f"weighting: compute_feature_weights over {weighting_args.num_examples} rows")
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        compute_feature_weights(sae, reader, dataset, weighting_args, store=False)
        synchronize(device)
        seconds, peak = time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
        kind = "torch.cuda.max_memory_allocated"
    else:
        try:
            from weighting_memory import peak as rss_peak, reset_peak, rss

            reset_peak()
            before = rss()
        except OSError:  # not Linux: no /proc/self/clear_refs
            before = rss_peak = None
        start = time.perf_counter()
        compute_feature_weights(sae, reader, dataset, weighting_args, store=False)
        seconds = time.perf_counter() - start
        peak = rss_peak() if before is not None else None
        kind = "resident set size (VmHWM, reset before)" if peak is not None else None
    return {"rows": weighting_args.num_examples, "d_sae": sae.config.d_sae, "d_in": sae.config.d_in,
            "peak_memory_bytes": peak, "before_bytes": before,
            "above_before_bytes": None if peak is None else peak - before, "kind": kind, "seconds": seconds}


def activation_cache(model, processor, dataset, args, device: torch.device) -> dict:
    """Write and read MB/s of the activation cache (`saev_hf.cache`), in MB of stored activations: `saev cache`'s
    writing over the scorer's rows (the MLLM forward to layer L included, as a user pays it), then one shuffled pass of
    reading it back as training does, each synchronised and timed."""
    import tempfile

    from saev_hf.cache import ActivationCache, CacheArguments, cache_activations

    storage = "bfloat16" if args.dtype == "bfloat16" else "float32"
    progress(f"activation cache: writing {len(dataset)} rows of layer {args.layer} ({storage}), then reading back")
    with tempfile.TemporaryDirectory() as folder:
        cache_args = CacheArguments(output_dir=str(Path(folder) / "cache"), layer=args.layer, storage_dtype=storage,
                                    shard_size_tokens=16384, read_batch_size=args.forward_batch_size,
                                    disable_tqdm=True)
        started = _synchronised(device)
        path = cache_activations(cache_args, model=model, processor=processor, dataset=dataset)
        write_s = _synchronised(device) - started
        cache = ActivationCache(path)
        megabytes = sum((Path(path) / shard["file"]).stat().st_size for shard in cache.shards) / 1e6
        started = time.perf_counter()
        tokens = sum(len(batch) for batch in cache.batches(4096, shuffle=True, seed=args.seed))
        read_s = time.perf_counter() - started
    return {"available": True, "reason": None, "storage_dtype": storage, "tokens": tokens, "megabytes": megabytes,
            "write_mb_per_s": megabytes / write_s, "read_mb_per_s": megabytes / read_s,
            "write_includes": "the MLLM forward to layer L and the input pipeline"}


def _synchronised(device: torch.device) -> float:
    """`time.perf_counter()` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".3g", unit: str = "") -> str:
    """`value` formatted by `spec`, followed by `unit`; 'n/a' when it is None."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def markdown(result: dict) -> str:
    """The report of `result`: a markdown table of the measurements."""
    s, t, w, c = result["scorer"], result["training"], result["weighting"], result["activation_cache"]
    p, busy = s["padding_fraction"], s["gpu_busy_fraction"]
    gib = 1 << 30
    lines = [
        f"# GPU check ({result['label']})",
        "",
        f"{result['model']}; device {result['device_name']}; torch {result['torch']}, transformers "
        f"{result['transformers']}, sae_lens {t['sae_lens_version']}; {result['wall_time_s']:.0f} s in all.",
        "",
        "| measurement | value | how |",
        "|---|---:|---|",
    ]
    for name, setting in s["settings"].items():
        lines.append(f"| scorer rows/s, {name} | {setting['rows_per_s']:.2f} | `ds.map(SAEVScorer, batched=True, "
                     f"batch_size={setting['map_batch_size']})`, forward_batch_size={setting['forward_batch_size']}, "
                     f"group_by_length={setting['group_by_length']}, workers={setting['preprocessing_workers']}; "
                     f"{s['rows']} rows, preprocessing included |")
    lines += [
        f"| bare forward rows/s | {s['bare_forward_rows_per_s']:.2f} | `LayerReader.read_inputs` to layer "
        f"{s['layer']} on the pipeline's forward batches, prepared beforehand |",
        f"| **scorer / bare forward** (pipeline) | **{s['scorer_over_bare']:.2f}x** | time per row, medians |",
        f"| scorer / bare forward (plain) | {s['plain_scorer_over_bare']:.2f}x | time per row, medians |",
        f"| GPU busy fraction (pipeline) | {fmt(busy['value'], '.1%')} | {busy['method']} |",
        f"| GPU utilization, NVML mean (pipeline) | {fmt(busy['nvml_mean_utilization'], '.1%')} | "
        f"`torch.cuda.utilization()` every 50 ms (needs pynvml) |",
    ]
    for data, values in p.items():
        lines.append(f"| padding fraction, {data} | {values['without_grouping']:.1%} without grouping, "
                     f"{values['with_grouping']:.1%} with | padding / all forward positions |")
    lines += [
        f"| SAE-V training tokens/s, saev_hf | {t['saev_hf_tokens_per_s']:,.0f} | `SAEVTrainer` step, d_in "
        f"{t['d_in']}, d_sae {t['d_sae']}, {t['batch_tokens']} tokens per step, {t['steps']} steps after "
        f"{t['warmup_steps']} |",
        f"| SAE-V training tokens/s, SAELens | {t['saelens_tokens_per_s']:,.0f} | `SAETrainer` step, same shapes |",
        f"| **saev_hf / SAELens** | **{t['saev_hf_over_saelens']:.2f}x** | throughput ratio |",
        f"| weighting peak memory | {fmt(None if w['peak_memory_bytes'] is None else w['peak_memory_bytes'] / gib, '.2f', ' GiB')} "
        f"({fmt(None if w['above_before_bytes'] is None else w['above_before_bytes'] / gib, '.2f', ' GiB')} above "
        f"before) | {w['kind']} around `compute_feature_weights`, {w['rows']} rows, d_sae {w['d_sae']} |",
        f"| activation cache write / read MB/s | {fmt(c['write_mb_per_s'])} / {fmt(c['read_mb_per_s'])} | "
        f"{'measured (' + c['storage_dtype'] + ' storage; writing includes ' + c['write_includes'] + ')' if c['available'] else 'not available: ' + c['reason']} |",
        "",
        f"Image tokens per image: {', '.join(f'{k}: {v}' for k, v in s['image_tokens'].items())}. Largest relative "
        f"score difference between the plain and the pipelined scorer: {s['max_relative_score_difference']:.2g}.",
    ]
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """A path as recorded in the results: relative to the checkout when inside it (no machine's folders)."""
    try:
        return str(path.resolve().relative_to(_common.ROOT))
    except ValueError:
        return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line, options left unset taken from the device's preset, with the json and md paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: LLaVA-NeXT-7B's shapes; cpu: reduced sizes (a smoke run)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="the MLLM's dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--text-layers", type=int, help="decoder layers of the text model (default 2)")
    parser.add_argument("--layer", type=int, help="layer L read (default: the last of --text-layers)")
    parser.add_argument("--rows", type=int, help="rows scored per map (default 96 on cuda, 12 on cpu)")
    parser.add_argument("--forward-batch-size", type=int, help="rows per forward (default 8 / 4)")
    parser.add_argument("--map-batch-size", type=int, help="map batch of the pipelined scorer: the length-grouping "
                        "window (default 48 / 12)")
    parser.add_argument("--workers", type=int, help="preprocessing_workers of the pipelined scorer (default 4 / 1)")
    parser.add_argument("--repeats", type=int, help="timed maps per scorer, median taken (default 3 / 1)")
    parser.add_argument("--d-sae", type=int, help="SAE-V width, a multiple of the hidden size (default 65536 / 1024)")
    parser.add_argument("--train-batch-tokens", type=int, help="tokens per training step (default 4096 / 512)")
    parser.add_argument("--train-steps", type=int, help="timed training steps per library (default 50 / 4)")
    parser.add_argument("--train-warmup", type=int, help="untimed training steps first (default 5 / 1)")
    parser.add_argument("--weighting-rows", type=int, help="rows of the weighting (default 32 / 8)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_dir(parser)  # writes gpu_check.json/.md (on the CPU: gpu_check_cpu.json/.md)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu for the reduced smoke run")
    for name, value in PRESETS[args.device].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.layer is None:
        args.layer = args.text_layers - 1
    if not 0 <= args.layer < args.text_layers:
        parser.error(f"--layer {args.layer} out of range for --text-layers {args.text_layers}")
    if min(args.rows, args.forward_batch_size, args.map_batch_size, args.repeats, args.train_steps,
           args.train_batch_tokens, args.weighting_rows) < 1 or min(args.workers, args.train_warmup) < 0:
        parser.error("sizes and counts must be positive (--workers and --train-warmup may be 0)")
    name = "gpu_check" if args.device == "cuda" else "gpu_check_cpu"
    args.json, args.markdown = output_path(args, name, ".json"), output_path(args, name, ".md")
    return args


def main(argv=None) -> dict:
    """Measure the scorer, weighting, activation cache and training; write the json and md; return the result."""
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    progress(f"building LLaVA-NeXT ({'real 7B shapes' if args.shapes == REAL else 'reduced shapes'}, "
             f"{args.text_layers} text layers, {args.dtype}) on {device}")
    model, processor = build_llava_next(args.shapes, args.text_layers, dtype, device, args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    scorer, sae, reader, dataset = measure_scorer(model, processor, args, device)
    weighting = measure_weighting(sae, reader, dataset, args, device)
    cache = activation_cache(model, processor, dataset, args, device)
    del model, reader, sae, dataset  # the MLLM and the SAE-V are not needed for training: free their memory
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    training = measure_training(args, device)
    label = "GPU run" if device.type == "cuda" else "CPU smoke run at reduced sizes: not GPU figures"
    result = {
        "label": label, "mode": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "model": (f"LlavaNextForConditionalGeneration, random weights, {parameters / 1e6:,.1f}M parameters, "
                  f"{args.text_layers} text layers, {args.dtype}"),
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
        "shapes": asdict(args.shapes), "text_layers": args.text_layers,
        "args": {k: (asdict(v) if isinstance(v, Shapes) else _shown(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()},
        "scorer": scorer, "training": training, "weighting": weighting, "activation_cache": cache,
        "wall_time_s": time.perf_counter() - start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.markdown.write_text(table)
    print("\n" + table)
    progress(f"done in {result['wall_time_s']:.0f} s; wrote {args.json} and {args.markdown}")
    return result


if __name__ == "__main__":
    main()
