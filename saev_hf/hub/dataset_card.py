"""[`filtered_dataset_card`]: the card of a dataset filtered by an SAE-V score."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from .._version import __version__
from ..scoring.scorer import ScorerArguments
from .histograms import text_histogram
from .templates import (
    CITATION,
    DATASET_CARD_TEMPLATE,
    DATASET_TAGS,
    PAPER_URL,
    PROJECT_URL,
    SCORE_DESCRIPTIONS,
    count,
    finite,
    hub_id,
    link,
    number,
    size_category,
    template_text,
)

if TYPE_CHECKING:
    from ..alignment.filtering import FilterArguments
    from ..model.config import SAEVConfig
    from ..scoring.scorer import ScorerArguments


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
    # keyword plumbing from the filter, the SAE-V and the scorer into the card's many template fields: long by design
    column = filter_args.column if filter_args is not None else (column or "saev_cosine_score")
    if column not in dataset.column_names:
        raise KeyError(
            f"Score column {column!r} not found in the filtered dataset; it has columns {dataset.column_names}. Pass "
            f"column= (or filter_args=) naming the score it was filtered by."
        )
    if scored is not None and column not in scored.column_names:
        raise KeyError(f"Score column {column!r} not found in the scored dataset; it has {scored.column_names}.")
    kept_scores = finite(dataset[column])
    all_scores = finite(scored[column]) if scored is not None else None
    rows_before = len(scored) if scored is not None else None
    rows_after = len(dataset)
    special_as_text = scorer_args.special_as_text if scorer_args is not None else None
    scorer_args = scorer_args or ScorerArguments()  # its column names, to describe the score columns
    columns_to_scores = {getattr(scorer_args, f"{s}_column"): s for s in ("cosine", "l0", "cooccur_l0")}
    score_name = columns_to_scores.get(column)
    other_scores = [c for c in columns_to_scores if c in dataset.column_names and c != column]

    card_data = DatasetCardData(
        license=license,
        source_datasets=[f"extended|{source_dataset}"] if hub_id(source_dataset) else None,
        task_categories=list(task_categories) or None,
        size_categories=[size_category(rows_after)],
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
        source_link=link(source_dataset, "dataset", display=source_dataset),
        source_details=source_details,
        sae_link=link(sae_repo, "model", display=sae_repo) if sae_repo else None,
        sae_config=sae_config,
        base_model_link=link(sae_config.base_model_name_or_path, "model") if sae_config is not None else None,
        column=column,
        score_description=SCORE_DESCRIPTIONS.get(score_name, "a score column"),
        other_scores=other_scores,
        special_as_text=special_as_text,
        rule=_rule(filter_args, column),
        rows_before=count(rows_before),
        rows_after=count(rows_after),
        kept_percent=f"{100 * rows_after / rows_before:.1f}%" if rows_before else None,
        lowest_kept=number(min(kept_scores)) if len(kept_scores) else None,
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


def _rule(filter_args: FilterArguments | None, column: str) -> str:
    if filter_args is None:
        return f"the highest `{column}` rows (rule not recorded; see the rows kept below)"
    if filter_args.fraction is not None:
        rule = f"the top {number(100 * filter_args.fraction)}% of rows by `{column}` (ties broken by row order)"
    else:
        rule = f"the rows with `{column}` >= {number(filter_args.threshold)}"
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
        return {"rows": str(len(values)), "mean": number(values.mean()), "std": number(values.std()),
                "min": number(values.min()), "10%": number(q[0]), "25%": number(q[1]), "median": number(q[2]),
                "75%": number(q[3]), "90%": number(q[4]), "max": number(values.max())}

    before, after = describe(all_scores), describe(kept)
    names = ("rows", "mean", "std", "min", "10%", "25%", "median", "75%", "90%", "max")
    return [(n, before.get(n, "-") if before is not None else None, after.get(n, "-")) for n in names]
