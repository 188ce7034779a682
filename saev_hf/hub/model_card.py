"""[`saev_model_card`]: the model card of an SAE-V, with its evaluation as the Hub's `model-index` metadata."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .._version import __version__
from ..evaluation.report import check_metrics, format_metrics_table
from .templates import (
    CITATION,
    MODEL_CARD_TEMPLATE,
    MODEL_TAGS,
    PAPER_URL,
    PROJECT_URL,
    count,
    dataset_id,
    hub_id,
    link,
    ratio,
    template_text,
)

if TYPE_CHECKING:
    from ..model.modeling import SAEV


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
            --output_dir`: its metrics.json), shown as a table.
        repo_id (`str`, *optional*): the repo the card is for, used in the title and the usage snippet.
        license (`str`, *optional*): a Hub license id (`"apache-2.0"`, `"mit"`, ...). None leaves it unstated.
        eval_dataset (`str`, *optional*): the Hub dataset the metrics were computed on; with `metrics`, the card's
            metadata then carries them as a `model-index` (shown on the Hub's model page).
        tags (sequence of `str`): tags added to the default ones.

    Returns:
        `huggingface_hub.ModelCard`: call `.validate()`, `.save(path)` or `.push_to_hub(repo_id)`, or use
        [`push_saev`] to upload it with the weights.
    """

    if metrics is not None:
        check_metrics(metrics)  # names what is missing before anything else reads it
    config = sae.config
    base_model = hub_id(config.base_model_name_or_path)
    if repo_id:
        name = repo_id.split("/")[-1]
    else:
        name = f"saev-{(base_model or 'mllm').split('/')[-1]}-layer{config.hook_layer}"
    weights_info = config.feature_weights_info
    trained_on = hub_id(dataset_id(config.dataset_name))
    weighted_on = hub_id(dataset_id((weights_info or {}).get("dataset")))
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

    return ModelCard.from_template(
        card_data,
        template_str=template_text(MODEL_CARD_TEMPLATE),
        repo_id=repo_id or "ORG/NAME",
        title=repo_id or name,
        base_model_name=config.base_model_name_or_path,
        base_model_link=link(config.base_model_name_or_path, "model"),
        base_model_revision=config.base_model_revision,
        config=config,
        expansion=ratio(config.d_sae, config.d_in),
        training_data_link=link(config.dataset_name, "dataset", display=config.dataset_name),
        training_tokens=count(config.training_tokens),
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
        "dataset_link": link(info.get("dataset"), "dataset", display=info.get("dataset")),
        "num_examples": count(info.get("num_examples")),
        "num_tokens": count(info.get("num_tokens")),
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
