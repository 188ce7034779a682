"""Benchmark: peak memory of the streaming cross-modal feature weighting at the paper's size.

`compute_feature_weights` (in `saev_hf/weighting.py`) never keeps the hidden states of the data: pass 1 streams token
activations through `FeatureTopK` (a running top-K per feature, O(K * d_sae)), `FeatureTopK.selection` picks each
feature's top text and image positions, and pass 2 re-streams the examples holding those positions through
`CosineAccumulator` (two sums of unit hidden states per weighted feature, at most 2 * d_sae * d_in floats). Memory
should therefore depend on d_sae, d_in and the chunk size, but not on the length of the stream.

This script measures that at the paper's size (d_sae = 65,536, d_in = 4,096, a stream of 1M tokens). Neither the MLLM
nor the SAE encode (a 4096 x 65536 matmul per token) can run over 1M tokens on a CPU in reasonable time, so it drives
the streaming state directly with synthetic data, exactly as `compute_feature_weights` drives it:

* pass 1: per chunk of `--chunk` tokens, a dense (chunk, d_sae) float32 tensor of sparse feature activations (the shape
  and dtype `sae.encode` returns), the stream positions (example * POSITION_STRIDE + token) and an image/text flag per
  token, fed to `FeatureTopK.update`; then `FeatureTopK.selection(per_modality)`;
* pass 2: a `CosineAccumulator` built from the selection, fed (chunk, d_in) float32 synthetic hidden states of every
  chunk that holds a needed position, in the same position order; then `weights(d_sae)`.

Synthetic data (fixed seed, regenerated per chunk from `seed + chunk index`): examples of `--tokens-per-example` tokens,
each with a block of image tokens (`--image-fraction` of them) after a few text tokens. Activations have the sparsity
of relu(randn - 2.5) (0.62 % non-zero), with exponential values of about the same mean as that tail (0.35); they are
scattered into a zero tensor because drawing randn over 65,536 x 1M = 65.5 G values would take longer than the
benchmark itself (`--activations randn` draws the exact relu(randn - 2.5) instead). With these i.i.d. activations
nearly every feature has text and image positions among its top K, so nearly every feature gets a weight: the
CosineAccumulator is at (close to) its worst-case size.

Memory is the resident set size from /proc/self/status: VmRSS (now) and VmHWM (peak), the peak reset between phases
by writing 5 to /proc/self/clear_refs, so that every phase has its own peak. Each stream length runs in a fresh
subprocess (a clean peak); the parent first checks, at a small size, that the driven state gives exactly the brute-force
top-K values and cosine weights (no memory measured there).

Usage (defaults: both 100k and 1M tokens at the paper's size; about 15-25 minutes on a 2-core CPU, almost all of it
`FeatureTopK.update`'s topk over (K + chunk) x 65,536 values per chunk):

    python benchmarks/weighting_memory.py
    python benchmarks/weighting_memory.py --tokens 100000 --chunk 1024
    python benchmarks/weighting_memory.py --d-sae 8192 --d-in 512 --tokens 20000 200000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from saev_hf.weighting.top_k import POSITION_STRIDE, FeatureTopK
from saev_hf.weighting.cosine import CosineAccumulator  # noqa: E402

DENSITY = 0.00621  # P(randn > 2.5)
TAIL_MEAN = 0.3487  # E[randn - 2.5 | randn > 2.5]
TEXT_PREFIX = 6  # text tokens before an example's image block
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak resident since start or last reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss() -> int:
    """This process's resident memory now, in bytes (VmRSS)."""
    return _status("VmRSS")


def peak() -> int:
    """This process's peak resident memory since start or the last `reset_peak`, in bytes (VmHWM)."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def nbytes(*tensors: torch.Tensor) -> int:
    """The bytes of the tensors' elements, summed."""
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic stream
# ---------------------------------------------------------------------------------------------------------------------


