"""Benchmark: fetching images given as URLs (OBELICS's), against a local server that adds latency to every image.

Two measurements, against `saev_hf.testing.image_server.ImageServer` on 127.0.0.1 adding `--latency` (50 ms) before
each response, with a fresh image cache for every timed call (so that every URL is fetched, never read from the
cache):

1. **Throughput**: `ImageFetcher.fetch_many` over `--urls` distinct image URLs with the default number of workers
   (`FetchSettings().workers`) and with one worker (one at a time): images per second, and the ratio, from
   interleaved repetitions (median and IQR of the per-repetition ratios).
2. **The model kept busy**: an OBELICS-layout stream of `--documents` documents (one to three URL images each) read by
   `cache_activations` on the scaled LLaVA of `layer_capture.py` (layer `--layer`), its URLs fetched by `fetch_images`
   as rows are read: with `preprocessing_workers=0` the forward waits while each map batch's URLs are fetched; with
   `preprocessing_workers=1` the stream (and so the fetching) is read in a DataLoader worker ahead of the forward. The
   forward's busy share = time inside the model's forward / wall time of the whole `cache_activations` call, and the
   wall-time ratio, from interleaved repetitions. `fetch_images` fetches a map batch of 64 rows at a time, so the
   stream holds several such batches (`--documents` 192 by default).

One thread for torch (`_common`); the fetcher's threads wait on the network, not the CPU. Compare ratios, not absolute
times. Usage (about 2 minutes on a 2-core CPU):

    python benchmarks/url_fetching.py
    python benchmarks/url_fetching.py --urls 128 --documents 32 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from _common import add_output_dir, interleaved_timings, output_path, quartiles  # noqa: E402
from layer_capture import add_scaled_llava_arguments, build_scaled_llava  # noqa: E402

from saev_hf.cache import CacheArguments, cache_activations  # noqa: E402
from saev_hf.data import FetchSettings, ImageFetcher, PromptFormat, fetch_images, to_trl_layout  # noqa: E402
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images  # noqa: E402
from saev_hf.testing.image_server import ImageServer  # noqa: E402


def serve_images(server: ImageServer, count: int, size: int) -> list[str]:
    """`count` distinct digit images of `size` x `size` pixels registered on `server` (JPEG); their URLs."""
    images = digit_images(count, seed=11)
    return [server.add_image(f"digit-{i}.jpg", image.resize((size, size))) for i, (image, _) in enumerate(images)]


def documents(urls: list[str], count: int):
    """An OBELICS-layout stream of `count` documents, each one to three of `urls` (distinct across documents) between
    texts."""
    import datasets

    rows = {"images": [], "texts": [], "metadata": [], "general_metadata": []}
    cursor = 0
    for d in range(count):
        images, texts = [None], [f"page {d} about the digit {DIGIT_NAMES[d % 10]} ."]
        for _ in range(1 + d % 3):
            images += [urls[cursor % len(urls)], None]
            texts += [None, f"it shows a {DIGIT_NAMES[cursor % 10]} ."]
            cursor += 1
        rows["images"].append(images)
        rows["texts"].append(texts)
        rows["metadata"].append("[]")
        rows["general_metadata"].append("{}")
    return datasets.Dataset.from_dict(rows), cursor


def fetch_throughput(args, urls: list[str]) -> dict:
    """Images per second with the default workers and with one, interleaved, each call with a fresh cache."""
    default_workers = FetchSettings().workers

    def fetch(workers: int):
        with tempfile.TemporaryDirectory() as cache:
            fetcher = ImageFetcher(FetchSettings(workers=workers, cache_dir=cache, allow_private_urls=True))
            results = fetcher.fetch_many(urls)
            assert all(result.ok for result in results) and fetcher.requests_made == len(urls)

    times = interleaved_timings({"default": lambda: fetch(default_workers), "one": lambda: fetch(1)},
                                args.repeats, warmup=0)
    ratios = [one / default for one, default in zip(times["one"], times["default"])]
    return {"workers": default_workers, "urls": len(urls),
            "images_per_second_default": len(urls) / statistics.median(times["default"]),
            "images_per_second_one": len(urls) / statistics.median(times["one"]),
            "speedup": statistics.median(ratios), "speedup_iqr": quartiles(ratios)}


class ForwardClock:
    """Wraps a model's forward to record when each call starts and ends."""

    def __init__(self, model) -> None:
        self.model, self.spans = model, []
        self.original = model.forward

        def forward(*a, **k):
            start = time.perf_counter()
            try:
                return self.original(*a, **k)
            finally:
                self.spans.append((start, time.perf_counter()))

        model.forward = forward

    def busy(self) -> float:
        """Seconds spent inside the forward since the spans were cleared."""
        return sum(end - start for start, end in self.spans)


