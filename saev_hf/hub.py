"""Publishing SAE-V artefacts on the Hugging Face Hub, each with a card that says where it came from.

- [`saev_model_card`]: the model card of an SAE-V: base model and revision, layer, sizes, training data, evaluation
  metrics (an [`evaluate_saev`] dict, as a table), where its cross-modal feature weights came from, a usage snippet,
  license and citation.
- [`filtered_dataset_card`]: the card of a dataset filtered by an SAE-V score: source dataset and revision, the SAE-V
  and the score, the kept fraction or threshold, rows before and after, and the score distribution (summary
  statistics and a text histogram; with matplotlib, a PNG histogram uploaded next to the data).
- [`push_saev`]: the SAE-V's weights, config and card in one commit.
- [`push_filtered_dataset`]: `Dataset.push_to_hub`, then the card (and histogram) in a second commit.

The cards are Jinja templates in the repository's top-level `hub_cards/` folder, installed as the package-data
package `saev_hf.hub_cards` (see `pyproject.toml`), and rendered with huggingface_hub's `ModelCard.from_template` /
`DatasetCard.from_template`, so that their YAML metadata is what the Hub expects.

Metadata choices: models get `library_name: saev-hf` (not `transformers`: the Hub would then offer an
`AutoModel.from_pretrained` snippet that fails unless `saev_hf` is imported first, which registers the `saev` model
type; SAELens checkpoints on the Hub likewise say `library_name: saelens`), the tags `saev`, `sparse-autoencoder`,
`interpretability` and `multimodal`, `base_model` (the MLLM it reads) and `datasets` (training and weighting data) when
they are Hub repo ids. No `pipeline_tag`: an SAE-V is not a pipeline the Hub can run. Filtered datasets get
`source_datasets: [extended|<source>]` (the datasets convention for data derived from another dataset),
`task_categories` (`image-text-to-text` by default), `size_categories` and the tags `saev` and `data-filtering`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, HfApi, ModelCard, ModelCardData

if TYPE_CHECKING:
    from .config import SAEVConfig
    from .filtering import FilterArguments
    from .model import SAEV
    from .scoring import ScorerArguments

TEMPLATES_PACKAGE = "saev_hf.hub_cards"
MODEL_CARD_TEMPLATE = "saev_model_card.md"
DATASET_CARD_TEMPLATE = "filtered_dataset_card.md"
HISTOGRAM_FILE = "score_histogram.png"

MODEL_TAGS = ("saev", "sparse-autoencoder", "interpretability", "multimodal")
DATASET_TAGS = ("saev", "data-filtering")
PAPER_URL = "https://arxiv.org/abs/2502.17514"
# Where the cards send readers for the library. A placeholder until the project has its public home.
PROJECT_URL = "https://github.com/saev-hf/saev-hf"
CITATION = """@inproceedings{lou2025saev,
  title     = {{SAE-V}: Interpreting Multimodal Models for Enhanced Alignment},
  author    = {Lou, Hantao and Li, Changye and Ji, Jiaming and Yang, Yaodong},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {267},
  pages     = {40344--40360},
  publisher = {PMLR},
  year      = {2025},
  url       = {https://arxiv.org/abs/2502.17514}
}"""

# What each score column of SAEVScorer measures (keys: the score names of ScorerArguments.scores).
SCORE_DESCRIPTIONS = {
    "cosine": "the sum of the cross-modal weights w_f of the features that co-occur on the example's image and text "
              "tokens (Algorithm 1; higher: image and text agree more)",
    "l0": "the mean number of active SAE-V features per token (Algorithm 2)",
    "cooccur_l0": "the number of SAE-V features active on both image and text tokens (Algorithm 3)",
}
# The Hub's size categories, by upper bound on the number of rows.
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------------


def template_text(name: str) -> str:
    """
    The Jinja template `name` from `hub_cards/`.

    Installed (wheel or `pip install -e .`), the templates are the package data of `saev_hf.hub_cards`; in a source
    checkout put on `PYTHONPATH` without installing, they are read from the repository's `hub_cards/` folder.
    """
    try:
        resource = importlib.resources.files(TEMPLATES_PACKAGE).joinpath(name)
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    path = Path(__file__).resolve().parent.parent / "hub_cards" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Card template {name!r} is neither package data of {TEMPLATES_PACKAGE} nor in {path.parent}. Reinstall "
            f"saev-hf (`pip install saev-hf`, or `pip install -e .` in a clone)."
        )
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def saev_model_card(
    sae: SAEV,
    metrics: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    eval_dataset: str | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """
    The model card of an SAE-V, from its config and buffers and, optionally, its evaluation.

    Args:
        sae ([`SAEV`]): the SAE-V; its config says base model, revision, layer, sizes and training data, and
            `config.feature_weights_info` where its feature weights came from.
        metrics (`dict`, *optional*): the result of [`evaluate_saev`] (or the JSON written by `saev eval
            --output_file`), shown as a table.
        repo_id (`str`, *optional*): the repo the card is for, used in the title and the usage snippet.
        license (`str`, *optional*): a Hub license id (`"apache-2.0"`, `"mit"`, ...). None leaves it unstated.
        eval_dataset (`str`, *optional*): the Hub dataset the metrics were computed on; with `metrics`, the card's
            metadata then carries them as a `model-index` (shown on the Hub's model page).
        tags (sequence of `str`): tags added to the default ones.

    Returns:
        `huggingface_hub.ModelCard`: call `.validate()`, `.save(path)` or `.push_to_hub(repo_id)`, or use
        [`push_saev`] to upload it with the weights.
    """
    from .evaluation import check_metrics

    if metrics is not None:
        check_metrics(metrics)  # names what is missing before anything else reads it
    config = sae.config
    base_model = _hub_id(config.base_model_name_or_path)
    if repo_id:
        name = repo_id.split("/")[-1]
    else:
        name = f"saev-{(base_model or 'mllm').split('/')[-1]}-layer{config.hook_layer}"
    weights_info = config.feature_weights_info
    trained_on = _hub_id(_dataset_id(config.dataset_name))
    weighted_on = _hub_id(_dataset_id((weights_info or {}).get("dataset")))
    eval_results = _eval_results(metrics, eval_dataset) if metrics is not None and eval_dataset else None
    card_data = ModelCardData(
        library_name="saev-hf",
        license=license,
        base_model=base_model,
        datasets=list(dict.fromkeys(d for d in (trained_on, weighted_on) if d)) or None,
        tags=[*MODEL_TAGS, *(t for t in tags if t not in MODEL_TAGS)],
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    from . import __version__
    from .evaluation import format_metrics_table

    return ModelCard.from_template(
        card_data,
        template_str=template_text(MODEL_CARD_TEMPLATE),
        repo_id=repo_id or "ORG/NAME",
        title=repo_id or name,
        base_model_name=config.base_model_name_or_path,
        base_model_link=_link(config.base_model_name_or_path, "model"),
        base_model_revision=config.base_model_revision,
        config=config,
        expansion=_ratio(config.d_sae, config.d_in),
        training_data_link=_link(config.dataset_name, "dataset", display=config.dataset_name),
        training_tokens=_count(config.training_tokens),
        metrics_table=format_metrics_table(metrics) if metrics is not None else None,
        weights=_weights_summary(sae) if weights_info is not None else None,
        license_id=license,
        citation=CITATION,
        paper_url=PAPER_URL,
        project_url=PROJECT_URL,
        saev_hf_version=__version__,
    )


def _weights_summary(sae: SAEV) -> dict[str, Any]:
    info = dict(sae.config.feature_weights_info or {})
    weights = sae.feature_weights.detach().float().cpu()
    weights = weights[~weights.isnan()]
    stats = None
    if len(weights):
        stats = {"mean": float(weights.mean()), "min": float(weights.min()), "median": float(weights.median()),
                 "max": float(weights.max())}
    return {
        "dataset_link": _link(info.get("dataset"), "dataset", display=info.get("dataset")),
        "num_examples": _count(info.get("num_examples")),
        "num_tokens": _count(info.get("num_tokens")),
        "top_k": info.get("top_k"),
        "per_modality": info.get("per_modality"),
        "special_as_text": info.get("special_as_text"),
        "mean_center": info.get("mean_center"),
        "num_weighted": int(len(weights)),
        "num_single_modal": info.get("num_single_modal_features"),
        "num_silent": info.get("num_silent_features"),
        "d_sae": sae.config.d_sae,
        "stats": stats,
    }


def _eval_results(metrics: dict[str, Any], eval_dataset: str) -> list[EvalResult]:
    # The headline figures of each split, as the Hub's model-index; None values (no token of a modality) are left out.
    wanted = (("all", "l0", "L0"), ("all", "explained_variance", "Explained variance"),
              ("text", "ce_loss_recovered", "CE loss recovered (text tokens)"), ("all", "mse", "MSE"))
    results = []
    for split, key, label in wanted:
        value = (metrics.get(split) or {}).get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        results.append(EvalResult(
            task_type="feature-extraction", task_name="Sparse autoencoding", dataset_type=eval_dataset,
            dataset_name=eval_dataset, metric_type=key if split == "all" else f"{key}_{split}", metric_name=label,
            metric_value=round(float(value), 6),
        ))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Filtered dataset card
# ----------------------------------------------------------------------------------------------------------------------


def filtered_dataset_card(
    dataset: Any,
    *,
    source_dataset: str,
    scored: Any = None,
    filter_args: FilterArguments | None = None,
    column: str | None = None,
    source_revision: str | None = None,
    source_config: str | None = None,
    source_split: str | None = None,
    sae_repo: str | None = None,
    sae_config: SAEVConfig | None = None,
    scorer_args: ScorerArguments | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    task_categories: Sequence[str] = ("image-text-to-text",),
    tags: Sequence[str] = (),
    histogram_file: str | None = None,
) -> DatasetCard:
    """
    The card of a dataset filtered by an SAE-V score (see [`filter_by_score`]).

    Args:
        dataset (`datasets.Dataset`): the kept rows, with their score column.
        source_dataset (`str`): the dataset that was scored and filtered (a Hub id, linked; or a description).
        scored (`datasets.Dataset`, *optional*): the scored dataset before filtering. With it the card gives the rows
            before, the kept fraction and the distribution of every score; without it, of the kept rows only.
        filter_args ([`FilterArguments`], *optional*): the filter used (column, fraction or threshold).
        column (`str`, *optional*): the score column, when `filter_args` is not given (default
            `"saev_cosine_score"`).
        source_revision, source_config, source_split (`str`, *optional*): which version and part of the source.
        sae_repo (`str`, *optional*): the SAE-V that scored the data (a Hub id, linked).
        sae_config ([`SAEVConfig`], *optional*): its config, for the base model, layer and co-occurrence bound.
        scorer_args ([`ScorerArguments`], *optional*): the scorer's settings (column names, special tokens).
        repo_id (`str`, *optional*): the dataset repo the card is for (usage snippet).
        license (`str`, *optional*): the license of the filtered data, normally the source's. None leaves it unstated.
        task_categories, tags: metadata; tags are added to `saev` and `data-filtering`.
        histogram_file (`str`, *optional*): the name of a PNG histogram uploaded with the data, shown in the card
            ([`push_filtered_dataset`] makes and uploads it).

    Returns:
        `huggingface_hub.DatasetCard`.
    """
    from . import __version__
    from .scoring import ScorerArguments

    column = filter_args.column if filter_args is not None else (column or "saev_cosine_score")
    if column not in dataset.column_names:
        raise KeyError(
            f"Score column {column!r} not found in the filtered dataset; it has columns {dataset.column_names}. Pass "
            f"column= (or filter_args=) naming the score it was filtered by."
        )
    if scored is not None and column not in scored.column_names:
        raise KeyError(f"Score column {column!r} not found in the scored dataset; it has {scored.column_names}.")
    kept_scores = _finite(dataset[column])
    all_scores = _finite(scored[column]) if scored is not None else None
    rows_before = len(scored) if scored is not None else None
    rows_after = len(dataset)
    special_as_text = scorer_args.special_as_text if scorer_args is not None else None
    scorer_args = scorer_args or ScorerArguments()  # its column names, to describe the score columns
    columns_to_scores = {getattr(scorer_args, f"{s}_column"): s for s in ("cosine", "l0", "cooccur_l0")}
    score_name = columns_to_scores.get(column)
    other_scores = [c for c in columns_to_scores if c in dataset.column_names and c != column]

    card_data = DatasetCardData(
        license=license,
        source_datasets=[f"extended|{source_dataset}"] if _hub_id(source_dataset) else None,
        task_categories=list(task_categories) or None,
        size_categories=[_size_category(rows_after)],
        pretty_name=f"{source_dataset.split('/')[-1]} filtered by SAE-V ({column})",
        tags=[*DATASET_TAGS, *(t for t in tags if t not in DATASET_TAGS)],
    )
    histogram = text_histogram(all_scores, kept_scores) if all_scores is not None else text_histogram(kept_scores)
    source_details = ", ".join(f"{what} `{value}`" for what, value in
                               (("config", source_config), ("split", source_split), ("revision", source_revision))
                               if value)
    return DatasetCard.from_template(
        card_data,
        template_str=template_text(DATASET_CARD_TEMPLATE),
        repo_id=repo_id or "ORG/NAME",
        source_dataset=source_dataset,
        source_link=_link(source_dataset, "dataset", display=source_dataset),
        source_details=source_details,
        sae_link=_link(sae_repo, "model", display=sae_repo) if sae_repo else None,
        sae_config=sae_config,
        base_model_link=_link(sae_config.base_model_name_or_path, "model") if sae_config is not None else None,
        column=column,
        score_description=SCORE_DESCRIPTIONS.get(score_name, "a score column"),
        other_scores=other_scores,
        special_as_text=special_as_text,
        rule=_rule(filter_args, column),
        rows_before=_count(rows_before),
        rows_after=_count(rows_after),
        kept_percent=f"{100 * rows_after / rows_before:.1f}%" if rows_before else None,
        lowest_kept=_number(min(kept_scores)) if len(kept_scores) else None,
        null_scores=(rows_before - len(all_scores)) if all_scores is not None else rows_after - len(kept_scores),
        stats=_stats_rows(all_scores, kept_scores),
        text_histogram=histogram,
        histogram_file=histogram_file,
        columns=dataset.column_names,
        license_id=license,
        citation=CITATION,
        paper_url=PAPER_URL,
        project_url=PROJECT_URL,
        saev_hf_version=__version__,
    )


def text_histogram(scores: Sequence[float], kept: Sequence[float] | None = None, bins: int = 10,
                   width: int = 30) -> str:
    """
    A histogram of `scores` in plain text, one line per bin: its range, a bar, its rows and (with `kept`) how many
    of them were kept. Fits in a Markdown code block.
    """
    scores = _finite(scores)
    if not len(scores):
        return "(no finite scores)"
    counts, edges = np.histogram(scores, bins=bins)
    kept_counts = np.histogram(_finite(kept), bins=edges)[0] if kept is not None else None
    labels = [f"[{_number(lo)}, {_number(hi)}{']' if i == len(counts) - 1 else ')'}"
              for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    label_width = max(len(label) for label in labels)
    header = f"{'score':<{label_width}}  {'':<{width}}  {'rows':>6}" + ("  kept" if kept_counts is not None else "")
    lines = [header]
    for i, label in enumerate(labels):
        bar = "█" * int(round(width * counts[i] / counts.max()))
        line = f"{label:<{label_width}}  {bar:<{width}}  {counts[i]:>6}"
        if kept_counts is not None:
            line += f"  {kept_counts[i]:>4}"
        lines.append(line)
    return "\n".join(lines)


def score_histogram_png(scores: Sequence[float], kept: Sequence[float] | None = None, column: str = "score",
                        bins: int = 30) -> bytes:
    """A PNG histogram of `scores`, the `kept` ones highlighted and the lowest kept score marked (needs matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = _finite(scores)
    figure = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(figure)  # a figure of its own, outside pyplot: no global state, any backend
    axes = figure.add_subplot()
    edges = np.histogram_bin_edges(scores, bins=bins) if len(scores) else bins
    axes.hist(scores, bins=edges, color="#b0b0b0", label=f"all ({len(scores)})")
    if kept is not None:
        kept = _finite(kept)
        axes.hist(kept, bins=edges, color="#ff9d00", label=f"kept ({len(kept)})")
        if len(kept):
            axes.axvline(kept.min(), color="black", linestyle="--", linewidth=1, label="lowest kept")
    axes.set_xlabel(column)
    axes.set_ylabel("rows")
    axes.legend(frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _rule(filter_args: FilterArguments | None, column: str) -> str:
    if filter_args is None:
        return f"the highest `{column}` rows (rule not recorded; see the rows kept below)"
    if filter_args.fraction is not None:
        rule = f"the top {_number(100 * filter_args.fraction)}% of rows by `{column}` (ties broken by row order)"
    else:
        rule = f"the rows with `{column}` >= {_number(filter_args.threshold)}"
    if filter_args.null_scores == "drop":
        rule += "; rows without a score dropped"
    return rule


def _stats_rows(all_scores: np.ndarray | None, kept: np.ndarray) -> list[tuple[str, str, str | None]]:
    def describe(values: np.ndarray | None) -> dict[str, str] | None:
        if values is None:
            return None
        if not len(values):
            return {}
        q = np.percentile(values, [10, 25, 50, 75, 90])
        return {"rows": str(len(values)), "mean": _number(values.mean()), "std": _number(values.std()),
                "min": _number(values.min()), "10%": _number(q[0]), "25%": _number(q[1]), "median": _number(q[2]),
                "75%": _number(q[3]), "90%": _number(q[4]), "max": _number(values.max())}

    before, after = describe(all_scores), describe(kept)
    names = ("rows", "mean", "std", "min", "10%", "25%", "median", "75%", "90%", "max")
    return [(n, before.get(n, "-") if before is not None else None, after.get(n, "-")) for n in names]


# ----------------------------------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------------------------------


def push_saev(
    sae: SAEV,
    repo_id: str,
    *,
    metrics: dict[str, Any] | None = None,
    card: ModelCard | None = None,
    license: str | None = None,
    eval_dataset: str | None = None,
    tags: Sequence[str] = (),
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
):
    """
    Push an SAE-V (`config.json`, `model.safetensors`) and its model card (`README.md`) to `repo_id` in one commit.

    The card is [`saev_model_card`]`(sae, metrics, repo_id=repo_id, license=..., eval_dataset=..., tags=...)` unless
    `card` is given. It is validated by the Hub before anything is uploaded, so a bad card fails early. The repo is
    created if needed; a `revision` other than `main` is created as a branch.

    Returns:
        `huggingface_hub.CommitInfo` of the commit (its `commit_url`, `oid`, ...).
    """
    card = card or saev_model_card(sae, metrics, repo_id=repo_id, license=license, eval_dataset=eval_dataset, tags=tags)
    card.validate(repo_type="model")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        sae.save_pretrained(folder)
        card.save(os.path.join(folder, "README.md"))
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message or "Upload SAE-V with its model card")


def push_filtered_dataset(
    dataset: Any,
    repo_id: str,
    *,
    source_dataset: str,
    scored: Any = None,
    filter_args: FilterArguments | None = None,
    column: str | None = None,
    source_revision: str | None = None,
    source_config: str | None = None,
    source_split: str | None = None,
    sae_repo: str | None = None,
    sae_config: SAEVConfig | None = None,
    scorer_args: ScorerArguments | None = None,
    license: str | None = None,
    task_categories: Sequence[str] = ("image-text-to-text",),
    tags: Sequence[str] = (),
    histogram: bool | None = None,
    split: str = "train",
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
):
    """
    Push a filtered dataset with `Dataset.push_to_hub`, then its card (see [`filtered_dataset_card`]; the arguments
    are the same) and a PNG histogram of the scores in a second commit.

    The card keeps the `configs` and `dataset_info` metadata that `datasets` wrote, so `load_dataset(repo_id)` reads
    the data as usual. `histogram`: True uploads `score_histogram.png` (needs matplotlib), False does not, None does
    when matplotlib is installed; the card's text histogram is there either way.

    Returns:
        `huggingface_hub.CommitInfo` of the card's commit.
    """
    if histogram is None:
        histogram = importlib.util.find_spec("matplotlib") is not None
    card_inputs = dict(source_dataset=source_dataset, scored=scored, filter_args=filter_args, column=column,
                       source_revision=source_revision, source_config=source_config, source_split=source_split,
                       sae_repo=sae_repo, sae_config=sae_config, scorer_args=scorer_args, repo_id=repo_id,
                       license=license, task_categories=task_categories, tags=tags,
                       histogram_file=HISTOGRAM_FILE if histogram else None)
    card = filtered_dataset_card(dataset, **card_inputs)
    card.validate(repo_type="dataset")  # before the upload: a bad card fails early
    png = None
    if histogram:
        column = filter_args.column if filter_args is not None else (column or "saev_cosine_score")
        png = score_histogram_png((scored if scored is not None else dataset)[column], dataset[column], column)

    dataset.push_to_hub(repo_id, split=split, private=private, token=token,
                        commit_message=commit_message or "Upload SAE-V filtered dataset")
    # `datasets` wrote a README whose metadata says where the data files are; the card keeps those entries.
    written = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    for key in ("configs", "dataset_info"):
        if key in written.data:
            card.data[key] = written.data[key]
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd("README.md", str(card).encode("utf-8"))]
    if png is not None:
        operations.append(CommitOperationAdd(HISTOGRAM_FILE, png))
    return HfApi(token=token).create_commit(repo_id, operations=operations, repo_type="dataset",
                                            commit_message="Add the SAE-V dataset card and score histogram")


def load_saev_config(name_or_path: str, subfolder: str | None = None, revision: str | None = None) -> SAEVConfig:
    """The [`SAEVConfig`] of an SAE-V checkpoint (either layout, folder or Hub repo), without loading its weights."""
    import json

    from . import saelens
    from .config import SAEVConfig

    kwargs = {k: v for k, v in (("subfolder", subfolder), ("revision", revision)) if v is not None}
    if saelens.detect_layout(name_or_path, **kwargs) == "saelens":
        cfg_file = saelens._resolve(name_or_path, saelens.CFG_FILENAME, **kwargs)
        return saelens.config_from_saelens(json.loads(Path(cfg_file).read_text()))
    return SAEVConfig.from_pretrained(name_or_path, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# `saev push`
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PushArguments:
    """
    Push an SAE-V folder with its model card (`--sae DIR --repo_id org/name [--metrics_json FILE]`), or a filtered
    dataset folder with its dataset card (`--dataset DIR --repo_id org/name --source_dataset org/data
    [--scored_dataset DIR] [--sae_repo org/saev]`).
    """

    repo_id: str = field(metadata={"help": "Hub repo to push to, 'org/name' (created if needed)."})
    sae: str | None = field(
        default=None, metadata={"help": "Folder (or Hub repo) of the SAE-V to push (either layout)."}
    )
    metrics_json: str | None = field(
        default=None, metadata={"help": "With --sae: evaluation metrics JSON, as written by `saev eval --output_file`."}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "With --sae: Hub dataset the metrics were computed on (adds a model-index)."}
    )
    revision: str | None = field(default=None, metadata={"help": "With --sae: branch to push to (default main)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Folder of the filtered dataset to push (written by `saev filter`)."}
    )
    scored_dataset: str | None = field(
        default=None,
        metadata={"help": "With --dataset: folder of the scored dataset before filtering (written by `saev score`), "
                  "for the rows before and the score distribution."},
    )
    split: str = field(default="train", metadata={"help": "With --dataset: split to read from the folders and push."})
    source_dataset: str | None = field(
        default=None, metadata={"help": "With --dataset: the Hub dataset that was scored and filtered (required)."}
    )
    source_revision: str | None = field(default=None, metadata={"help": "With --dataset: revision of the source."})
    source_config: str | None = field(default=None, metadata={"help": "With --dataset: configuration of the source."})
    source_split: str | None = field(default=None, metadata={"help": "With --dataset: split of the source."})
    sae_repo: str | None = field(
        default=None,
        metadata={"help": "With --dataset: the SAE-V that scored it (Hub repo or folder); its config is read for the "
                  "card."},
    )
    score_column: str = field(
        default="saev_cosine_score",
        metadata={"help": "With --dataset: the score column it was filtered by (read from the folder instead when "
                  "`saev filter` wrote it, with the rule)."},
    )
    license: str | None = field(default=None, metadata={"help": "Hub license id for the card, e.g. apache-2.0."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags for the card."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message (a default describes it)."})

    def __post_init__(self) -> None:
        if (self.sae is None) == (self.dataset is None):
            raise ValueError("Give exactly one of --sae (an SAE-V folder) and --dataset (a filtered dataset folder).")
        sae_only = ("metrics_json", "eval_dataset", "revision")
        dataset_only = ("scored_dataset", "source_dataset", "source_revision", "source_config", "source_split",
                        "sae_repo")
        wrong = [name for name in (dataset_only if self.sae else sae_only) if getattr(self, name) is not None]
        if wrong:
            kind = "an SAE-V (--sae)" if self.sae else "a dataset (--dataset)"
            options = ", ".join("--" + name for name in wrong)
            verb, pronoun = ("does", "it") if len(wrong) == 1 else ("do", "them")
            raise ValueError(f"{options} {verb} not apply when pushing {kind}; remove {pronoun}.")
        if self.dataset is not None and not self.source_dataset:
            raise ValueError("--dataset needs --source_dataset: the Hub dataset that was scored and filtered.")


def read_metrics_json(path: str) -> dict[str, Any]:
    """The evaluation metrics in `path` (written by `saev eval --output_file`), checked for what the card needs."""
    import json

    from .evaluation import check_metrics

    if not Path(path).is_file():
        raise FileNotFoundError(f"--metrics_json {path}: no such file. Write it with `saev eval ... --output_file "
                                f"{path}`.")
    try:
        metrics = json.loads(Path(path).read_text())
        check_metrics(metrics)
    except ValueError as error:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"--metrics_json {path}: {error}") from error
    return metrics


def run_push(args: PushArguments):
    """Load what `args` name and push it with its card; prints and returns the commit URL."""
    import json

    if args.sae is not None:
        from .model import SAEV

        sae = SAEV.from_pretrained(args.sae)
        metrics = read_metrics_json(args.metrics_json) if args.metrics_json else None
        commit = push_saev(sae, args.repo_id, metrics=metrics, license=args.license, eval_dataset=args.eval_dataset,
                           tags=args.tags, private=args.private, revision=args.revision,
                           commit_message=args.commit_message)
        print(f"Pushed the SAE-V in {args.sae} with its model card to {args.repo_id}: {commit.commit_url}")
        return commit.commit_url
    from .loading import load_dataset_split

    from .filtering import FILTER_RECORD, FilterArguments

    kept = load_dataset_split(args.dataset, split=args.split)
    scored = load_dataset_split(args.scored_dataset, split=args.split) if args.scored_dataset else None
    record = Path(args.dataset) / FILTER_RECORD  # the rule, when `saev filter` wrote the folder
    filter_args = FilterArguments(**json.loads(record.read_text())) if record.is_file() else None
    sae_config = load_saev_config(args.sae_repo) if args.sae_repo else None
    commit = push_filtered_dataset(
        kept, args.repo_id, source_dataset=args.source_dataset, scored=scored, filter_args=filter_args,
        column=None if filter_args is not None else args.score_column,
        source_revision=args.source_revision, source_config=args.source_config, source_split=args.source_split,
        sae_repo=args.sae_repo, sae_config=sae_config, license=args.license, tags=args.tags, split=args.split,
        private=args.private, commit_message=args.commit_message,
    )
    print(f"Pushed {len(kept)} rows of {args.dataset} with their dataset card to {args.repo_id}: {commit.commit_url}")
    return commit.commit_url


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (`org/name`, not a local folder), else None: metadata wants repo ids."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _dataset_id(name: str | None) -> str | None:
    # Training records a dataset as "name" or "name:config".
    return name.split(":", 1)[0] if name else None


def _link(name: str | None, kind: str, display: str | None = None) -> str | None:
    """Markdown for `name`: a link to its Hub page when it is a repo id, else the name as code."""
    if not name:
        return None
    repo = _hub_id(_dataset_id(name) if kind == "dataset" else name)
    text = f"`{display or name}`"
    if repo is None:
        return text
    prefix = "datasets/" if kind == "dataset" else ""
    return f"[{text}](https://huggingface.co/{prefix}{repo})"


def _finite(values: Sequence[Any] | None) -> np.ndarray:
    if values is None:
        return np.array([], dtype=np.float64)
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def _number(value: float) -> str:
    return f"{float(value) + 0.0:.4g}"  # + 0.0 prints -0.0 as 0


def _count(value: int | None) -> str | None:
    return None if value is None else f"{int(value):,}"


def _ratio(d_sae: int, d_in: int) -> str:
    return f"{d_sae // d_in}" if d_sae % d_in == 0 else f"{d_sae / d_in:.2f}"


def _size_category(rows: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1B")


__all__ = [
    "CITATION",
    "HISTOGRAM_FILE",
    "PushArguments",
    "filtered_dataset_card",
    "load_saev_config",
    "push_filtered_dataset",
    "push_saev",
    "run_push",
    "saev_model_card",
    "score_histogram_png",
    "template_text",
    "text_histogram",
]