def chunk_tokens(args, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream positions (n,) and image flags (n,) of chunk `index` (global tokens index*chunk ... up to --tokens)."""
    start = index * args.chunk
    token = torch.arange(start, min(start + args.chunk, args.tokens))
    example, offset = token // args.tokens_per_example, token % args.tokens_per_example
    image_len = round(args.image_fraction * args.tokens_per_example)
    is_image = (offset >= TEXT_PREFIX) & (offset < TEXT_PREFIX + image_len)
    return example * POSITION_STRIDE + offset, is_image


def chunk_activations(args, index: int, n: int) -> torch.Tensor:
    """(n, d_sae) float32 sparse activations of chunk `index`, deterministic in (seed, index)."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 2 * index)
    if args.activations == "randn":
        return torch.randn(n, args.d_sae, generator=generator).sub_(2.5).relu_()
    acts = torch.zeros(n, args.d_sae)
    nnz = round(DENSITY * n * args.d_sae)
    where = torch.randint(0, n * args.d_sae, (nnz,), generator=generator)
    values = torch.empty(nnz).exponential_(1.0 / TAIL_MEAN, generator=generator)
    acts.view(-1)[where] = values
    return acts


def chunk_hidden(args, index: int, n: int) -> torch.Tensor:
    """(n, d_in) float32 synthetic hidden states of chunk `index`, deterministic in (seed, index)."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 2 * index + 1)
    return torch.randn(n, args.d_in, generator=generator)


def stream(args, record=None):
    """Drive pass 1, the selection and pass 2 as `compute_feature_weights` does.

    Returns `(top, selection, cosines, weights)`.
    """
    record = record or (lambda *a, **k: None)
    num_chunks = math.ceil(args.tokens / args.chunk)

    reset_peak()
    before = rss()
    start = time.perf_counter()
    top = FeatureTopK(args.d_sae, args.top_k)
    record("topk_state", state_bytes=nbytes(top.values, top.positions, top.is_image), rss_after=rss())
    for index in range(num_chunks):
        positions, is_image = chunk_tokens(args, index)
        acts = chunk_activations(args, index, len(positions))
        top.update(acts, positions, is_image)
        del acts
        if args.progress and (index + 1) % max(1, num_chunks // 10) == 0:
            print(f"  pass 1: {index + 1}/{num_chunks} chunks, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    record("pass1", rss_before=before, peak=peak(), rss_after=rss(), seconds=time.perf_counter() - start,
           chunks=num_chunks, chunk_bytes=args.chunk * args.d_sae * 4)

    reset_peak()
    before = rss()
    start = time.perf_counter()
    selection = top.selection(args.per_modality)
    text_count, image_count, weighted, chosen = selection
    record("selection", rss_before=before, peak=peak(), rss_after=rss(), seconds=time.perf_counter() - start,
           state_bytes=nbytes(*selection), weighted=int(weighted.sum()),
           firing=int((top.values > 0).any(0).sum()))

    reset_peak()
    before = rss()
    start = time.perf_counter()
    cosines = CosineAccumulator(weighted, chosen, args.per_modality, args.d_in)
    accumulator_bytes = nbytes(cosines.text_sum, cosines.image_sum, cosines.seen, cosines.need_positions,
                               cosines.need_feature, cosines.need_is_image, cosines.features)
    need = cosines.need_positions
    rereads = 0
    for index in range(num_chunks):
        positions, _ = chunk_tokens(args, index)
        lo = int(torch.searchsorted(need, positions[:1], right=False))  # positions increase within a chunk
        hi = int(torch.searchsorted(need, positions[-1:], right=True))
        if hi == lo:
            continue  # no needed position in this chunk: pass 2 never re-reads it
        rereads += 1
        hidden = chunk_hidden(args, index, len(positions))
        cosines.update(hidden, positions)
        del hidden
    updates_peak, updates_rss = peak(), rss()
    reset_peak()
    weights = cosines.weights(args.d_sae)
    record("pass2", rss_before=before, peak=max(updates_peak, peak()), updates_peak=updates_peak,
           updates_rss=updates_rss, weights_peak=peak(), rss_after=rss(), seconds=time.perf_counter() - start,
           state_bytes=accumulator_bytes, sums_bytes=nbytes(cosines.text_sum, cosines.image_sum),
           needed_positions=len(need), chunks_reread=rereads, chunk_bytes=args.chunk * args.d_in * 4)
    return top, selection, cosines, weights


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one stream length in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


def worker(args) -> None:
    """Stream one length in this process; print its measurements as a 'RESULT <json>' line."""
    import resource

    result: dict = {"tokens": args.tokens, "chunk": args.chunk, "d_sae": args.d_sae, "d_in": args.d_in,
                    "baseline_rss": rss(), "baseline_peak": peak()}

    def record(phase, **values):
        result[phase] = values

    start = time.perf_counter()
    _, _, _, weights = stream(args, record)
    result["seconds"] = time.perf_counter() - start
    result["finite_weights"] = int(torch.isfinite(weights).sum())
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # reset with VmHWM on Linux
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args, tokens: int) -> dict:
    """Measure `tokens` tokens in a fresh worker process; return its parsed RESULT."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tokens", str(tokens)]
    for name in ("d_sae", "d_in", "chunk", "top_k", "per_modality", "tokens_per_example", "image_fraction", "seed",
                 "activations"):
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.progress:
        command.append("--progress")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------------------------------