def pipeline(args, urls: list[str]) -> dict:
    """The forward's busy share and wall time reading the stream with 0 and 1 preprocessing workers."""
    model, processor = build_scaled_llava(args.vocab_size, args)
    source, used = documents(urls, args.documents)
    clock = ForwardClock(model)
    shares: dict[str, list[float]] = {"0": [], "1": []}

    def run(workers: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            stream = to_trl_layout(source.to_iterable_dataset(), "obelics")
            fetcher = ImageFetcher(FetchSettings(cache_dir=f"{folder}/images", allow_private_urls=True))
            stream, report = fetch_images(stream, "images", fetcher, "error")
            clock.spans.clear()
            start = time.perf_counter()
            cache_activations(CacheArguments(output_dir=f"{folder}/cache", layer=args.layer, read_batch_size=8,
                                             preprocessing_workers=workers, disable_tqdm=True),
                              PromptFormat(), model=model, processor=processor, dataset=stream)
            shares[str(workers)].append(clock.busy() / (time.perf_counter() - start))
            assert report.merged().fetched == used, report.merged().summary()

    times = interleaved_timings({"0": lambda: run(0), "1": lambda: run(1)}, args.repeats, warmup=1)
    del shares["0"][:1], shares["1"][:1]  # the warm-up's
    ratios = [a / b for a, b in zip(times["0"], times["1"])]
    return {"documents": args.documents, "images": used, "layer": args.layer,
            "busy_share_inline": statistics.median(shares["0"]), "busy_share_ahead": statistics.median(shares["1"]),
            "wall_ratio_inline_over_ahead": statistics.median(ratios), "wall_ratio_iqr": quartiles(ratios)}


def report_markdown(args, throughput: dict, busy: dict) -> str:
    """The results as markdown."""
    return "\n".join([
        f"# Fetching image URLs: {args.latency * 1e3:.0f} ms of latency per image (local server)",
        "",
        f"Command: `python benchmarks/url_fetching.py --urls {args.urls} --documents {args.documents} --repeats "
        f"{args.repeats} --latency {args.latency}`; median of {args.repeats} interleaved repetitions, a fresh image "
        f"cache each time.",
        "",
        "| fetching | images per second |",
        "|---|---:|",
        f"| default ({throughput['workers']} workers) | {throughput['images_per_second_default']:.1f} |",
        f"| one at a time | {throughput['images_per_second_one']:.1f} |",
        f"| **speed-up** | **{throughput['speedup']:.1f}x** (IQR {throughput['speedup_iqr'][0]:.1f}-"
        f"{throughput['speedup_iqr'][1]:.1f}) |",
        "",
        f"`cache_activations` over a stream of {busy['documents']} OBELICS-layout documents ({busy['images']} URL "
        f"images) on the scaled LLaVA, layer {busy['layer']}:",
        "",
        "| where the URLs are fetched | forward busy share (time in the forward / wall time) |",
        "|---|---:|",
        f"| in the main process, between forwards (`preprocessing_workers=0`) | {busy['busy_share_inline']:.0%} |",
        f"| in a DataLoader worker, ahead of the forward (`preprocessing_workers=1`) | {busy['busy_share_ahead']:.0%} |",
        "",
        f"Wall time inline / ahead: **{busy['wall_ratio_inline_over_ahead']:.2f}x** (IQR "
        f"{busy['wall_ratio_iqr'][0]:.2f}-{busy['wall_ratio_iqr'][1]:.2f}).",
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (checked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=256, help="distinct image URLs fetched in the throughput test")
    parser.add_argument("--documents", type=int, default=192, help="documents in the pipeline test")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits before each response")
    parser.add_argument("--image-size", type=int, default=224, help="side of the served JPEG images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32064)
    add_scaled_llava_arguments(parser)
    add_output_dir(parser)
    args = parser.parse_args(argv)
    if min(args.urls, args.documents, args.repeats, args.image_size) < 1 or args.latency < 0:
        parser.error("--urls, --documents, --repeats and --image-size must be positive, --latency non-negative")
    return args


def main(argv=None) -> None:
    """Run both measurements; print and write `url_fetching.md` and `.json`."""
    args = parse_args(argv)
    with ImageServer(latency=args.latency) as server:
        urls = serve_images(server, max(args.urls, 3 * args.documents), args.image_size)
        throughput = fetch_throughput(args, urls[: args.urls])
        busy = pipeline(args, urls)
    text = report_markdown(args, throughput, busy)
    print(text)
    output_path(args, "url_fetching").write_text(text)
    output_path(args, "url_fetching", ".json").write_text(json.dumps({"throughput": throughput, "pipeline": busy},
                                                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
