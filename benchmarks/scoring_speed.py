"""Benchmark: `SAEVScorer` (the `datasets.map` scoring function) versus the bare forward of the MLLM to layer L.

Scoring an example costs one forward of the MLLM up to layer L plus the SAE-V encode of its tokens and a few
per-example reductions (co-occurring features, L0, weighted sum). The goal is that the scorer costs at most 1.10x the
bare forward on the same batches. This script times, per batch of `--batch-size` digit-image examples:

* **bare**: `reader.read_inputs(inputs)` on inputs prepared beforehand (the forward to layer L, nothing else);
* **read**: `reader.read(rows)`: preparing the inputs from the rows (chat template, image loading and processing,
  tokenization, padding) plus the same forward;
* **scorer**: `scorer(batch)`, the full `datasets.map(scorer, batched=True)` call on the same rows: preparation,
  forward, the SAE-V encode of the batch's scored tokens at once (in token chunks) and the reductions of all three
  scores;
* **encode**: `sae.encode` of the batch's counted (text, image and special) hidden states in one call, on states
  captured beforehand: the floor of the SAE-V part (its matmul, bias and ReLU), for reference;
* **encode/example**: the same states encoded one example at a time (what the scorer did before it encoded a batch
  at once), for reference;
* **scorer+baselines**: the scorer asked for SAE-V's three scores and three baselines (`length`,
  `answer_log_likelihood`, `image_text_similarity`) at once: one forward, run to the end for the log-likelihood;
* **baselines**: the same three baselines by a scorer without an SAE-V (a second map): what computing them apart
  would add to the SAE-V scorer.

and reports the ratios scorer/bare (the goal's), scorer/read (the SAE-V and scoring overhead alone) and read/bare
(input preparation), each the median over repetitions of the ratio of the two calls timed within the same repetition,
with its interquartile range; encode/bare and encode-per-example/bare; reductions/bare, where reductions = scorer -
read - encode (what the scorer adds beyond preparation, the forward and its encode: the reductions and Python
overhead), medians of the per-repetition values; scorer+baselines / scorer (the cost of three baselines beside SAE-V)
and (scorer + baselines) / scorer+baselines (what the shared forward saves); and the ratio expected
if time were proportional to weight-matmul FLOPs (forward to layer L over the padded positions, vision tower and
projector included, plus d_in x d_sae per scored token).

**Model.** The "scaled" LLaVA of `benchmarks/layer_capture.py` (its `build_scaled_llava`, imported from it): the tiny
LLaVA's vision tower, projector and processor with a randomly initialised Llama text model of hidden size 512, 16
layers, intermediate size 1376, 8 heads (2 KV), vocabulary 32064; layer L = 8 is read. SAE-Vs: `SAEV(SAEVConfig(
d_in=512, expansion_factor=E, hook_layer=8))` for E = 16 (d_sae 8192) and 32 (d_sae 16384), random (the paper's init),
with random synthetic feature weights, and `cooccurrence_threshold` set to a quantile of their own activations on the
benchmark's data (`--threshold-quantile`), so that some features co-occur in every example.

**Method** as in `layer_capture.py`: one thread (`OMP_NUM_THREADS=1` before torch is imported,
`torch.set_num_threads(1)`); every call warmed up first; each repetition times every call once over all batches, in an
order rotated from one repetition to the next (interleaved), with the garbage collector paused. Compare ratios, not
absolute times, across runs. Before timing, it checks that the scorer's three scores equal ones computed directly from
`read_inputs`'s hidden states (one encode per example, no token chunking) and that examples have co-occurring features.
With `--profile` (or automatically when a median scorer/bare ratio exceeds `--goal`), it then runs cProfile over the
scorer calls and prints where the scorer's time goes beyond the bare forward.

Usage (defaults: 32 examples in batches of 8, 21 repetitions; about 2 minutes on a 2-core CPU):

    python benchmarks/scoring_speed.py
    python benchmarks/scoring_speed.py --expansions 16 --repeats 9 --profile
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from _common import interleaved_timings, quartiles  # noqa: E402
from layer_capture import PROMPTS, add_scaled_llava_arguments, build_scaled_llava, param_count  # noqa: E402  (the sibling's scaled LLaVA)

from saev_hf import SAEV, SAEVConfig, SAEVScorer  # noqa: E402
from saev_hf.scoring import ScorerArguments  # noqa: E402
from saev_hf.activations import LayerReader, Modality  # noqa: E402
from saev_hf.testing.digit_data import digit_images  # noqa: E402


def make_batches(num_examples: int, batch_size: int) -> list[dict[str, list]]:
    """`datasets`-style batches (dicts of columns): one digit image and a short question per example."""
    images = [image for image, _ in digit_images(num_examples, seed=0)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_examples)]
    answers = [f"a handwritten digit {label} ." for _, label in digit_images(num_examples, seed=0)]
    return [
        {"images": [[image] for image in images[s : s + batch_size]], "prompt": prompts[s : s + batch_size],
         "chosen": answers[s : s + batch_size]}
        for s in range(0, num_examples, batch_size)
    ]


def counted_hidden(acts) -> torch.Tensor:
    """The text, image and special positions' hidden states of a batch (what the scorer encodes), (n, d_in)."""
    keep = (acts.modality == Modality.TEXT) | (acts.modality == Modality.IMAGE) | (acts.modality == Modality.SPECIAL)
    return acts.hidden_states[keep]


