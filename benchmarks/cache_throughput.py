"""Benchmark: reading saev_hf's activation cache against SAELens' cached activations (issue 15, item 4).

The same activations (synthetic float32, `--tokens` tokens of width `--d_in`, in rows of `--context` tokens) are
written twice:

* **saev_hf**: an activation cache as `saev cache` writes it (safetensors shards of `--shard_tokens` tokens with the
  modality, row and position of every token, and `cache_manifest.json`), by the cache's own shard writer, then read
  back with `ActivationCache.batches` in stream order and shuffled (`shuffle=True`, `window_shards=4`: shards in a
  seeded order, tokens shuffled within a window of 4 shards), and, for a bfloat16 cache, shuffled (half the disk;
  read back as float32);
* **SAELens**: the `datasets` Arrow dataset that SAELens' `CacheActivationsRunner` writes (one `Array2D((context,
  d_in), "float32")` column per hook, one row per sequence, shuffled when written, `save_to_disk`), then read as its
  `ActivationsStore._load_raw_llm_batch_from_cached` does: `load_from_disk`, `set_format("torch", ...)`, consecutive
  slices of `store_batch_size_prompts` rows reshaped to `(rows * context, d_in)`.

Each reader makes one full pass in batches of `--batch_tokens` float32 tokens, timed end to end, in rounds whose order
alternates; the page cache is dropped before every read when the process may (`/proc/sys/vm/drop_caches`, as root),
so reads come from the disk; otherwise the files are in the page cache and the table says so. Reported: MB/s of
float32 activations delivered (median over rounds) and the ratio saev_hf / SAELens per round (median, with its
range). One thread.

Usage (defaults: 65,536 tokens of LLaVA-NeXT-7B's width 4,096, 1 GiB per copy; a few minutes):

    python benchmarks/cache_throughput.py
    python benchmarks/cache_throughput.py --tokens 16384 --d_in 1024 --rounds 2   # quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import add_output_dir, output_path  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from saev_hf.activations import Modality  # noqa: E402
from saev_hf.cache import ActivationCache  # noqa: E402
from saev_hf.cache.activation_cache import FORMAT, FORMAT_VERSION, MANIFEST_NAME  # noqa: E402
from saev_hf.cache.shard_writer import ShardWriter  # noqa: E402

HOOK = "blocks.16.hook_resid_post"


def drop_page_cache() -> bool:
    """Drop the page cache so that the next read comes from the disk; False when this process may not."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_saev_cache(folder: Path, activations: torch.Tensor, context: int, shard_tokens: int, dtype: str) -> None:
    """`activations` (rows * context, d_in) as an activation cache: the manifest `saev cache` starts with, then the
    shards through the cache's own writer ([`ShardWriter`]), whole rows of `context` tokens each."""
    folder.mkdir(parents=True)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_name_or_path": "synthetic", "dataset_name": "synthetic", "dataset_fingerprint": None,
        "layer": 16, "d_in": activations.shape[1], "storage_dtype": dtype, "include_special_tokens": True,
        "modalities": {m.name.lower(): int(m) for m in Modality},
        "arguments": {"prompt_format": {"image_column": "images", "prompt_column": "prompt",
                                        "response_column": None, "max_length": None}},
        "shards": [], "num_tokens": 0, "next_row": 0, "complete": False,
    }
    shards = ShardWriter(folder, manifest, folder / MANIFEST_NAME, dtype, shard_tokens, first_row=0)
    num_rows = activations.shape[0] // context
    for row in range(num_rows):
        modality = torch.full((context,), int(Modality.TEXT), dtype=torch.int8)
        modality[: context // 2] = int(Modality.IMAGE)
        shards.add(row, activations[row * context : (row + 1) * context], modality, torch.arange(context))
    shards.finish(num_rows)


def write_saelens_cache(folder: Path, activations: torch.Tensor, context: int) -> None:
    """`activations` as SAELens' CacheActivationsRunner saves them: one Array2D row per sequence, shuffled."""
    import datasets

    d_in = activations.shape[1]
    features = datasets.Features({HOOK: datasets.Array2D(shape=(context, d_in), dtype="float32")})
    rows = activations.reshape(-1, context, d_in).numpy()
    dataset = datasets.Dataset.from_dict({HOOK: list(rows)}, features=features)
    dataset = dataset.shuffle(seed=0).flatten_indices()  # the runner shuffles before saving
    dataset.save_to_disk(str(folder))


def read_saev(folder: Path, batch_tokens: int, shuffle: bool) -> tuple[int, float]:
    """One pass over the saev_hf cache; returns the tokens read and the sum of their activations."""
    read, total = 0, 0.0
    for batch in ActivationCache(folder).batches(batch_tokens, shuffle=shuffle, seed=0, window_shards=4):
        read += batch.shape[0]
        total += float(batch[:, 0].sum())
    return read, total


def read_saelens(folder: Path, batch_tokens: int, context: int) -> tuple[int, float]:
    """One pass as SAELens' ActivationsStore reads its cached activations; returns the tokens read and the sum of
    their activations."""
    import datasets

    dataset = datasets.load_from_disk(str(folder))
    dataset.set_format(type="torch", columns=[HOOK], dtype=torch.float32)
    rows_per_batch = max(batch_tokens // context, 1)
    read, total = 0, 0.0
    for start in range(0, len(dataset) - rows_per_batch + 1, rows_per_batch):
        acts = dataset[start : start + rows_per_batch][HOOK].reshape(-1, dataset.features[HOOK].shape[1])
        read += acts.shape[0]
        total += float(acts[:, 0].sum())
    return read, total


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Time each reader over the same cached activations, in rounds; write and print the md; return the seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--d_in", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--shard_tokens", type=int, default=8192)
    parser.add_argument("--batch_tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_dir(parser)
    args = parser.parse_args(argv)
    if args.tokens % args.context or (args.tokens // args.context) % max(args.batch_tokens // args.context, 1):
        parser.error("--tokens must be whole rows of --context tokens, and whole batches of rows: SAELens' reader "
                     "drops a last partial batch.")
    started = time.perf_counter()
    torch.manual_seed(0)
    activations = torch.randn(args.tokens, args.d_in)
    column_sum = float(activations[:, 0].sum())
    bf16_sum = float(activations[:, 0].bfloat16().float().sum())
    megabytes = args.tokens * args.d_in * 4 / 1e6  # float32 delivered per pass
    root = Path(tempfile.mkdtemp(prefix="cache-throughput-"))
    try:
        write_saev_cache(root / "saev", activations, args.context, args.shard_tokens, "float32")
        write_saev_cache(root / "saev-bf16", activations, args.context, args.shard_tokens, "bfloat16")
        write_saelens_cache(root / "saelens", activations, args.context)
        del activations
        readers = {
            "saev_hf, stream order": lambda: read_saev(root / "saev", args.batch_tokens, False),
            "saev_hf, shuffled": lambda: read_saev(root / "saev", args.batch_tokens, True),
            "saev_hf bf16, shuffled": lambda: read_saev(root / "saev-bf16", args.batch_tokens, True),
            "SAELens": lambda: read_saelens(root / "saelens", args.batch_tokens, args.context),
        }
        disk = {name: sum(f.stat().st_size for f in (root / folder).rglob("*") if f.is_file()) / 1e6
                for name, folder in [("saev_hf, stream order", "saev"), ("saev_hf, shuffled", "saev"),
                                     ("saev_hf bf16, shuffled", "saev-bf16"), ("SAELens", "saelens")]}
        seconds: dict[str, list[float]] = {name: [] for name in readers}
        cold = True
        for round_index in range(args.rounds):
            order = list(readers) if round_index % 2 == 0 else list(reversed(readers))
            for name in order:
                cold = drop_page_cache() and cold
                start = time.perf_counter()
                tokens, total = readers[name]()
                seconds[name].append(time.perf_counter() - start)
                # every reader delivered every token once (a checksum of one column, up to summation order)
                expected = bf16_sum if "bf16" in name else column_sum
                assert tokens == args.tokens and abs(total - expected) <= 1e-3 * args.tokens ** 0.5, (name, tokens)
                print(f"round {round_index}: {name}: {megabytes / seconds[name][-1]:.0f} MB/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        "# Activation cache read throughput: saev_hf vs SAELens' cached activations",
        "",
        f"Command: `python benchmarks/cache_throughput.py --tokens {args.tokens} --d_in {args.d_in} --context "
        f"{args.context} --shard_tokens {args.shard_tokens} --batch_tokens {args.batch_tokens} --rounds "
        f"{args.rounds}` (one thread; {time.perf_counter() - started:.0f} s in all).",
        "",
        f"{args.tokens:,} tokens x d_in {args.d_in} ({megabytes:,.0f} MB of float32 per pass), rows of "
        f"{args.context} tokens, batches of {args.batch_tokens} tokens; "
        + ("page cache dropped before every read (reads from the disk)." if cold else
           "the files were in the page cache (this process may not drop it)."),
        "",
        "| reader | on disk (MB) | MB/s (median) | saev_hf / SAELens per round (median, range) |",
        "|---|---|---|---|",
    ]
    for name in readers:
        rate = statistics.median(megabytes / s for s in seconds[name])
        ratios = [b / a for a, b in zip(seconds[name], seconds["SAELens"])]
        cell = ("1" if name == "SAELens" else
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| {name} | {disk[name]:,.0f} | {rate:,.0f} | {cell} |")
    lines += ["", "The ratio compares the time of one full pass of each reader within the same round (SAELens time / "
              "saev_hf time): above 1, saev_hf delivers the same activations faster. SAELens reads its rows in the "
              "order they were written (shuffled once, when written); saev_hf's shuffled pass reshuffles every pass "
              "with a new seed at no extra disk cost.", ""]
    output_path(args, "cache_throughput").write_text("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({name: [round(s, 3) for s in values] for name, values in seconds.items()}))
    return seconds


if __name__ == "__main__":
    main()
