"""The evaluation's metrics shown to people: checked ([`check_metrics`], before a model card states them), laid out
as a table with a line of explanation under any figure outside its usual range ([`format_metrics_table`]), plotted
([`plot_feature_density`]), and written by `saev eval` ([`run_evaluation`]: `metrics.json` and the plot)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ..activations.reader import layer_device
from ..arguments import DataArguments, ModelArguments, SAEArguments
from ..cache.activation_cache import ActivationCache
from ..cache.reader import CacheReader
from ..data.prompts import PromptFormat
from ..runtime.devices import choose_device
from ..runtime.folders import OutputArguments, mark_output_complete
from .metrics import SPLITS, SAEVEvaluationArguments, evaluate_saev

logger = logging.getLogger(__name__)

METRIC_LABELS = (
    ("tokens", "tokens"),
    ("l0", "L0"),
    ("mse", "MSE"),
    ("explained_variance", "explained variance"),
    ("ce_clean", "CE clean"),
    ("ce_sae", "CE with SAE"),
    ("ce_zero", "CE zero-ablated"),
    ("ce_loss_recovered", "CE loss recovered"),
    ("l2_ratio", "L2 ratio"),
    ("kl_sae", "KL with SAE"),
    ("kl_zero", "KL zero-ablated"),
    ("kl_score", "KL score"),
)


# What a model card's table needs from an evaluation: the summary keys, and per split the token-level metrics
SUMMARY_KEYS = ("model", "layer", "num_examples", "d_sae", "dead_features", "dense_features", "dense_threshold")


SPLIT_KEYS = ("tokens", "l0", "mse", "explained_variance")


def check_metrics(metrics: Any) -> None:
    """
    Raise a `ValueError` naming every missing key when `metrics` is not an [`evaluate_saev`] result (the
    `metrics.json` that `saev eval --output_dir DIR` writes), the form [`format_metrics_table`] and the model card
    read.
    """
    if not isinstance(metrics, dict):
        raise ValueError(f"The metrics must be a JSON object as `saev eval --output_dir DIR` writes to DIR/metrics.json, "
                         f"got {type(metrics).__name__}.")
    missing = [key for key in SUMMARY_KEYS if key not in metrics]
    for split in SPLITS:
        if not isinstance(metrics.get(split), dict):
            missing.append(split)
        else:
            missing += [f"{split}.{key}" for key in SPLIT_KEYS if key not in metrics[split]]
    if missing:
        raise ValueError(
            f"The metrics lack {', '.join(missing)}: they are not an evaluation of an SAE-V. Write them with `saev "
            f"eval ... --output_dir DIR` (DIR/metrics.json), or json.dump(evaluate_saev(...))."
        )


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics of [`evaluate_saev`] as a Markdown table (rows: metrics; columns: all, text, image tokens)."""
    check_metrics(metrics)

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, int):
            return str(value)
        return f"{value + 0.0:.4g}"  # + 0.0 prints -0.0 as 0

    lines = ["| metric | all | text | image |", "|---|---|---|---|"]
    for key, label in METRIC_LABELS:
        if key in metrics["all"]:
            lines.append(f"| {label} | " + " | ".join(cell(metrics[split].get(key)) for split in SPLITS) + " |")
    lines.append("")
    lines.append(
        f"Model {metrics['model']}, layer {metrics['layer']}, {metrics['num_examples']} examples; features: "
        f"{metrics['dead_features']} dead, {metrics['dense_features']} dense (> {metrics['dense_threshold']:g} of "
        f"tokens) of {metrics['d_sae']}. CE is split by the predicted token; text CE is the main figure."
    )
    lines += _reading_notes(metrics, cell)
    if metrics.get("sparse_probing"):
        lines += ["", *format_probing_table(metrics["sparse_probing"])]
    return "\n".join(lines)


def format_probing_table(probing: dict[str, Any]) -> list[str]:
    """The lines of the sparse probing table (rows: the SAE-V's top-k probes and the dense residual-stream probe;
    columns: all, text, image positions), with a line saying what was probed."""

    def cell(split: str, key: str, k: str | None = None) -> str:
        result = probing.get(split)
        value = None if result is None else (result[key].get(k) if k is not None else result[key])
        return "-" if value is None else f"{value:.3f}"

    lines = ["| sparse probe | all | text | image |", "|---|---|---|---|"]
    for k in probing["k"]:
        lines.append(f"| SAE-V top {k} | " + " | ".join(cell(split, "sae", str(k)) for split in SPLITS) + " |")
    dims = next((probing[split]["d_in"] for split in SPLITS if probing.get(split)), None)
    lines.append(f"| residual stream ({dims} dims) | " + " | ".join(cell(split, "dense") for split in SPLITS) + " |")
    tasks = "one task" if len(probing["tasks"]) == 1 else f"{len(probing['tasks'])} one-vs-rest tasks"
    lines += ["", (f"Sparse probing of `{probing['label_column']}` ({len(probing['classes'])} classes, {tasks}; "
                   f"{probing['train_examples']} rows to train, {probing['test_examples']} to test, seed "
                   f"{probing['seed']}): {probing['metric']}; the SAE-V's features and the residual stream "
                   f"mean-pooled over each row's positions of the split.")]
    return lines