# Sanity check: the driven state gives the brute-force answer (small size, no memory measured)
# ---------------------------------------------------------------------------------------------------------------------


def check(args) -> None:
    """Check at a small size that the streamed top K and weights equal brute force; print that it passed."""
    small = argparse.Namespace(**{**vars(args), "d_sae": 96, "d_in": 24, "tokens": 6000, "chunk": 700,
                                  "tokens_per_example": 150, "progress": False})
    top, (text_count, image_count, weighted, _), _, weights = stream(small)
    chunks = range(math.ceil(small.tokens / small.chunk))
    parts = [chunk_tokens(small, i) for i in chunks]
    positions = torch.cat([p for p, _ in parts])
    is_image = torch.cat([m for _, m in parts])
    acts = torch.cat([chunk_activations(small, i, len(parts[i][0])) for i in chunks])
    hidden = torch.cat([chunk_hidden(small, i, len(parts[i][0])) for i in chunks])
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    # pass 1: the running top K equals the top K of the whole stream
    torch.testing.assert_close(top.values, acts.topk(small.top_k, dim=0).values, rtol=0, atol=0)
    expected = torch.full((small.d_sae,), math.nan)
    k, m = small.top_k, small.per_modality
    for f in range(small.d_sae):
        order = acts[:, f].topk(k).indices
        order = order[acts[order, f] > 0]
        text, image = order[~is_image[order]], order[is_image[order]]
        assert (len(text), len(image)) == (int(text_count[f]), int(image_count[f])), f
        if len(text) >= m and len(image) >= m:
            expected[f] = (unit[text[:m]] @ unit[image[:m]].T).mean()
    assert torch.equal(torch.isnan(weights), torch.isnan(expected)) and int(weighted.sum()) > 0
    torch.testing.assert_close(weights, expected, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert positions.unique().numel() == positions.numel()
    print(f"Sanity check passed: at d_sae {small.d_sae}, d_in {small.d_in}, {small.tokens} tokens in chunks of "
          f"{small.chunk}, the streamed top-{k} equals the whole stream's, and the {int(weighted.sum())} weights equal "
          f"brute-force mean cosines over each feature's top-{m} text x top-{m} image positions.", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value: int) -> str:
    """`value` bytes in GiB (from 1 GiB) or else in MiB."""
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / MiB:.1f} MiB"


