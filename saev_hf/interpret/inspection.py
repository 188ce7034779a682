"""Inspecting an SAE-V: what each feature fires on, and why each example scored what it did.

For a feature f, [`inspect_saev`] finds its top-activating examples (ranked by the feature's largest activation over
the example's positions), counts where it fires (z_f > 0 at image, text and special positions: its modality profile),
and keeps what a page needs to show them: the tokens with f's activation at each, and f's activation over the image
patches (through [`saev_hf.patches.PatchLocator`]).

For an example x, [`explain_rows`] recomputes exactly what [`SAEVScorer`] computes: the co-occurring features
C(x) = {f : z_f > delta at some text position} & {f : z_f > delta at some image position}, and the cosine score
sum_{f in C(x)} w_f. It lists the members of C(x) with their weights (their contributions, which add up to the score),
sorted by |w_f|, so a user sees which features made the score and why a low-scored example was dropped.

```python
reader = LayerReader(model, processor, layer=sae.config.hook_layer)
inspection = inspect_saev(sae, reader, dataset, InspectionArguments(num_examples=512, num_explained=20))
inspection.explanations[17].contributions[:5]   # the features behind row 17's score
write_feature_browser(inspection, "saev-report")  # static HTML pages (see saev_hf.interpret.feature_browser)
```

Memory stays bounded whatever the number of rows scanned. Pass 1 streams the rows and keeps, per feature, running
firing counts and its top-N (example, max activation) pairs: O(N * d_sae). Only then is it known which examples the
pages show, so passes 2 and 3 re-read just those rows (the explained ones, then the top examples of the features
that get pages) to collect their tokens, per-token activations and images, as `compute_feature_weights` re-reads
only the rows its cosine pass needs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..activations.reader import LayerReader, Modality, special_as_text_field
from ..data.pipeline import check_workers, prepared_batches, preprocessing_workers_field
from ..runtime.devices import allow_tf32_field, sae_matmul_precision, token_chunk_field
from ..runtime.progress import progress_bar
from ..scoring.activity import batch_activity
from .explanations import ExampleExplanation, _explain
from .logit_lens import FeatureLogits, feature_logits
from .rows import RowRevisitor, RowView

MODALITY_NAMES = ("image", "text", "special")
_MODALITY_CODES = {"image": Modality.IMAGE, "text": Modality.TEXT, "special": Modality.SPECIAL}


@dataclass
class InspectionArguments:
    """Which rows are scanned and explained, which features get pages, and how many top examples each page shows."""

    features: list[int] | None = field(
        default=None, metadata={"help": "Features to inspect (ids), on top of the default ones chosen below."}
    )
    examples: list[int] | None = field(
        default=None,
        metadata={"help": "Dataset rows whose cosine score to explain. None explains the `num_explained` lowest-scored "
                  "of the scanned rows (the ones a filter drops first)."},
    )
    num_examples: int | None = field(
        default=256,
        metadata={"help": "Rows scanned for top examples and firing counts, from the start of the dataset (shuffle it "
                  "for a sample). None scans them all."},
    )
    top_n: int = field(default=8, metadata={"help": "Top-activating examples shown per feature."})
    num_explained: int = field(
        default=10,
        metadata={"help": "Lowest-scored scanned rows explained when `examples` is not given; 0 explains none (then no "
                  "feature weights are needed)."},
    )
    num_contributors: int = field(
        default=5, metadata={"help": "Top contributors (by |w_f|) of each explained row that get a feature page."}
    )
    num_top_weighted: int = field(
        default=10,
        metadata={"help": "Highest-weighted features that get a page (without feature weights: the features that "
                  "co-occur in the most scanned rows)."},
    )
    logit_lens_top_k: int = field(
        default=10, metadata={"help": "Tokens shown per feature by the logit lens (most promoted, most suppressed); "
                                      "0 shows none."})
    labels: str | None = field(
        default=None, metadata={"help": "A labels.json (`saev label`) of this SAE-V: feature pages show each label and "
                                "its detection score."})
    explorer_url: str | None = field(
        default=None, metadata={"help": "URL of a running explorer (`saev explore`, or its Space) of this SAE-V: "
                                "feature pages link to it."})
    max_features: int = field(
        default=50, metadata={"help": "Most feature pages chosen by default (features asked for are always shown)."}
    )
    special_as_text: bool = special_as_text_field()
    batch_size: int = field(default=8, metadata={"help": "Examples per MLLM forward."})
    token_chunk: int = token_chunk_field()
    allow_tf32: bool = allow_tf32_field()
    preprocessing_workers: int = preprocessing_workers_field()

    def __post_init__(self) -> None:
        for name in ("top_n", "batch_size", "token_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        check_workers(self.preprocessing_workers)
        for name in ("num_explained", "num_contributors", "num_top_weighted", "max_features"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more.")
        if self.num_examples is not None and self.num_examples <= 0:
            raise ValueError(f"num_examples={self.num_examples} must be positive, or None to scan the whole dataset.")

    @property
    def wants_explanations(self) -> bool:
        """Whether any row is to be explained (which needs the SAE-V's feature weights)."""
        return bool(self.examples) or (self.examples is None and self.num_explained > 0)


@dataclass
class TopExample:
    """
    One of a feature's top-activating examples.

    Args:
        row (`int`): the dataset row.
        activation (`float`): the feature's largest activation over the row's positions (what ranks the examples).
        token_activations (`torch.Tensor` of shape `(tokens,)`): the feature's activation at each of the row's
            tokens (aligned with [`RowView.tokens`]).
        patch_activations (`list[torch.Tensor]`, *optional*): per image, the activation on its base patch grid
            `(rows, cols)`; None when the model has no known patch layout.
    """

    row: int
    activation: float
    token_activations: torch.Tensor
    patch_activations: list[torch.Tensor] | None = None


@dataclass
class FeatureSummary:
    """
    What was found about one feature over the scanned rows.

    Args:
        feature (`int`): its index.
        weight (`float`): its cross-modal weight w_f; NaN when it has none (single-modal or too few of a modality).
        firing_counts (`dict[str, int]`): positions where z_f > 0, by modality (`image`, `text`, `special`).
        examples_fired (`int`): scanned rows where it fires at some position.
        examples_cooccurring (`int`): scanned rows where it is in C(x) (z_f > delta on both text and image).
        top_examples (`list[TopExample]`): its top-activating rows, highest first.
        selected_because (`str`): why it has a page.
        logit_lens ([`FeatureLogits`], *optional*): the tokens its decoder direction promotes and suppresses most.
    """

    feature: int
    weight: float
    firing_counts: dict[str, int]
    examples_fired: int
    examples_cooccurring: int
    top_examples: list[TopExample] = field(default_factory=list)
    selected_because: str = ""
    logit_lens: FeatureLogits | None = None

    @property
    def modality_profile(self) -> dict[str, float]:
        """Shares of the feature's firing positions that are image, text and special tokens (0 if it never fires)."""
        total = sum(self.firing_counts.values())
        return {name: (count / total if total else 0.0) for name, count in self.firing_counts.items()}

    @property
    def has_weight(self) -> bool:
        """Whether the feature has a cross-modal weight."""
        return not math.isnan(self.weight)


@dataclass
class Inspection:
    """
    The result of [`inspect_saev`]: feature summaries, example explanations and the rows they show.

    Args:
        features (`dict[int, FeatureSummary]`): the inspected features, in the order they were selected.
        explanations (`dict[int, ExampleExplanation]`): explained rows, lowest cosine score first.
        rows (`dict[int, RowView]`): every row shown (top examples and explained rows).
        scanned_rows (`list[int]`): the rows scanned.
        scores (`dict[str, torch.Tensor]`): per scanned row, `cosine` (NaN without feature weights), `l0` and
            `cooccur_l0`, as the scorer computes them.
        sae_config (`dict`): the SAE-V's configuration.
        num_weighted_features (`int`): features with a cross-modal weight.
        delta (`float`), special_as_text (`bool`): the co-occurrence settings used.
        model_name (`str`), dataset_name (`str`, *optional*): what was read.
    """

    features: dict[int, FeatureSummary]
    explanations: dict[int, ExampleExplanation]
    rows: dict[int, RowView]
    scanned_rows: list[int]
    scores: dict[str, torch.Tensor]
    sae_config: dict[str, Any]
    num_weighted_features: int
    delta: float
    special_as_text: bool
    model_name: str = ""
    dataset_name: str | None = None

    def score_rank(self, row: int) -> int | None:
        """1-based rank of `row`'s cosine score among the scanned rows, lowest first; None if it was not scanned."""
        if row not in self.scanned_rows:
            return None
        scores = self.scores["cosine"]
        return int((scores < scores[self.scanned_rows.index(row)]).sum()) + 1

    def reasons(self, row: int) -> list[str]:
        """Plain-language reasons for `row`'s cosine score, compared with the scanned rows."""
        e = self.explanations[row]
        out = []
        rank = self.score_rank(row)
        if rank is not None:
            out.append(f"Its cosine score {e.cosine_score:.4g} ranks {rank} of {len(self.scanned_rows)} scanned rows "
                       f"(1 = lowest; a filter keeping the top fraction drops the lowest first).")
        typical = statistics.median(self.scores["cooccur_l0"].tolist()) if self.scanned_rows else None
        return out + e.reasons(typical)


class FeatureTopExamples:
    """
    Running top-N examples of every feature, ranked by the feature's largest activation in the example.

    Like [`saev_hf.weighting.top_k.FeatureTopK`] (which keeps top token positions), over examples: `values` (N, d_sae) hold
    per-example maxima (0 = empty slot) and `rows` (N, d_sae) the dataset rows. Memory is O(N * d_sae).
    """

    def __init__(self, d_sae: int, top_n: int, device: torch.device | str = "cpu") -> None:
        self.top_n = top_n
        self.values = torch.zeros(top_n, d_sae, device=device)
        self.rows = torch.full((top_n, d_sae), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, example_max: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge a batch: `example_max` (n, d_sae) the per-example maxima, `rows` (n,) their dataset rows."""
        values = torch.cat([self.values, example_max.to(self.values)], dim=0)
        rows = torch.cat([self.rows, rows.to(self.rows.device)[:, None].expand(-1, values.shape[1])], dim=0)
        self.values, index = values.topk(self.top_n, dim=0)
        self.rows = rows.gather(0, index)

    def of(self, feature: int) -> list[tuple[int, float]]:
        """`(row, activation)` of `feature`'s top examples that fire, highest first."""
        values, rows = self.values[:, feature].tolist(), self.rows[:, feature].tolist()
        return [(row, value) for row, value in zip(rows, values) if value > 0]


def _check_inputs(sae: Any, reader: LayerReader, dataset: Any, args: InspectionArguments) -> None:
    reader.check_sae(sae)
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows: there is nothing to inspect (an inspection of no rows would show "
                         "features without any example). Check the dataset split and any filtering before it.")
    if reader.image_token_id is None:
        raise ValueError(f"{type(reader.model).__name__} has no image token: inspecting an SAE-V needs an image-text "
                         f"model.")
    column = reader.prompt_format.image_column
    names = getattr(dataset, "column_names", None)
    if names is None and len(dataset):
        names = list(dataset[0])
    if column is None or (names is not None and column not in names):
        raise ValueError(
            f"The image column {column!r} is not in the dataset (its columns: {sorted(names or [])}). Name the column "
            f"that holds the images: PromptFormat(image_column=...) on the LayerReader, or --image_column."
        )
    d_sae = sae.config.d_sae
    bad = [f for f in args.features or [] if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Unknown feature id(s) {bad}: this SAE-V has d_sae={d_sae} features, ids 0 to {d_sae - 1}.")
    bad = [r for r in args.examples or [] if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(dataset)]
    if bad:
        raise ValueError(f"Row(s) {bad} to explain are not in the dataset: it has {len(dataset)} rows, 0 to "
                         f"{len(dataset) - 1}.")
    if args.wants_explanations and not bool(sae.has_feature_weight.any()):
        raise ValueError(
            "Explaining cosine scores needs the SAE-V's cross-modal feature weights, which were never computed for "
            "it. Compute them first (saev_hf.weighting.compute_feature_weights, or `saev weights`), or ask for no "
            "explanation (num_explained=0 and no examples; --num_explained 0) to inspect features only."
        )


@torch.no_grad()
def _scan(sae: Any, reader: LayerReader, dataset: Any, rows: list[int], args: InspectionArguments):
    """Pass 1: top examples, firing counts by modality and the scorer's three scores of every scanned row."""
    d_sae, device = sae.config.d_sae, sae.W_enc.device
    top = FeatureTopExamples(d_sae, args.top_n, device)
    counts = torch.zeros(len(MODALITY_NAMES), d_sae, dtype=torch.long, device=device)
    fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    cooccurring = torch.zeros(d_sae, dtype=torch.long, device=device)
    scores: dict[str, list[float]] = {"cosine": [], "l0": [], "cooccur_l0": []}
    batches = prepared_batches(reader, dataset, args.batch_size, rows, workers=args.preprocessing_workers)
    for prepared in progress_bar(batches, desc="Inspection: scanning rows", total=math.ceil(len(rows) / args.batch_size),
                                 unit="batch"):
        chunk = prepared.rows
        acts = reader.read_inputs(prepared.check())
        real = acts.token_mask
        example = torch.arange(len(acts), device=real.device)[:, None].expand_as(real)[real].to(device)
        modality = acts.modality[real].to(device)
        example_max = torch.zeros(len(acts), d_sae, device=device)

        def profile(z: torch.Tensor, part: slice) -> None:
            # beyond the scores: each example's largest activation and where features fire, over every real position
            z = z.float()
            example_max.scatter_reduce_(0, example[part, None].expand_as(z), z, reduce="amax")
            for m, name in enumerate(MODALITY_NAMES):
                counts[m] += (z > 0)[modality[part] == _MODALITY_CODES[name]].sum(0)

        activity = batch_activity(sae, acts.hidden_states[real], modality, example, chunk, args.special_as_text,
                                  args.token_chunk, on_chunk=profile, allow_tf32=args.allow_tf32)
        top.update(example_max, torch.tensor(chunk, dtype=torch.long, device=device))
        fired += (example_max > 0).sum(0)
        cooccurring += activity.cooccurring.sum(0)
        scores["cosine"] += activity.cosine(sae.feature_weights).tolist()
        scores["l0"] += activity.l0.tolist()
        scores["cooccur_l0"] += activity.cooccurring.sum(1).tolist()
    return top, counts.cpu(), fired.cpu(), cooccurring.cpu(), {
        "cosine": torch.tensor(scores["cosine"], dtype=torch.float64),
        "l0": torch.tensor(scores["l0"], dtype=torch.float64),
        "cooccur_l0": torch.tensor(scores["cooccur_l0"], dtype=torch.long),
    }


def explain_rows(sae: Any, reader: LayerReader, dataset: Any, rows: Sequence[int], special_as_text: bool = True,
                 batch_size: int = 8, token_chunk: int = 4096,
                 allow_tf32: bool = True) -> dict[int, ExampleExplanation]:
    """
    Explain the cosine scores of `rows` of `dataset`: the co-occurring features C(x) of each, with their weights.

    The contributions of an explanation add up to the `saev_cosine_score` that [`SAEVScorer`] gives the row (with
    the same `special_as_text`), and `cooccur_l0` and `l0` equal its other two scores.

    Args:
        sae ([`SAEV`]): the SAE-V, with its cross-modal feature weights.
        reader ([`LayerReader`]): reads its layer of the MLLM (its `prompt_format` names the columns).
        dataset: a `datasets.Dataset` or a sequence of row dicts.
        rows: the rows to explain.
        special_as_text (`bool`): count special/template tokens as text, as the scorer does by default.
        allow_tf32 (`bool`): a float32 SAE-V on a GPU may encode with TF32, as the scorer does by default.

    Returns:
        `dict[int, ExampleExplanation]`: by row, in the order given.
    """
    args = InspectionArguments(examples=list(rows), special_as_text=special_as_text, batch_size=batch_size,
                               token_chunk=token_chunk, allow_tf32=allow_tf32)
    _check_inputs(sae, reader, dataset, args)
    found = {row: e for row, e, _ in _explain_rows(sae, RowRevisitor(reader, dataset, batch_size), list(rows), args)}
    return {row: found[row] for row in rows}


def _explain_rows(sae: Any, row_revisitor: RowRevisitor, rows: list[int], args: InspectionArguments):
    for row, hidden, modality, view in row_revisitor.revisit(sorted(set(rows)), "Inspection: explaining rows"):
        yield row, _explain(sae, hidden, modality, row, args.special_as_text, args.token_chunk, args.allow_tf32), view


def _select_features(sae: Any, args: InspectionArguments, explanations: dict[int, ExampleExplanation],
                     cooccurring: torch.Tensor) -> dict[int, str]:
    """Feature -> why it gets a page: asked for, a top contributor of an explained row, or top-weighted."""
    chosen = {f: "asked for" for f in args.features or []}
    budget = len(chosen) + args.max_features

    def add(feature: int, why: str) -> None:
        if feature not in chosen and len(chosen) < budget:
            chosen[feature] = why

    for row, explanation in explanations.items():
        for c in [c for c in explanation.contributions if c.contribution != 0][: args.num_contributors]:
            add(c.feature, f"top contributor to row {row}")
    weights = sae.feature_weights.float().cpu()
    if bool((~weights.isnan()).any()):
        order = weights.nan_to_num(-math.inf).argsort(descending=True, stable=True)
        for f in order[: min(args.num_top_weighted, int((~weights.isnan()).sum()))].tolist():
            add(f, "top-weighted")
    else:
        order = cooccurring.argsort(descending=True, stable=True)
        for f in order[: args.num_top_weighted].tolist():
            if cooccurring[f] > 0:
                add(f, "co-occurs in the most rows")
    return chosen


@torch.no_grad()
def _read_top_examples(sae: Any, features: dict[int, FeatureSummary], top: FeatureTopExamples,
                       row_revisitor: RowRevisitor, args: InspectionArguments) -> None:
    """Pass 3: re-read the top examples of the features with pages and add each, with the feature's activation at
    every token and over the image patches, to its [`FeatureSummary`] (highest activation first)."""
    wanted: dict[int, list[tuple[int, float]]] = {}
    for f in features:
        for row, value in top.of(f):
            wanted.setdefault(row, []).append((f, value))
    for row, hidden, modality, view in row_revisitor.revisit(sorted(wanted), "Inspection: reading top examples"):
        feats = [f for f, _ in wanted[row]]
        with sae_matmul_precision(sae.W_enc.device, args.allow_tf32):  # hidden: on the SAE-V's device (check_sae)
            z = torch.cat([sae.encode(hidden[s : s + args.token_chunk])[:, feats].float().cpu()
                           for s in range(0, hidden.shape[0], args.token_chunk)])
        image_positions = view.modality == Modality.IMAGE
        for column, (f, value) in enumerate(wanted[row]):
            token_acts = z[:, column]
            patches = None
            if view.grids is not None:
                patches = [grid.values(token_acts[image_positions]) for grid in view.grids]
            features[f].top_examples.append(TopExample(row=row, activation=value, token_activations=token_acts,
                                                       patch_activations=patches))
    for summary in features.values():
        summary.top_examples.sort(key=lambda e: (-e.activation, e.row))



@torch.no_grad()
def inspect_saev(sae: Any, reader: LayerReader, dataset: Any, args: InspectionArguments | None = None) -> Inspection:
    """
    Inspect an SAE-V on a dataset: top-activating examples and modality profiles of its features, and explanations
    of examples' cosine scores (render them with [`saev_hf.interpret.feature_browser.write_feature_browser`]).

    Features with pages: `args.features`, the top `num_contributors` contributors of each explained row, and the
    `num_top_weighted` highest-weighted features, at most `max_features` besides those asked for.

    Args:
        sae ([`SAEV`]): the SAE-V, made for `reader`'s model and layer (with feature weights to explain scores).
        reader ([`LayerReader`]): reads the MLLM's layer L from rows; its `prompt_format` names the columns.
        dataset: a `datasets.Dataset` (or any sequence of row dicts) with an image column.
        args ([`InspectionArguments`]): rows scanned and explained, features, top N.

    Returns:
        [`Inspection`]

    Raises:
        ValueError: unknown feature ids or rows (naming the valid range), explanations asked for without feature
            weights, a missing image column, or an SAE-V made for another model or layer.
    """
    args = args or InspectionArguments()
    _check_inputs(sae, reader, dataset, args)
    n = len(dataset) if args.num_examples is None else min(args.num_examples, len(dataset))
    scanned = list(range(n))
    top, counts, fired, cooccurring, scores = _scan(sae, reader, dataset, scanned, args)
    has_weights = bool(sae.has_feature_weight.any())
    if not has_weights:
        scores["cosine"] = torch.full_like(scores["cosine"], math.nan)

    row_revisitor = RowRevisitor(reader, dataset, args.batch_size, args.preprocessing_workers)
    explained_rows = list(args.examples) if args.examples is not None else []
    if args.examples is None and args.num_explained:
        order = sorted(range(n), key=lambda i: (float(scores["cosine"][i]), i))
        explained_rows = [scanned[i] for i in order[: args.num_explained]]
    explanations = {row: e for row, e, _ in _explain_rows(sae, row_revisitor, explained_rows, args)}
    explanations = dict(sorted(explanations.items(), key=lambda item: (item[1].cosine_score, item[0])))

    weights = sae.feature_weights.float().cpu()
    features = {}
    for f, why in _select_features(sae, args, explanations, cooccurring).items():
        features[f] = FeatureSummary(
            feature=f, weight=float(weights[f]),
            firing_counts={name: int(counts[m, f]) for m, name in enumerate(MODALITY_NAMES)},
            examples_fired=int(fired[f]), examples_cooccurring=int(cooccurring[f]), selected_because=why,
        )
    _read_top_examples(sae, features, top, row_revisitor, args)  # pass 3
    if args.logit_lens_top_k and features and reader.model.get_output_embeddings() is not None:
        tokenizer = getattr(reader.processor, "tokenizer", reader.processor)
        lens = feature_logits(sae, reader.model, tokenizer, list(features), args.logit_lens_top_k, reader.layers)
        for f, summary in features.items():
            summary.logit_lens = lens[f]
    return Inspection(
        features=features,
        explanations=explanations,
        rows=row_revisitor.views,
        scanned_rows=scanned,
        scores=scores,
        sae_config=sae.config.to_diff_dict(),
        num_weighted_features=int(sae.has_feature_weight.sum()),
        delta=sae.config.cooccurrence_threshold,
        special_as_text=args.special_as_text,
        model_name=getattr(reader.model.config, "_name_or_path", "") or type(reader.model).__name__,
        dataset_name=getattr(getattr(dataset, "info", None), "dataset_name", None),
    )
