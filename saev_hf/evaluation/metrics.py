"""Evaluating an SAE-V: sparsity, reconstruction, feature health, and the base model's loss with the SAE spliced in.

[`evaluate_saev`] reads decoder layer L of a model over a dataset and reports, for all real tokens and separately for
image and text tokens (text = every real non-image position, special/template tokens included; padding never counts):

- `l0`: mean number of active features (z > 0) per token;
- `mse`: mean over tokens of `||x - x_hat||^2` (summed over d_in), in the units of the model's hidden states;
- `explained_variance`: `1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2`, the mean over the split's tokens;
- `l2_ratio` (SAEBench): the mean over tokens of `||x_hat|| / ||x||` (below 1: the SAE shrinks its inputs);
- `feature_density` (SAEBench): a histogram of the features' log10 firing frequency over the split's tokens (and the
  dead ones), plotted by `saev eval --output_dir` as `feature_density.png`;
- next-token cross-entropy of the model when layer L's output is left alone (`ce_clean`), replaced at every position
  by the SAE's reconstruction (`ce_sae`) or by zeros (`ce_zero`), and the paper's
  `ce_loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)` (1: the SAE loses nothing; 0: as bad as zeros);
- `kl_sae`, `kl_zero` (SAEBench): the mean KL divergence of the next-token distribution with the reconstruction (with
  zeros) spliced in from the clean one, and `kl_score = 1 - kl_sae / kl_zero`.

Which positions a cross-entropy belongs to: the loss at position t predicts token t + 1 and is split by the modality
of that predicted token. Text-token CE is the main figure. In MLLMs the image positions hold placeholder tokens (or,
for Chameleon, placeholders the model swaps for VQ codes): predicting them is not what the model is for, so the
image split's CE is reported for completeness only, and the `all` split mixes both.

Feature health over the evaluated tokens: `dead_features` never fire; `dense_features` fire on more than
`dense_threshold` (default 0.1, i.e. 10%) of the tokens.

The same function evaluates transfer: an SAE-V trained on an MLLM applied to a text-only causal LM of the same hidden
size (the paper's finding: SAE-V features transfer to the base LLM). Pass the text model, its tokenizer and text data;
the image split is then empty.

With `probe_label_column`, the evaluation also runs SAEBench's sparse probing on the same pass over the rows: how well
the top-k SAE-V features, mean-pooled per example and per split, predict a dataset column of class labels, beside a
probe on the pooled residual stream (`sparse_probing` in the result; see `saev_hf.evaluation.probing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..activations.reader import LayerReader, image_token_id_of, layer_field, text_and_image
from ..arguments import DataArguments, ModelArguments
from ..cache.reader import CacheReader, cached_rows
from ..data.batching import row_batches
from ..data.prompts import PromptFormat
from ..model.modeling import SAEV
from ..runtime.progress import progress_bar
from .probing import (
    DEFAULT_PROBE_K,
    PooledActivations,
    batch_labels,
    check_label_column,
    check_probe_options,
    require_scikit_learn,
    sparse_probing,
)

SPLITS = ("all", "text", "image")
CE_KINDS = ("clean", "sae", "zero")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class SAEVEvaluationArguments:
    """
    What `saev eval` measures of an SAE-V on an MLLM's layer-L residual stream: L0, MSE, explained variance,
    dead/dense features and CE-loss-recovered, for all, text and image tokens, over how many rows; and, with a label
    column, sparse probing (`probe_*`). (The SAE-V, the model and the data are [`SAEArguments`], [`ModelArguments`] and
    [`DataArguments`]; a text-only causal LM and text data evaluate transfer.)
    """

    layer: int | None = layer_field(default=None)
    num_examples: int | None = field(default=256, metadata=_help("Rows to evaluate (the first ones); None: all."))
    batch_size: int = field(default=8, metadata=_help("Rows per forward pass."))
    dense_threshold: float = field(
        default=0.1, metadata=_help("A feature firing on more than this fraction of tokens counts as dense.")
    )
    compute_ce_loss: bool = field(
        default=True, metadata=_help("Run the three full forwards needed for CE-loss-recovered (else L0/MSE only; "
                                     "refused on an activation cache, which cannot run them).")
    )
    probe_label_column: str | None = field(
        default=None, metadata=_help(
            "A dataset column of class labels (strings, integers or booleans; two classes or more): also run "
            "SAEBench's sparse probing on the evaluated rows, per split (all, text, image positions): one balanced "
            "binary task per class (the class against the rest), a logistic regression on the top-k SAE-V features "
            "by the difference of class means, pooled per row, beside one on the pooled residual stream; written "
            "under 'sparse_probing'. Needs scikit-learn: pip install \"saev-hf[probing]\".")
    )
    probe_k: list[int] = field(
        default_factory=lambda: list(DEFAULT_PROBE_K),
        metadata=_help("Numbers of SAE-V features a sparse probe keeps (each capped at d_sae).")
    )
    probe_test_fraction: float = field(
        default=0.2, metadata=_help("Share of each class's rows held out to test the sparse probes on.")
    )
    probe_seed: int = field(
        default=0, metadata=_help("Seed of the held-out rows and of the negatives drawn for each probing task.")
    )

    def __post_init__(self) -> None:
        bad_layer = isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        if self.layer is not None and bad_layer:
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer or None (the SAE-V's hook_layer).")
        if self.num_examples is not None and self.num_examples <= 0:
            raise ValueError(f"num_examples={self.num_examples} must be positive, or None for every row.")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be positive.")
        if not 0 <= self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold={self.dense_threshold} must be a fraction in [0, 1].")
        check_probe_options(self.probe_k, self.probe_test_fraction)

    def check_source(self, model: ModelArguments, data: DataArguments) -> None:
        """Refuse what cannot be evaluated on the data named: the MLLM and the dataset, or an activation cache
        without CE (which needs the MLLM's forward) and without sparse probing (the cache holds no labels); and
        sparse probing without scikit-learn."""
        data.check_source(model, "saev eval", cache_allowed=True)
        if data.activation_cache is not None and self.compute_ce_loss:
            raise ValueError(f"CE-loss-recovered runs the MLLM with the SAE-V spliced in, which the activation cache "
                             f"{data.activation_cache!r} cannot do. Pass --compute_ce_loss False, or evaluate on the "
                             f"model.")
        if self.probe_label_column is not None:
            if data.activation_cache is not None:
                raise ValueError(f"Sparse probing reads each row's class from the dataset column "
                                 f"{self.probe_label_column!r}, and the activation cache {data.activation_cache!r} "
                                 f"holds no labels. Evaluate on the model and the dataset, or leave out "
                                 f"--probe_label_column.")
            try:
                require_scikit_learn()
            except ImportError as error:  # a usage error, reported before the model loads
                raise ValueError(str(error)) from error


class _Totals:
    """Running sums for one split, in float64."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.tokens = 0
        self.active = 0.0
        self.squared_error = 0.0
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.squared_norm = 0.0
        self.norm_ratio = 0.0
        self.ce = {kind: 0.0 for kind in CE_KINDS}
        self.kl = {kind: 0.0 for kind in ("sae", "zero")}
        self.ce_tokens = 0
        self.fired: torch.Tensor | None = None  # per feature: this split's tokens where it fired

    def add_tokens(self, x: torch.Tensor, x_hat: torch.Tensor, feature_acts: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.tokens += len(x)
        self.active += float((feature_acts > 0).sum())
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.sum += x.sum(0)
        self.squared_norm += float(x.pow(2).sum())
        norms = x.norm(dim=-1)
        self.norm_ratio += float((x_hat.norm(dim=-1) / norms.clamp_min(torch.finfo(norms.dtype).tiny)).sum())
        fired = (feature_acts > 0).sum(0)
        self.fired = fired if self.fired is None else self.fired + fired

    def metrics(self, compute_ce: bool) -> dict[str, Any]:
        n = self.tokens
        out: dict[str, Any] = {"tokens": n, "l0": None, "mse": None, "explained_variance": None, "l2_ratio": None}
        if n:
            total_variance = self.squared_norm - float(self.sum.pow(2).sum()) / n
            out["l0"] = self.active / n
            out["mse"] = self.squared_error / n
            out["explained_variance"] = 1 - self.squared_error / total_variance if total_variance > 0 else None
            out["l2_ratio"] = self.norm_ratio / n
        out["feature_density"] = density_histogram(self.fired, n)
        if compute_ce:
            out["ce_tokens"] = self.ce_tokens
            for kind in CE_KINDS:
                out[f"ce_{kind}"] = self.ce[kind] / self.ce_tokens if self.ce_tokens else None
            out["ce_loss_recovered"] = None
            if self.ce_tokens:
                gap = out["ce_zero"] - out["ce_clean"]
                out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else None
            for kind in ("sae", "zero"):
                out[f"kl_{kind}"] = self.kl[kind] / self.ce_tokens if self.ce_tokens else None
            out["kl_score"] = (1 - out["kl_sae"] / out["kl_zero"]) if out["kl_zero"] else None
        return out


DENSITY_BINS = tuple(range(-8, 1))
"""Edges of the feature density histogram: log10 of the share of tokens a feature fires on, -8 to 0 (SAEBench's
plot); features that never fire are counted apart."""


def density_histogram(fired: torch.Tensor | None, tokens: int) -> dict[str, Any] | None:
    """Each feature's firing frequency over `tokens` as a histogram of log10 frequency: `counts[i]` features in
    [`edges[i]`, `edges[i + 1]`), and `dead` that never fired (None without tokens)."""
    if fired is None or not tokens:
        return None
    frequency = fired.double().cpu() / tokens
    alive = frequency[frequency > 0].log10().clamp(min=DENSITY_BINS[0], max=DENSITY_BINS[-1] - 1e-9)
    counts = torch.histc(alive, bins=len(DENSITY_BINS) - 1, min=DENSITY_BINS[0], max=DENSITY_BINS[-1])
    return {"edges": list(DENSITY_BINS), "counts": [int(c) for c in counts], "dead": int((frequency == 0).sum())}


def _replace_output(replacement: torch.Tensor | None, captured: list[torch.Tensor]):
    """A forward hook on a decoder layer that records its output and, with a replacement, returns it instead."""

    def hook(module: nn.Module, args: Any, output: Any):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(hidden)
        if replacement is None:
            return None
        new = replacement.to(hidden.dtype)
        # Decoder layers return either the hidden states or a tuple starting with them; keep the same form.
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    return hook


def _logits(model: nn.Module, layer: nn.Module, inputs: dict[str, Any], replacement: torch.Tensor | None):
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(_replace_output(replacement, captured))
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"Decoder layer ran {len(captured)} times in one forward of {type(model).__name__}; expected once. "
            f"Pass the ModuleList the model's forward really runs (LayerReader(layers=...))."
        )
    return logits, captured[0]


@torch.no_grad()
def evaluate_saev(
    sae: SAEV,
    model: nn.Module | None = None,
    processor: Any = None,
    dataset: Any = None,
    *,
    layer: int | None = None,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 8,
    num_examples: int | None = None,
    dense_threshold: float = 0.1,
    compute_ce_loss: bool = True,
    reader: LayerReader | None = None,
    probe_label_column: str | None = None,
    probe_k: list[int] | tuple[int, ...] = DEFAULT_PROBE_K,
    probe_test_fraction: float = 0.2,
    probe_seed: int = 0,
) -> dict[str, Any]:
    """
    Evaluate `sae` on `model`'s decoder layer `layer` over `dataset` (see the module docstring for the metrics).

    Args:
        sae ([`SAEV`]): the SAE-V.
        model: an image-text-to-text model, or a text-only causal LM (transfer).
        processor: its processor or tokenizer.
        dataset (`datasets.Dataset`, `IterableDataset` or list of row dicts): the rows, in `prompt_format`.
        layer (`int`, *optional*): decoder layer; default `sae.config.hook_layer`.
        prompt_format ([`PromptFormat`], *optional*): columns; default the reader's (`images`/`prompt`). For a
            text-only model the image column is ignored.
        batch_size (`int`): rows per forward. num_examples (`int`, *optional*): evaluate the first rows only.
        dense_threshold (`float`): firing frequency above which a feature is dense.
        compute_ce_loss (`bool`): whether to compute the CE metrics (three full forwards per batch).
        reader ([`LayerReader`] or [`saev_hf.cache.CacheReader`], *optional*): a ready reader (e.g. with `layers=`
            for an unusual model), or a reader of an activation cache: the reconstruction metrics are then computed
            from the cache, without the MLLM (`model`, `processor` and `dataset` not needed; `dataset` defaults to
            the cache's rows), equal to reading the MLLM. CE needs the MLLM: pass `compute_ce_loss=False`.
        probe_label_column (`str`, *optional*): a column of `dataset` holding each row's class: also run sparse
            probing (see [`~saev_hf.evaluation.probing.sparse_probing`]) on the evaluated rows. Needs scikit-learn.
        probe_k (`Sequence[int]`): numbers of features a sparse probe keeps (each capped at d_sae).
        probe_test_fraction (`float`): share of each class's rows held out to test the probes on.
        probe_seed (`int`): seed of the held-out rows and of each task's negatives.

    Returns:
        `dict` with `model`, `layer`, `num_examples`, `d_sae`, `dead_features`, `dense_features`,
        `dense_threshold`, and per split (`"all"`, `"text"`, `"image"`) a dict with `tokens`, `l0`, `mse`,
        `explained_variance` and, with `compute_ce_loss`, `ce_tokens`, `ce_clean`, `ce_sae`, `ce_zero`,
        `ce_loss_recovered`; with `probe_label_column`, `sparse_probing` too. A metric with no token to average over
        is None. Print it with [`format_metrics_table`].

    Raises:
        ImportError: for sparse probing without scikit-learn (`pip install "saev-hf[probing]"`).
        ValueError, [`RowError`]: for a label column that is missing, null in a row, not a class, of one class, or
            with a class of fewer than 2 rows.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive number of rows per forward, e.g. 8.")
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                     or num_examples <= 0):
        raise ValueError(f"num_examples={num_examples!r} must be a positive number of rows, or None for all of them.")
    if layer is None:
        layer = sae.config.hook_layer
        if layer is None:
            raise ValueError("The SAE-V records no hook_layer: pass layer= (the decoder layer it reads).")
    pooled = None
    if probe_label_column is not None:
        require_scikit_learn()
        check_probe_options(probe_k, probe_test_fraction)
    reader, dataset = _reader_and_rows(model, processor, dataset, layer, prompt_format, reader, compute_ce_loss)
    reader.check_sae(sae)
    if probe_label_column is not None:
        check_label_column(dataset, probe_label_column)
        pooled = PooledActivations(probe_label_column)
    batches = _BatchEvaluator(sae, model, reader, layer, compute_ce_loss, pooled)
    totals, fired, examples = batches.totals, batches.fired, 0
    num_rows = len(dataset) if hasattr(dataset, "__len__") else None  # an IterableDataset has no length
    if num_examples is not None:
        num_rows = num_examples if num_rows is None else min(num_rows, num_examples)
    with progress_bar(total=None if num_rows is None else math.ceil(num_rows / batch_size), desc="Evaluating SAE-V",
                      unit="batch") as progress:
        for chunk, rows in row_batches(dataset, batch_size, None if num_examples is None else range(num_rows)):
            batches.add(rows, chunk)
            examples += len(chunk)
            progress.update(1)
    if examples == 0 or totals["all"].tokens == 0:
        raise ValueError("The evaluation data gave no token: check that the dataset split has rows and the columns "
                         "named in the prompt format hold data.")

    frequency = fired.double() / totals["all"].tokens
    if isinstance(reader, CacheReader):
        model_name = reader.cache.manifest["model_name_or_path"]
    else:
        model_name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    result: dict[str, Any] = {
        "model": model_name,
        "layer": layer,
        "num_examples": examples,
        "d_sae": sae.config.d_sae,
        "dead_features": int((fired == 0).sum()),
        "dense_features": int((frequency > dense_threshold).sum()),
        "dense_threshold": dense_threshold,
    }
    for split in SPLITS:
        result[split] = totals[split].metrics(compute_ce_loss)
    if pooled is not None:
        result["sparse_probing"] = sparse_probing(pooled, probe_k, probe_test_fraction, probe_seed)
    return result


def _reader_and_rows(model, processor, dataset, layer: int, prompt_format: PromptFormat | None,
                     reader: LayerReader | CacheReader | None, compute_ce_loss: bool):
    """The reader the evaluation reads layer `layer` with and the rows it reads: those given, the rows of an
    activation cache (which cannot serve CE), or a [`LayerReader`] of `model` (text only for a text-only model)."""
    if isinstance(reader, CacheReader):
        _check_cache_serves(reader, layer, compute_ce_loss)
        return reader, cached_rows(reader.cache) if dataset is None else dataset
    if reader is not None:
        return reader, dataset
    if model is None or processor is None or dataset is None:
        raise ValueError("Pass the model, its processor and the dataset, or reader=CacheReader(ActivationCache("
                         "path)) to evaluate on an activation cache.")
    if prompt_format is not None and prompt_format.image_column and image_token_id_of(model, processor) is None:
        # A text-only model reads text only (transfer of an SAE-V to the base LLM).
        prompt_format = replace(prompt_format, image_column=None)
    return LayerReader(model, processor, layer=layer, prompt_format=prompt_format), dataset


class _BatchEvaluator:
    """Adds batches of rows to the running totals of every split: reconstruction metrics, firing counts and, with
    `compute_ce_loss`, the three cross-entropies (clean, SAE-V spliced in, zero-ablated); with `pooled`, each row's
    label and its pooled activations for sparse probing."""

    def __init__(self, sae: SAEV, model: nn.Module | None, reader: LayerReader | CacheReader, layer: int,
                 compute_ce_loss: bool, pooled: PooledActivations | None = None) -> None:
        self.sae, self.model, self.reader, self.layer = sae, model, reader, layer
        self.compute_ce_loss = compute_ce_loss
        self.pooled = pooled
        self._labels: list[Any] | None = None
        self._indices: list[int] = []
        self.device = reader.device if isinstance(reader, CacheReader) else next(model.parameters()).device
        self.sae_device = next(sae.parameters()).device
        self.totals = {split: _Totals(sae.config.d_in, self.sae_device) for split in SPLITS}
        self.fired = torch.zeros(sae.config.d_sae, dtype=torch.long, device=self.sae_device)

    def add(self, rows: Any, indices: list[int]) -> None:
        """Read `rows` (dataset rows `indices`) and add them to the totals; from a cache, its rows `indices`."""
        if self.pooled is not None:  # before the forward: a bad label fails at once
            self._labels, self._indices = batch_labels(rows, self.pooled.label_column, indices), indices
        if isinstance(self.reader, CacheReader):
            acts = self.reader.read({"row": indices})
            self._add_reconstruction(acts.hidden_states, acts.modality)
            return
        inputs = self.reader.prepare(rows, first_row=indices[0])
        inputs = {
            name: (value.to(self.device, self.model.dtype) if value.is_floating_point() else value.to(self.device))
            if isinstance(value, torch.Tensor)
            else value
            for name, value in inputs.items()
        }
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        modality = self.reader.modality(input_ids, attention_mask)
        clean_logits = None
        if self.compute_ce_loss:
            clean_logits, hidden = _logits(self.model, self.reader.layers[self.layer], inputs, None)
        else:
            hidden = self.reader.read_inputs(inputs).hidden_states
        reconstruction = self._add_reconstruction(hidden, modality)
        if clean_logits is not None:
            self._add_cross_entropies(inputs, hidden, modality, clean_logits, reconstruction)

    def _add_reconstruction(self, hidden: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        feature_acts = self.sae.encode(hidden.to(self.sae_device))
        reconstruction = self.sae.decode(feature_acts)
        masks = _split_masks(modality.to(self.sae_device))
        x = hidden.to(self.sae_device, torch.float32)
        for split, mask in masks.items():
            self.totals[split].add_tokens(x[mask], reconstruction[mask], feature_acts[mask])
        self.fired.add_((feature_acts[masks["all"]] > 0).sum(0))
        if self.pooled is not None:
            self.pooled.add(self._labels, self._indices, x, feature_acts, masks)
        return reconstruction

    def _add_cross_entropies(self, inputs: dict[str, Any], hidden: torch.Tensor, modality: torch.Tensor,
                             clean_logits: torch.Tensor, reconstruction: torch.Tensor) -> None:
        layer = self.reader.layers[self.layer]
        sae_logits, _ = _logits(self.model, layer, inputs, reconstruction.to(self.device))
        zero_logits, _ = _logits(self.model, layer, inputs, torch.zeros_like(hidden))
        # Position t predicts token t + 1; it counts when that token is real (right padding: then t is real too).
        targets = inputs["input_ids"][:, 1:]
        ce_masks = _split_masks(modality[:, 1:])
        for kind, logits in (("clean", clean_logits), ("sae", sae_logits), ("zero", zero_logits)):
            losses = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            for split, mask in ce_masks.items():
                self.totals[split].ce[kind] += float(losses[mask].double().sum())
        clean = torch.log_softmax(clean_logits[:, :-1].float(), dim=-1)
        for kind, logits in (("sae", sae_logits), ("zero", zero_logits)):
            # KL(clean || spliced) of the next-token distributions, per position (SAEBench's core metric)
            divergence = F.kl_div(torch.log_softmax(logits[:, :-1].float(), dim=-1), clean, log_target=True,
                                  reduction="none").sum(-1)
            for split, mask in ce_masks.items():
                self.totals[split].kl[kind] += float(divergence[mask].double().sum())
        for split, mask in ce_masks.items():
            self.totals[split].ce_tokens += int(mask.sum())


def _check_cache_serves(reader: CacheReader, layer: int, compute_ce_loss: bool) -> None:
    """Refuse an evaluation that an activation cache cannot serve: CE (it needs the MLLM's forward), another layer,
    or the splits without the special tokens (they count as text in `all` and `text`)."""
    where = f"the activation cache {str(reader.cache.path)!r}"
    if compute_ce_loss:
        raise ValueError(f"CE-loss-recovered runs the MLLM with the SAE-V spliced in, which {where} cannot do. Pass "
                         f"compute_ce_loss=False (--compute_ce_loss False), or evaluate on the MLLM.")
    if layer != reader.layer:
        raise ValueError(f"layer={layer}, but {where} holds layer {reader.layer}. Evaluate at layer {reader.layer}, "
                         f"or cache layer {layer}.")
    if not reader.include_special_tokens:
        raise ValueError(f"{where} was made without the special tokens, which the evaluation counts as text. Make it "
                         f"with include_special_tokens=True (the default of `saev cache`).")


def _split_masks(modality: torch.Tensor) -> dict[str, torch.Tensor]:
    """The positions of each split: `"all"` real positions, `"image"` ones, `"text"` ones (special tokens count as
    text: every real position is in one of the two)."""
    text, image = text_and_image(modality, special_as_text=True)
    return {"all": text | image, "image": image, "text": text}