def report(args, results: list[dict]) -> None:
    """Print the markdown tables: peak memory per stream length, where it goes, and vs keeping every hidden state."""
    print(
        f"\nStreaming feature weighting, synthetic stream: d_sae {args.d_sae}, d_in {args.d_in}, top K {args.top_k}, "
        f"{args.per_modality} per modality, chunk {args.chunk} tokens, {args.tokens_per_example} tokens per example "
        f"({args.image_fraction:.0%} image), {args.activations} activations; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread. RSS from /proc/self/status; each stream length in a fresh process.\n"
    )
    print("| tokens | baseline RSS | pass 1 peak | selection peak | pass 2 peak (updates / weights()) | **peak RSS** "
          "| peak - baseline | weighted features | chunks re-read in pass 2 | wall time (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        peak_all = max(r["pass1"]["peak"], r["selection"]["peak"], r["pass2"]["peak"])
        r["peak_all"] = peak_all
        print(
            f"| {r['tokens']:,} | {fmt(r['baseline_rss'])} | {fmt(r['pass1']['peak'])} | {fmt(r['selection']['peak'])} "
            f"| {fmt(r['pass2']['updates_peak'])} / {fmt(r['pass2']['weights_peak'])} | **{fmt(peak_all)}** "
            f"| {fmt(peak_all - r['baseline_rss'])} | {r['selection']['weighted']:,} / {r['d_sae']:,} "
            f"| {r['pass2']['chunks_reread']} / {r['pass1']['chunks']} "
            f"| {r['seconds']:.0f} (pass 1 {r['pass1']['seconds']:.0f}, pass 2 {r['pass2']['seconds']:.0f}) |"
        )

    print("\nWhere the memory goes (the last stream length; sizes in bytes of the tensors, or measured RSS deltas):\n")
    r = results[-1]
    p1, sel, p2 = r["pass1"], r["selection"], r["pass2"]
    topk_state = r["topk_state"]["state_bytes"]
    print("| part | size | how |")
    print("|---|---:|---|")
    print(f"| FeatureTopK state (values fp32, positions int64, is_image bool: K x d_sae each) | {fmt(topk_state)} "
          f"| tensor sizes |")
    print(f"| pass 1 transient per chunk | {fmt(p1['peak'] - p1['rss_after'])} | measured: pass 1 peak - RSS after "
          f"pass 1 (one (chunk, d_sae) fp32 activation tensor is {fmt(p1['chunk_bytes'])}) |")
    print(f"| selection outputs (counts, weighted, chosen) | {fmt(sel['state_bytes'])} | tensor sizes |")
    print(f"| CosineAccumulator state (text_sum + image_sum: {fmt(p2['sums_bytes'])}; index of "
          f"{p2['needed_positions']:,} needed positions) | {fmt(p2['state_bytes'])} | tensor sizes |")
    print(f"| pass 2 updates: peak over RSS before pass 2 | {fmt(p2['updates_peak'] - p2['rss_before'])} "
          f"| measured (accumulator + per-chunk transient; one (chunk, d_in) fp32 hidden-state tensor is "
          f"{fmt(p2['chunk_bytes'])}) |")
    print(f"| RSS after the updates - RSS before pass 2 | {fmt(p2['updates_rss'] - p2['rss_before'])} | measured |")
    print(f"| `CosineAccumulator.weights()` transient | {fmt(p2['weights_peak'] - p2['updates_rss'])} | measured: "
          f"its peak - RSS before it (an einsum over the two sums, each {fmt(p2['sums_bytes'] // 2)}) |")

    print("\nComputed, not measured: the authors' approach keeps every hidden state (tokens x d_in x 4 bytes, fp32):\n")
    print("| tokens | every hidden state kept (computed) | streaming peak - baseline (measured) |")
    print("|---:|---:|---:|")
    for r in results:
        kept = r["tokens"] * r["d_in"] * 4
        print(f"| {r['tokens']:,} | {kept / 1e9:.2f} GB ({fmt(kept)}) | {fmt(r['peak_all'] - r['baseline_rss'])} |")


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (checked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--d-sae", type=int, default=65536, help="SAE features (the paper: 65,536)")
    parser.add_argument("--d-in", type=int, default=4096, help="hidden size of the MLLM (the paper: 4,096)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="stream lengths, each measured in a fresh process")
    parser.add_argument("--chunk", type=int, default=4096,
                        help="tokens per FeatureTopK.update (WeightingArguments.token_chunk's default: 4096)")
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--per-modality", type=int, default=5)
    parser.add_argument("--tokens-per-example", type=int, default=1024)
    parser.add_argument("--image-fraction", type=float, default=0.5, help="image tokens per example (a block)")
    parser.add_argument("--activations", choices=("sparse", "randn"), default="sparse",
                        help="sparse: relu(randn - 2.5)'s sparsity, scattered (fast); randn: relu(randn - 2.5) itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the small brute-force sanity check")
    parser.add_argument("--progress", action="store_true", help="print pass-1 progress to stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.d_sae, args.d_in, args.chunk, args.top_k, args.per_modality, args.tokens_per_example, *args.tokens) < 1:
        parser.error("sizes must be positive")
    if 2 * args.per_modality > args.top_k:
        parser.error("--top-k must be at least twice --per-modality")
    image_len = round(args.image_fraction * args.tokens_per_example)
    if not 0 < image_len <= args.tokens_per_example - TEXT_PREFIX:
        parser.error(f"--image-fraction leaves no image or no text tokens in a {args.tokens_per_example}-token example")
    return args


def main(argv=None) -> None:
    """Check, measure each stream length in a fresh process and print the report; as a worker, measure one."""
    args = parse_args(argv)
    if args.worker:
        (args.tokens,) = args.tokens
        worker(args)
        return
    start = time.perf_counter()
    if not args.no_check:
        check(args)
    results = []
    for tokens in args.tokens:
        print(f"Running {tokens:,} tokens ...", flush=True)
        results.append(run_worker(args, tokens))
        print(f"  done in {results[-1]['seconds']:.0f} s", flush=True)
    report(args, results)
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