@torch.no_grad()
def make_sae(expansion: int, layer: int, hidden: list[torch.Tensor], quantile: float, seed: int) -> SAEV:
    """An SAE-V with random feature weights; its threshold, the `quantile` of its positive activations on `hidden`."""
    torch.manual_seed(seed)
    sae = SAEV(SAEVConfig(d_in=hidden[0].shape[-1], expansion_factor=expansion, hook_layer=layer)).eval()
    sae.to(hidden[0].device)  # on the device of the hidden states it calibrates on (the model's)
    weights = torch.rand(sae.config.d_sae, generator=torch.Generator().manual_seed(seed))
    sae.set_feature_weights(weights, info={"synthetic": True})
    z = torch.cat([sae.encode(h) for h in hidden])
    positive = z[z > 0]
    sample = positive[torch.randperm(len(positive), generator=torch.Generator().manual_seed(seed))[:1_000_000]]
    sae.config.cooccurrence_threshold = float(sample.quantile(quantile))
    return sae


@torch.no_grad()
def reference_scores(sae: SAEV, reader: LayerReader, inputs) -> dict[str, list]:
    """The three scores from `read_inputs`'s states directly: one encode per example, no token chunking."""
    acts = reader.read_inputs(inputs)
    delta, weights = sae.config.cooccurrence_threshold, sae.feature_weights.nan_to_num(0.0)
    out = {"saev_cosine_score": [], "saev_l0": [], "saev_cooccur_l0": []}
    for i in range(len(acts)):
        hidden, modality = acts.example(i)
        image = modality == Modality.IMAGE
        text = (modality == Modality.TEXT) | (modality == Modality.SPECIAL)
        z = sae.encode(hidden[image | text])
        image, text = image[image | text], text[image | text]
        cooccur = (z[text] > delta).any(0) & (z[image] > delta).any(0)
        out["saev_cosine_score"].append(float(weights[cooccur].double().sum()))
        out["saev_l0"].append(float((z > 0).sum(-1).float().mean()))
        out["saev_cooccur_l0"].append(int(cooccur.sum()))
    return out