def _reading_notes(metrics: dict[str, Any], cell: Any) -> list[str]:
    """One line for each figure outside its usual range, saying what it means (footnotes of the table)."""

    def splits_where(key: str, outside: Any) -> str:
        values = [(split, metrics[split].get(key)) for split in SPLITS]
        hits = [f"{split} {cell(value)}" for split, value in values
                if isinstance(value, (int, float)) and math.isfinite(value) and outside(value)]
        return ", ".join(hits)

    notes = []
    above = splits_where("ce_loss_recovered", lambda v: v > 1)
    if above:
        notes.append(f"CE loss recovered above 1 ({above}): with the SAE's reconstruction the model predicts these "
                     f"tokens better than with its own layer output (CE with SAE < CE clean), so there was no loss "
                     f"to recover; the ratio grows large when CE clean and CE zero-ablated are close, e.g. for an "
                     f"untrained model.")
    below = splits_where("ce_loss_recovered", lambda v: v < 0)
    if below:
        notes.append(f"CE loss recovered below 0 ({below}): the SAE's reconstruction is worse than zero-ablating the "
                     f"layer (CE with SAE > CE zero-ablated).")
    negative = splits_where("explained_variance", lambda v: v < 0)
    if negative:
        notes.append(f"Explained variance below 0 ({negative}): the reconstruction is further from the hidden states "
                     f"than their mean is.")
    return notes


def plot_feature_density(metrics: dict[str, Any], path: Any) -> Any:
    """SAEBench's feature density plot: a histogram of each feature's log10 firing frequency, one panel per split
    (all, text, image tokens), dead features noted. Written to `path` (a PNG); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4 * len(SPLITS), 3), sharey=True)
    for ax, split in zip(axes, SPLITS):
        histogram = metrics[split].get("feature_density")
        if not histogram:
            ax.set_title(f"{split}: no tokens")
            continue
        edges = histogram["edges"]
        ax.bar(edges[:-1], histogram["counts"], width=1.0, align="edge", color="#4c72b0")
        ax.set_xlabel("log10 firing frequency")
        ax.set_title(f"{split} tokens ({histogram['dead']} dead)")
    axes[0].set_ylabel("features")
    fig.suptitle(f"Feature density, layer {metrics['layer']}, {metrics['num_examples']} examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_evaluation(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
                   prompt_format: PromptFormat, args: SAEVEvaluationArguments, output: OutputArguments) -> dict[str, Any]:
    """`saev eval`: load what the arguments name, evaluate, write `metrics.json` into `output.output_dir` when one is
    given (what `saev push --metrics_json` reads), and return the metrics."""
    args.check_source(model_args, data_args)
    if output.output_dir is not None:
        output.prepare("saev eval", cpu=model_args.device == "cpu")
    options = dict(layer=args.layer, batch_size=args.batch_size, num_examples=args.num_examples,
                   dense_threshold=args.dense_threshold, compute_ce_loss=args.compute_ce_loss,
                   probe_label_column=args.probe_label_column, probe_k=args.probe_k,
                   probe_test_fraction=args.probe_test_fraction, probe_seed=args.probe_seed)
    sae = sae_args.load()
    if data_args.activation_cache is not None:
        sae.to(choose_device(model_args.device))
        reader = CacheReader(ActivationCache(data_args.activation_cache), sae.W_enc.device)
        return _written(evaluate_saev(sae, reader=reader, **options), output.output_dir)
    model, processor = model_args.load()
    sae.to(layer_device(model, args.layer if args.layer is not None else sae.config.hook_layer))
    dataset = data_args.load(prompt_format.image_column)
    metrics = evaluate_saev(sae, model, processor, dataset, prompt_format=prompt_format, **options)
    metrics["model"] = model_args.model_name_or_path
    data_args.write_fetch_report(output.output_dir)
    return _written(metrics, output.output_dir)


METRICS_FILE = "metrics.json"
"""The file `saev eval --output_dir` writes the metrics to."""


DENSITY_PLOT = "feature_density.png"
"""The feature density plot `saev eval --output_dir` writes beside the metrics (with matplotlib installed)."""


def _written(metrics: dict[str, Any], output_dir: str | None) -> dict[str, Any]:
    """`metrics`, written to `output_dir/metrics.json` first when a folder is given, with the density plot."""
    if output_dir:
        (Path(output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        try:
            plot_feature_density(metrics, Path(output_dir) / DENSITY_PLOT)
        except ImportError:
            logger.info("matplotlib is not installed: no %s (pip install 'saev-hf[demo]').", DENSITY_PLOT)
        mark_output_complete(output_dir)
    return metrics
