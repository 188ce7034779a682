"""Cross-modal feature weights: Algorithm 1, stages 1-2, streaming and in bounded memory.

For every feature f, pool the positions where f fires (z_f > 0) over the dataset and keep the top K (30) by z_f:

- all K text, or all K image: f is single-modal and gets no weight;
- at least `per_modality` (5) text and 5 image: w_f = mean over the 5 x 5 pairs of cos(h_text_i, h_image_j) between
  the MLLM hidden states (not SAE latents) at f's top-5 text and top-5 image positions;
- otherwise f gets no weight (NaN in `SAEV.feature_weights`).

The authors' code keeps every hidden state in memory (about 160 GB for 1k examples). Here:

1. Pass 1 streams the data and keeps, per feature, only the (value, modality, position) of its running top K:
   O(d_sae * K) memory, about 25 MB at the paper's d_sae = 65,536.
2. The text positions inside a feature's global top K are its globally highest text positions (any text position
   outside the top K is lower than every one inside), and likewise for image. So the top-5 of each modality within
   the top K are known after pass 1. Because mean_ij cos(t_i, v_j) = (sum_i t_i/|t_i|) . (sum_j v_j/|v_j|) / 25,
   pass 2 re-reads only the examples that hold such a position and accumulates, per weighted feature, two sums of
   unit vectors: at most 2 * d_sae * d_in float64 values (only the weighted features': 4 GB if all 65,536 x 4,096 were),
   whatever the number of examples.

Ties between equal activations are broken by stream position, the earlier position first, never by how `torch.topk`
happens to order them: a bfloat16 SAE-V or model makes many exact ties, and its weights must not depend on the batch
size or the chunking.

Many processes (`torchrun`, `accelerate launch`; see [`saev_hf.runtime.distributed`]): the weighting sample is cut into the
forward batches one process would read, and each process reads a contiguous run of them (its rows keep their stream
positions, so ties break as in one process). Pass 1's results are then merged with torch.distributed collectives:
the per-feature top K by re-running [`FeatureTopK.merge`] on every process's top K (each holds every member of the
global top K that lies in its shard), the hidden-state sum and token count added, the per-modality maxima maxed, the
calibration sample merged ([`PositiveSample.merge`]). Pass 2 shares out the batches of the rows it needs the same way
and adds the processes' sums of unit vectors. Every process ends with the same weights, equal to one process's
(`torch.equal`): the cosine sums and the hidden-state sum are float64 sums of float32 values, which agree with one
process's to the last float64 bit in practice and whatever their order to the float32 weight but in the rare case
where a float64 rounding difference straddles a float32 rounding boundary (about 2^-29 per value; never seen).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import gather, gather_object

from ..activations.reader import LayerReader, special_as_text_field
from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..cache.activation_cache import ActivationCache
from ..cache.reader import CacheReader, cached_rows
from ..data.batching import is_indexable
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field
from ..data.prompts import PromptFormat
from ..model.cooccurrence import check_cooccurrence
from ..model.modeling import SAEV
from ..runtime.devices import allow_tf32_field, choose_device, sae_matmul_precision, token_chunk_field
from ..runtime.distributed import batch_share, distributed_state
from ..runtime.folders import OutputArguments, mark_output_complete
from ..runtime.progress import progress_bar
from .cosine import CosineAccumulator
from .delta import PositiveSample
from .top_k import FeatureTopK, ModalityTopK, _stream_positions


@dataclass
class WeightingArguments:
    """Settings of the cross-modal feature weighting (the paper's values are the defaults)."""

    top_k: int = field(default=30, metadata={"help": "Top activating positions kept per feature (K)."})
    per_modality: int = field(
        default=5, metadata={"help": "Text and image positions needed among the top K, and used for the cosine."}
    )
    special_as_text: bool = special_as_text_field()
    mean_center: bool = field(
        default=False,
        metadata={"help": "Subtract the mean hidden state (over all counted positions) before the cosine. Not in "
                  "the paper; it removes the shared direction that makes every cosine positive."},
    )
    num_examples: int | None = field(
        default=1000, metadata={"help": "Examples sampled from the dataset (the paper: 1k). None uses them all."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per MLLM forward."})
    token_chunk: int = token_chunk_field()
    seed: int = field(default=42, metadata={"help": "Seed of the example sample."})
    threshold_quantile: float | None = field(
        default=None,
        metadata={"help": "Calibrate delta: set the SAE-V's cooccurrence_threshold to this quantile (in (0, 1), e.g. "
                  "0.5) of its positive activations on the weighting data, recorded with its provenance in "
                  "cooccurrence_threshold_info. None keeps the SAE-V's delta (the paper's 1.0 by default)."},
    )
    top_k_pool: str = field(
        default="pooled",
        metadata={"help": "Which positions decide a feature's weight. 'pooled' (the paper): its top_k positions over "
                  "both modalities, weighted if at least per_modality of them are text and per_modality image. "
                  "'per_modality' (not in the paper): its top per_modality text and top per_modality image positions "
                  "taken separately, weighted if it fires on at least per_modality of each; for data where one "
                  "modality has many more positions or larger activations, so that the pooled top K holds only "
                  "that modality although the feature fires on both.", "choices": ["pooled", "per_modality"]},
    )
    allow_tf32: bool = allow_tf32_field()
    preprocessing_workers: int = preprocessing_workers_field()

    def __post_init__(self) -> None:
        for name in ("top_k", "per_modality", "batch_size", "token_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        check_workers(self.preprocessing_workers)
        if 2 * self.per_modality > self.top_k:
            raise ValueError(
                f"per_modality={self.per_modality} needs at least {2 * self.per_modality} positions among the top "
                f"{self.top_k}; raise top_k or lower per_modality."
            )
        if self.num_examples is not None and self.num_examples <= 0:
            raise ValueError(f"num_examples={self.num_examples} must be positive, or None for the whole dataset.")
        if self.top_k_pool not in ("pooled", "per_modality"):
            raise ValueError(f"top_k_pool={self.top_k_pool!r} must be 'pooled' (the paper's) or 'per_modality'.")
        if self.threshold_quantile is not None and not 0 < self.threshold_quantile < 1:
            raise ValueError(f"threshold_quantile={self.threshold_quantile} must be in (0, 1), e.g. 0.5 for the "
                             f"median positive activation, or None to keep delta.")


def _batches(reader: LayerReader | CacheReader, dataset: Any, args: WeightingArguments, rows: Any):
    """The rows at dataset indices `rows` (all, with None), prepared in forward batches of `args.batch_size` by
    `args.preprocessing_workers` ahead of the forward ([`prepared_batches`]), in the dataset's order; from an
    activation cache, the batches of its rows that its [`CacheReader`] reads."""
    if isinstance(reader, CacheReader):
        return reader.prepared_batches(dataset, args.batch_size, rows)
    return prepared_batches(reader, dataset, args.batch_size, rows, workers=args.preprocessing_workers)


@torch.no_grad()
def compute_feature_weights(sae, reader: LayerReader, dataset: Any, args: WeightingArguments | None = None,
                            store: bool = True) -> torch.Tensor:
    """
    Compute SAE-V's cross-modal feature weights (Algorithm 1, stages 1-2) over `dataset` and, with `store=True`,
    save them in `sae` (they then travel with `save_pretrained` / `push_to_hub`).

    Args:
        sae ([`SAEV`]): the SAE-V, made for `reader`'s model and layer.
        reader ([`LayerReader`] or [`saev_hf.cache.CacheReader`]): reads the MLLM's layer L from rows (its
            `prompt_format` names the columns; the paper feeds the question and the image only), or reads them from
            an activation cache (`dataset` is then the cache's `cached_rows`): the same weights, without the MLLM.
        dataset: a `datasets.Dataset` (or any sequence of row dicts), or a stream (`datasets.IterableDataset`, any
            re-iterable of row dicts): a stream is read in order, its first `num_examples` rows, twice (one per pass).
        args ([`WeightingArguments`]): K, per-modality count, special tokens, centring, sample size.

    Under `torchrun` / `accelerate launch` with several processes, each process reads its own share of the sample
    and they merge what they found (module docstring): call it on every process, with the same arguments; each
    returns (and, with `store=True`, stores) the same weights as one process would. A stream is then read by every
    process up to the end of its share (only its share goes through the model) and needs `num_examples`.
    `feature_weights_info` then also records `num_processes`.

    Returns:
        `torch.Tensor` (d_sae,): the weights, NaN for features without a weight.
    """
    args = args or WeightingArguments()
    reader.check_sae(sae)
    if isinstance(reader, CacheReader) and args.special_as_text and not reader.include_special_tokens:
        raise ValueError(f"special_as_text=True counts the special tokens as text, but the activation cache "
                         f"{str(reader.cache.path)!r} was made without them. Pass special_as_text=False "
                         f"(--special_as_text False), or make the cache with include_special_tokens=True.")
    sample = _weighting_sample(dataset, args)
    state = distributed_state(cpu=sae.W_enc.device.type == "cpu")
    if state is not None and sample is None and args.num_examples is None:
        raise ValueError(
            f"Weighting a stream over {state.num_processes} processes needs its length, to cut it between them: give "
            f"num_examples (--num_examples), or pass a datasets.Dataset (or load the data without streaming)."
        )
    first = _top_k_pass(sae, reader, dataset, args, sample, state)
    text_count, image_count, weighted, chosen = first.top.selection(args.per_modality)
    center = (first.hidden_sum / first.num_tokens).float() if args.mean_center else None
    cosines = CosineAccumulator(weighted, chosen, args.per_modality, sae.config.d_in, center)
    _cosine_pass(cosines, reader, dataset, args, first, state)
    weights = cosines.weights(sae.config.d_sae)
    info = _weights_info(args, reader, dataset, first, text_count, image_count, weighted)
    info["mean_cosine_score"] = model_cosine_score(weights) if bool((~torch.isnan(weights)).any()) else None
    if state is not None:
        info["num_processes"] = state.num_processes  # a record of the run: the weights do not depend on it
    if store:
        sae.set_feature_weights(weights.cpu(), info=info)
        if first.positives is not None:
            delta = first.positives.quantile(args.threshold_quantile)
            sae.set_cooccurrence_threshold(delta, info={
                "method": "quantile of the SAE-V's positive activations on the weighting data",
                "quantile": args.threshold_quantile,
                "num_positive_activations": first.positives.seen,
                "num_sampled": first.positives.size,
                "num_examples": len(first.sample),
                "dataset": info["dataset"],
                "dataset_fingerprint": info["dataset_fingerprint"],
            })
        check_cooccurrence(sae, where="computing the feature weights", error=False)  # the weights are still valid
    return weights


def model_cosine_score(weights: torch.Tensor) -> float:
    """
    The paper's model-level score: the mean cross-modal weight w_f over the SAE-V's weighted features (those with a
    non-NaN weight), computed with a given MLLM on a given dataset. The paper reports that it tracks the MLLM's
    benchmark performance: compare MLLMs by it with the same SAE-V, layer and data (`saev weights` prints it and
    `feature_weights_info["mean_cosine_score"]` records it).

    Args:
        weights (`torch.Tensor` of shape `(d_sae,)`): feature weights, NaN where a feature has none.

    Raises:
        ValueError: when no feature has a weight (there is nothing to average; lower delta or weigh more data).
    """
    weighted = weights[~torch.isnan(weights)]
    if len(weighted) == 0:
        raise ValueError("No feature has a cross-modal weight, so the mean cosine score is undefined: weigh more "
                         "examples, or check that the data has both image and text positions.")
    return float(weighted.double().mean())


def _weighting_sample(dataset: Any, args: WeightingArguments) -> list[int] | None:
    """The dataset rows the weighting reads (a seeded sample of `num_examples`), or None for a stream (its first
    `num_examples` rows, counted while they are read)."""
    if not is_indexable(dataset):
        if iter(dataset) is dataset:
            raise TypeError(
                f"The weighting reads its data twice (top-K pass, then cosine pass), but a {type(dataset).__name__} "
                f"can be read only once. Pass a datasets.Dataset, a datasets.IterableDataset or a list of rows."
            )
        return None
    if args.num_examples is not None and args.num_examples < len(dataset):
        generator = torch.Generator().manual_seed(args.seed)
        return sorted(torch.randperm(len(dataset), generator=generator)[: args.num_examples].tolist())
    return list(range(len(dataset)))


@dataclass
class _TopKPass:
    """What the first pass leaves for the second and for the record."""

    top: Any  # FeatureTopK or ModalityTopK
    sample: list[int]  # the rows read
    stream_index: dict[int, int]  # row -> its index in the weighting stream
    hidden_sum: torch.Tensor
    num_tokens: int
    max_text: torch.Tensor  # each feature's largest activation on text positions
    max_image: torch.Tensor
    positives: PositiveSample | None


@torch.no_grad()
def _top_k_pass(sae, reader: LayerReader, dataset: Any, args: WeightingArguments,
                sample: list[int] | None, state: Any = None) -> _TopKPass:
    """Pass 1 (stage 1 of Algorithm 1): every feature's top positions, the mean hidden state, the per-modality
    maxima (delta must lie below both for a feature to co-occur) and, to calibrate delta, a sample of activations.
    With a distributed `state`, this process reads its share of the sample and the results of all are merged."""
    device = sae.W_enc.device
    top = (FeatureTopK(sae.config.d_sae, args.top_k, device) if args.top_k_pool == "pooled"
           else ModalityTopK(sae.config.d_sae, args.per_modality, device))
    result = _TopKPass(top, [], _Identity(), torch.zeros(sae.config.d_in, dtype=torch.float64, device=device), 0,
                       torch.zeros(sae.config.d_sae, device=device), torch.zeros(sae.config.d_sae, device=device),
                       PositiveSample(seed=args.seed + (state.process_index if state is not None else 0))
                       if args.threshold_quantile is not None else None)
    if sample is None:
        first_rows = range(args.num_examples) if args.num_examples is not None else None
        if state is not None:
            first_rows = batch_share(first_rows, args.batch_size, state)
        batches = _batches(reader, dataset, args, first_rows)
        total = math.ceil(len(first_rows) / args.batch_size) if first_rows is not None else None
    else:
        mine = batch_share(sample, args.batch_size, state)
        batches = _batches(reader, dataset, args, mine)
        total = math.ceil(len(mine) / args.batch_size)
        result.sample, result.stream_index = sample, {example: i for i, example in enumerate(sample)}
    for prepared in progress_bar(batches, desc="Feature weights: top-K pass", total=total, unit="batch",
                                 disable=state is not None and not state.is_local_main_process):
        chunk = prepared.rows
        if sample is None:
            result.sample.extend(chunk)
        acts = reader.read_inputs(prepared.check())
        counted = acts.scored_mask(args.special_as_text)
        hidden = acts.hidden_states[counted]  # on the SAE-V's device: reader.check_sae saw to it
        positions = _stream_positions([result.stream_index[i] for i in chunk], counted).to(device)
        is_image = acts.image_mask[counted].to(device)
        result.hidden_sum += hidden.double().sum(0)
        result.num_tokens += hidden.shape[0]
        for start in range(0, hidden.shape[0], args.token_chunk):
            part = slice(start, start + args.token_chunk)
            with sae_matmul_precision(device, args.allow_tf32):
                z = sae.encode(hidden[part])
            top.update(z, positions[part], is_image[part])
            image_part = is_image[part]
            if image_part.any():
                result.max_image = torch.maximum(result.max_image, z[image_part].float().amax(0))
            if (~image_part).any():
                result.max_text = torch.maximum(result.max_text, z[~image_part].float().amax(0))
            if result.positives is not None:
                result.positives.update(z)
    if state is not None:
        _merge_across_processes(result, sample is None)
    if result.num_tokens == 0:
        raise ValueError("The dataset yielded no tokens to weight features on; check the prompt and image columns.")
    return result


@torch.no_grad()
def _cosine_pass(cosines: CosineAccumulator, reader: LayerReader, dataset: Any, args: WeightingArguments,
                 first: _TopKPass, state: Any = None) -> None:
    """Pass 2 (stage 2): re-read only the rows that hold a chosen position, and add their unit hidden states (with a
    distributed `state`: this process's share of those rows' batches, then every process's sums)."""
    needed = batch_share([first.sample[i] for i in cosines.needed_examples()], args.batch_size, state)
    device = cosines.text_sum.device
    for prepared in progress_bar(_batches(reader, dataset, args, needed), desc="Feature weights: cosine pass",
                                 total=math.ceil(len(needed) / args.batch_size), unit="batch",
                                 disable=state is not None and not state.is_local_main_process):
        chunk = prepared.rows
        acts = reader.read_inputs(prepared.check())
        counted = acts.scored_mask(args.special_as_text)
        positions = _stream_positions([first.stream_index[i] for i in chunk], counted).to(device)
        cosines.update(acts.hidden_states[counted].to(device), positions)
    if state is not None:
        cosines.merge_across_processes()


@torch.no_grad()
def _merge_across_processes(result: _TopKPass, streamed: bool) -> None:
    """Turn this process's pass-1 results into those of the whole sample, the same on every process."""

    result.top = _gathered_top(result.top, gather)
    dist.all_reduce(result.hidden_sum)
    num_tokens = torch.tensor([result.num_tokens], dtype=torch.long, device=result.hidden_sum.device)
    dist.all_reduce(num_tokens)
    result.num_tokens = int(num_tokens)
    dist.all_reduce(result.max_text, op=dist.ReduceOp.MAX)
    dist.all_reduce(result.max_image, op=dist.ReduceOp.MAX)
    if result.positives is not None:
        result.positives.merge(gather_object([(result.positives.values, result.positives.keys,
                                               result.positives.seen)]))
    if streamed:  # the rows each process read, in rank order: the stream's order
        result.sample = gather_object(result.sample)


def _gathered_top(top: Any, gather: Any) -> Any:
    """The top positions over every process's shard: [`FeatureTopK.merge`] of every process's running top (the
    same selection one process makes: a shard's top K holds every member of the global top K from that shard)."""
    if isinstance(top, ModalityTopK):
        top.text, top.image = _gathered_top(top.text, gather), _gathered_top(top.image, gather)
        return top
    merged = FeatureTopK(top.values.shape[1], top.top_k, top.values.device)
    merged.merge(gather(top.values), gather(top.positions), gather(top.is_image.to(torch.uint8)).bool())
    return merged


def _weights_info(args: WeightingArguments, reader: LayerReader, dataset: Any, first: _TopKPass,
                  text_count: torch.Tensor, image_count: torch.Tensor, weighted: torch.Tensor) -> dict[str, Any]:
    """The weights' provenance and summary, stored in `config.feature_weights_info` (and shown on the model card)."""
    firing = (first.top.values > 0).any(0)
    single_modal = firing & ((text_count == 0) | (image_count == 0))
    info = {
        **asdict(args),  # provenance only
        "num_examples": len(first.sample),
        "num_tokens": first.num_tokens,
        "num_weighted_features": int(weighted.sum()),
        "num_single_modal_features": int(single_modal.sum()),
        "num_silent_features": int((~firing).sum()),
        **_dataset_record(reader, dataset),
        "prompt_format": asdict(reader.prompt_format),
    }
    bounds = torch.minimum(first.max_text, first.max_image)  # feature f can co-occur only under a delta below bounds[f]
    bimodal = bounds[bounds > 0]
    info["cooccurrence_bound_max"] = float(bounds.max())
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    info["cooccurrence_bound_percentiles"] = (
        [round(v, 6) for v in torch.quantile(bimodal.double().cpu(), levels).tolist()] if len(bimodal) else []
    )
    info["num_bimodal_features"] = int(len(bimodal))
    return info


def _dataset_record(reader: LayerReader | CacheReader, dataset: Any) -> dict[str, Any]:
    """The weighting data's name and `datasets` fingerprint: the dataset's own, or those the activation cache
    recorded of the dataset it was made from."""
    if isinstance(reader, CacheReader):
        manifest = reader.cache.manifest
        return {"dataset": manifest.get("dataset_name"), "dataset_fingerprint": manifest.get("dataset_fingerprint")}
    return {"dataset": getattr(getattr(dataset, "info", None), "dataset_name", None),
            "dataset_fingerprint": getattr(dataset, "_fingerprint", None)}


class _Identity(dict):
    """Stream position of a streamed example: its index in the stream."""

    def __missing__(self, key: int) -> int:
        return key


def run_weights(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
                prompt_format: PromptFormat, args: WeightingArguments, output: OutputArguments) -> SAEV:
    """
    `saev weights`: load the SAE-V, the MLLM and the dataset (or an activation cache of them) that the arguments name,
    compute the feature weights (and, with `args.threshold_quantile`, calibrate delta) and save the SAE-V with them to
    `output.output_dir`. Returns the SAE-V.

    Under `torchrun` / `accelerate launch`, every process computes its share and ends with the same SAE-V; the main
    process alone writes it.
    """
    if sae_args.cooccurrence_threshold is not None and args.threshold_quantile is not None:
        raise ValueError(
            f"Give either --cooccurrence_threshold {sae_args.cooccurrence_threshold} (set delta) or "
            f"--threshold_quantile {args.threshold_quantile} (calibrate it on the data), not both."
        )
    data_args.check_source(model_args, "saev weights", cache_allowed=True)
    output.prepare("saev weights", cpu=model_args.device == "cpu")
    if data_args.activation_cache is not None:  # the cache's reader and rows stand in for the MLLM and the dataset
        cache = ActivationCache(data_args.activation_cache)
        sae = sae_args.load().to(choose_device(model_args.device))
        reader, dataset = CacheReader(cache, sae.W_enc.device), cached_rows(cache)
    else:
        sae, model, processor, dataset = load_sources(sae_args, model_args, data_args, prompt_format.image_column)
        reader = LayerReader(model, processor, layer=sae.config.hook_layer, prompt_format=prompt_format)
    compute_feature_weights(sae, reader, dataset, args)
    state = distributed_state()
    if state is None or state.is_main_process:
        sae.save_pretrained(output.output_dir)
        data_args.write_fetch_report(output.output_dir)
        mark_output_complete(output.output_dir)
    if state is not None:
        state.wait_for_everyone()  # the SAE-V is on disk for every process once it returns
    return sae