def check_scores(scorer: SAEVScorer, sae: SAEV, reader: LayerReader, batches, prepared) -> float:
    """The scorer's scores equal the reference ones; returns the mean number of co-occurring features per example."""
    cooccur = []
    for batch, inputs in zip(batches, prepared):
        got, want = scorer(batch), reference_scores(sae, reader, inputs)
        for name, values in want.items():
            torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64),
                                       torch.tensor(values, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        cooccur += got["saev_cooccur_l0"]
    assert min(cooccur) > 0, f"some examples have no co-occurring feature: {cooccur}"
    return statistics.mean(cooccur)


@torch.no_grad()
def benchmark(args: argparse.Namespace):
    """Build the model and SAE-Vs (scores checked); time forward, read, scorers, encodes; return them and the times."""
    model, processor = build_scaled_llava(args.vocab_size, args)
    reader = LayerReader(model, processor, layer=args.layer)
    batches = make_batches(args.examples, args.batch_size)
    prepared = [reader.prepare(batch) for batch in batches]
    states = [counted_hidden(reader.read_inputs(inputs)) for inputs in prepared]
    example_states = []  # per batch, the counted states of each example
    for inputs in prepared:
        acts = reader.read_inputs(inputs)
        keep = acts.modality != Modality.PAD
        example_states.append([acts.hidden_states[i][keep[i]] for i in range(len(acts))])
    assert all(torch.equal(torch.cat(parts), whole) for parts, whole in zip(example_states, states))
    tokens = sum(len(h) for h in states)
    padded = sum(inputs["input_ids"].numel() for inputs in prepared)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter LLaVA, {len(reader.layers)} decoder "
          f"layers, reading layer {args.layer}; {args.examples} examples in {len(batches)} batches of "
          f"{args.batch_size}: {tokens} scored tokens ({padded} positions with padding)", flush=True)

    # weight-matmul MACs (parameters x positions they touch; attention scores, norms and overheads ignored)
    vision_config = model.config.vision_config
    images = sum(inputs["pixel_values"].shape[0] for inputs in prepared)
    vision_positions = images * ((vision_config.image_size // vision_config.patch_size) ** 2 + 1)  # + CLS
    forward_macs = (
        param_count(model.model.vision_tower) * vision_positions
        + param_count(model.model.multi_modal_projector) * images * model.config.image_seq_length
        + (args.layer + 1) * param_count(model.model.language_model.layers[0]) * padded
    )

    saes, scorers, info = {}, {}, {}
    for expansion in args.expansions:
        sae = make_sae(expansion, args.layer, states, args.threshold_quantile, args.seed)
        scorer = SAEVScorer(sae, model, processor)
        mean_cooccur = check_scores(scorer, sae, reader, batches, prepared)
        saes[expansion], scorers[expansion] = sae, scorer
        info[expansion] = {"d_sae": sae.config.d_sae, "delta": sae.config.cooccurrence_threshold,
                           "cooccur": mean_cooccur,
                           "estimate": 1 + tokens * sae.config.d_in * sae.config.d_sae / forward_macs}
        print(f"  SAE-V x{expansion} (d_sae {sae.config.d_sae}): threshold {sae.config.cooccurrence_threshold:.4f}, "
              f"{mean_cooccur:.1f} co-occurring features per example on average; scores checked", flush=True)

    # each call runs over every batch once; its argument list is what it iterates over
    calls = {"bare": (reader.read_inputs, prepared), "read": (reader.read, batches)}
    for expansion in args.expansions:
        calls[f"scorer x{expansion}"] = (scorers[expansion], batches)
        calls[f"encode x{expansion}"] = (saes[expansion].encode, states)
        calls[f"encode/example x{expansion}"] = (
            lambda parts, encode=saes[expansion].encode: [encode(part) for part in parts], example_states)
    first = args.expansions[0]
    calls[f"scorer+baselines x{first}"] = (SAEVScorer(saes[first], model, processor, args=ScorerArguments(
        scores=["cosine", "l0", "cooccur_l0", *BASELINES_TIMED])), batches)
    calls["baselines"] = (SAEVScorer(None, model, processor, args=ScorerArguments(scores=list(BASELINES_TIMED))),
                          batches)
    names = list(calls)

    def once(name):
        fn, items = calls[name]
        for item in items:
            fn(item)

    times = interleaved_timings({name: (lambda name=name: once(name)) for name in names}, args.repeats, args.warmup)
    return model, reader, batches, scorers, info, times


def ratio(times, a, b):
    """The median and quartiles of the per-repetition ratios `times[a] / times[b]`."""
    values = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(values), quartiles(values)


BASELINES_TIMED = ("length", "answer_log_likelihood", "image_text_similarity")


def rest(times, scorer: str, encode: str) -> list[float]:
    """Per repetition, (scorer - read - encode) / bare: what the scorer adds beyond input preparation, the forward
    and its encode (the reductions, Python overhead)."""
    return [(s - r - e) / b for s, r, e, b in zip(times[scorer], times["read"], times[encode], times["bare"])]


def cell(times, a, b) -> str:
    """A table cell: the median ratio `times[a] / times[b]` in bold, with its IQR."""
    median, (low, high) = ratio(times, a, b)
    return f"**{median:.3f}x** (IQR {low:.3f}-{high:.3f})"


@torch.no_grad()
def profile(args, scorer: SAEVScorer, batches, bare_ms_per_batch: float, expansion: int) -> None:
    """cProfile the scorer over every batch `--profile-repeats` times and attribute its time."""
    scorer(batches[0])
    profiler = cProfile.Profile()
    gc.collect()
    gc.disable()
    try:
        profiler.enable()
        for _ in range(args.profile_repeats):
            for batch in batches:
                scorer(batch)
        profiler.disable()
    finally:
        gc.enable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    calls = args.profile_repeats * len(batches)

    def find(name: str, file_part: str):
        hits = [(key, value) for key, value in stats.items() if key[2] == name and file_part in key[0]]
        if len(hits) != 1:
            raise RuntimeError(f"{name} in {file_part}: {len(hits)} profile entries")
        return hits[0]

    call_key, call_stat = find("__call__", "map_function.py")
    score_key, score_stat = find("_score_inputs", "scorer.py")
    _, prepare_stat = find("prepare_inputs", "prompts.py")
    _, forward_stat = find("read_inputs", "reader.py")
    _, encode_stat = find("encode", "modeling.py")
    total = call_stat[3] / calls

    def ms(seconds: float) -> str:
        return f"{1e3 * seconds / calls:.2f}"

    def share(seconds: float) -> str:
        return f"{100 * seconds / calls / (bare_ms_per_batch / 1e3):.1f} %"

    # functions called directly from _score_inputs, other than the forward and the encode: the reductions
    direct = []
    for key, (_, _, _, _, callers) in stats.items():
        if score_key in callers and key[2] not in ("read_inputs", "encode"):
            _, nc, tt, ct = callers[score_key]
            direct.append((ct, nc, key))
    direct.sort(reverse=True)
    reductions = sum(ct for ct, _, _ in direct) + score_stat[2]  # + score_rows' own Python lines
    encode_parts = []
    encode_key = find("encode", "modeling.py")[0]
    for key, (_, _, _, _, callers) in stats.items():
        if encode_key in callers:
            encode_parts.append((callers[encode_key][3], callers[encode_key][1], key))
    encode_parts.sort(reverse=True)
    rest = call_stat[3] - score_stat[3]  # __call__ outside _score_inputs (validation, batching, argument handling)

    def label(key) -> str:
        file, line, name = key
        return name if file == "~" else f"{Path(file).name}:{line}({name})"

    print(f"\ncProfile of the scorer with the x{expansion} SAE-V (d_sae {scorer._sae.config.d_sae}), "
          f"{args.profile_repeats} x {len(batches)} batches; ms per batch of {args.batch_size} (cProfile adds "
          f"overhead per Python call, so totals exceed the timed medians); share = of the bare forward's median "
          f"{bare_ms_per_batch:.1f} ms per batch:\n")
    print("| part of `scorer(batch)` | ms per batch | share of bare forward |")
    print("|---|---:|---:|")
    print(f"| total `SAEVScorer.__call__` | {1e3 * total:.2f} | {share(call_stat[3])} |")
    print(f"| `LayerReader.read_inputs` (the forward to layer L) | {ms(forward_stat[3])} | {share(forward_stat[3])} |")
    print(f"| `prepare_inputs` (chat template, images, processor) | {ms(prepare_stat[3])} "
          f"| {share(prepare_stat[3])} |")
    print(f"| `SAEV.encode` ({encode_stat[1] // calls} calls per batch: one per token chunk) "
          f"| {ms(encode_stat[3])} | {share(encode_stat[3])} |")
    for ct, nc, key in encode_parts[:4]:
        print(f"| &nbsp;&nbsp; in encode: `{label(key)}` ({nc // calls} calls) | {ms(ct)} | {share(ct)} |")
    print(f"| reductions in `_score_inputs` (all its other calls and own lines) | {ms(reductions)} "
          f"| {share(reductions)} |")
    for ct, nc, key in direct[: args.profile_top]:
        print(f"| &nbsp;&nbsp; `{label(key)}` ({nc // calls} calls) | {ms(ct)} | {share(ct)} |")
    print(f"| &nbsp;&nbsp; `_score_inputs`' own lines, with the tensor operators cProfile does not list (`z > delta`, "
          f"`z > 0`, boolean-mask indexing, `\\|=`, `&`) | {ms(score_stat[2])} | {share(score_stat[2])} |")
    print(f"| `__call__` outside `_score_inputs` (validation, batching, arguments) | {ms(rest)} | {share(rest)} |")


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (checked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--examples", type=int, default=32, help="examples scored per repetition (N)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (one digit image each)")
    parser.add_argument("--expansions", type=int, nargs="+", default=[16, 32], help="SAE-V expansion factors")
    parser.add_argument("--layer", type=int, default=8, help="decoder layer L read (0-based)")
    parser.add_argument("--threshold-quantile", type=float, default=0.99,
                        help="cooccurrence_threshold = this quantile of the SAE-V's positive activations on the data")
    parser.add_argument("--repeats", type=int, default=21, help="timed repetitions (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--goal", type=float, default=1.10, help="scorer/bare ratio above which the scorer is profiled")
    parser.add_argument("--profile", action="store_true", help="profile the scorer even within the goal")
    parser.add_argument("--profile-repeats", type=int, default=3, help="passes over the batches under cProfile")
    parser.add_argument("--profile-top", type=int, default=8, help="reduction calls listed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=32064)
    add_scaled_llava_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.layer < args.num_layers:
        parser.error(f"--layer {args.layer} out of range for --num-layers {args.num_layers}")
    if min(args.examples, args.batch_size, args.repeats, args.profile_repeats) < 1 or args.warmup < 0:
        parser.error("--examples, --batch-size, --repeats, --profile-repeats must be positive, --warmup non-negative")
    if not 0 < args.threshold_quantile < 1:
        parser.error("--threshold-quantile must be in (0, 1)")
    return args


def main(argv=None) -> None:
    """Benchmark, print the markdown tables of the scorer vs the bare forward; profile it where it exceeds --goal."""
    args = parse_args(argv)
    start = time.perf_counter()
    model, reader, batches, scorers, info, times = benchmark(args)
    per_batch = 1e3 / len(batches)
    bare_ms = per_batch * statistics.median(times["bare"])
    read_ms = per_batch * statistics.median(times["read"])
    print(
        f"\nSAEVScorer vs the bare forward to layer {args.layer}: scaled LLaVA (Llama text model hidden "
        f"{args.hidden_size}, {args.num_layers} layers, vocab {args.vocab_size}), {args.examples} examples in batches "
        f"of {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} thread; median of {args.repeats} "
        f"interleaved repetitions after {args.warmup} warm-up. Times are medians per batch.\n"
    )
    print("| SAE-V | d_sae | bare (ms) | read (ms) | scorer (ms) | **scorer / bare** | scorer / read | read / bare "
          "| matmul-FLOP estimate of scorer / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for expansion in args.expansions:
        s = f"scorer x{expansion}"
        print(
            f"| x{expansion} | {info[expansion]['d_sae']} | {bare_ms:.1f} | {read_ms:.1f} "
            f"| {per_batch * statistics.median(times[s]):.1f} | {cell(times, s, 'bare')} | {cell(times, s, 'read')} "
            f"| {cell(times, 'read', 'bare')} | {info[expansion]['estimate']:.3f}x |"
        )
    print("\nThe SAE-V part, from the same interleaved repetitions (per batch; / bare = median of per-repetition "
          "ratios to the bare forward):\n")
    print("| SAE-V | encode, one call per batch (ms) | / bare | encode, one call per example (ms) | / bare "
          "| reductions = scorer - read - encode (ms) | / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for expansion in args.expansions:
        s, e, ee = f"scorer x{expansion}", f"encode x{expansion}", f"encode/example x{expansion}"
        reductions_ms = [per_batch * (a - b - c) for a, b, c in zip(times[s], times["read"], times[e])]
        print(
            f"| x{expansion} | {per_batch * statistics.median(times[e]):.1f} | {ratio(times, e, 'bare')[0]:.3f}x "
            f"| {per_batch * statistics.median(times[ee]):.1f} | {ratio(times, ee, 'bare')[0]:.3f}x "
            f"| {statistics.median(reductions_ms):.1f} | {statistics.median(rest(times, s, e)):.3f}x |"
        )
    first = args.expansions[0]
    both, alone = f"scorer+baselines x{first}", f"scorer x{first}"
    apart = [(a + b) / c for a, b, c in zip(times[alone], times["baselines"], times[both])]
    print(f"\nSAE-V (x{first}) with three baselines ({', '.join(BASELINES_TIMED)}) in one scorer: "
          f"{per_batch * statistics.median(times[both]):.1f} ms per batch; **scorer+baselines / scorer** "
          f"{cell(times, both, alone)}; computed apart (SAE-V scorer + a baselines scorer) / together "
          f"**{statistics.median(apart):.3f}x** (IQR {quartiles(apart)[0]:.3f}-{quartiles(apart)[1]:.3f}).")
    over = [x for x in args.expansions if ratio(times, f"scorer x{x}", "bare")[0] > args.goal]
    verdict = (f"exceeds the {args.goal:.2f}x goal for x{', x'.join(map(str, over))}" if over
               else f"is within the {args.goal:.2f}x goal")
    print(f"\nThe median scorer/bare ratio {verdict}.")
    for expansion in (over or (args.expansions if args.profile else [])):
        profile(args, scorers[expansion], batches, bare_ms, expansion)
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
