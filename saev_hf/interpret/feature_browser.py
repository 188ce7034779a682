"""A static HTML feature browser for an [`Inspection`]: pages and PNGs that open from disk, without a server.

```
output_dir/
  index.html                     SAE-V config, the inspected features, the explained rows (lowest score first)
  features/feature_<id>.html     weight, modality profile, firing counts, top examples (highlighted tokens, heatmaps)
  examples/example_<row>.html    scores, image, the co-occurring features behind the score (linked), why it is low
  features.json                  the features' facts, top examples, logit lens and labels (what `saev explore
                                 --inspection_dir` reads)
```

With labels (`saev label`), feature pages and the index show each label and its detection score; with an explorer URL
(`saev explore`, or its Space), every feature page links to the feature in the explorer.

Every link is relative and every text (tokens, column values, model names) is HTML-escaped. Plots are drawn with
matplotlib's Agg canvas on figures of their own (no pyplot state). Files of an earlier report in the same folder are
overwritten, not removed.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..activations.reader import LayerReader, Modality
from ..arguments import DataArguments, ModelArguments, SAEArguments, load_sources
from ..data.images import to_rgb
from ..data.prompts import PromptFormat
from ..runtime.folders import OutputArguments, mark_output_complete, prepare_output_dir
from .explanations import ExampleExplanation
from .inspection import MODALITY_NAMES, FeatureSummary, Inspection, InspectionArguments, inspect_saev
from .labels import FeatureLabel, read_labels
from .rows import RowView

MODALITY_COLOURS = {"image": "#4c72b0", "text": "#ff9d00", "special": "#9a9a9a"}
HEATMAP_CMAP = "YlOrRd"  # light yellow (weak) to red (strong): readable over dark and light pixels
MAX_BARS = 20  # contributions drawn in an example's bar chart

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
nav { font-size: 0.9em; margin-bottom: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: middle; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.8em 0; }
.example h3 { margin: 0 0 0.4em; font-size: 1em; }
.images img { height: 180px; margin-right: 0.5em; image-rendering: pixelated; border: 1px solid #ccc; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; line-height: 1.9;
          white-space: pre-wrap; word-break: break-word; }
.tok { padding: 1px 2px; margin: 0 1px; border-radius: 3px; }
.tok.special { color: #777; }
.tok.image { color: #234; border: 1px dashed #4c72b0; }
.tok.active { outline: 1px solid rgba(200, 60, 0, 0.5); }
.note { color: #8a5a00; background: #fff6e0; padding: 0.3em 0.6em; border-radius: 4px; }
.muted { color: #777; }
.neg { color: #b00020; }
.pos { color: #1a7f37; }
"""


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    return f"{value:.{digits}g}"


def _page(title: str, body: str, root: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<nav><a href=\"{root}index.html\">SAE-V inspection</a></nav>\n{body}\n</body>\n</html>\n"
    )


def _table(header: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table (no header row if `header` is None); `header` is escaped here, `rows` hold HTML already
    escaped by the caller."""
    head = f"<tr>{''.join(f'<th>{_escape(h)}</th>' for h in header)}</tr>\n" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>\n"
        for r in rows
    )
    return f"<table>\n{head}{body}</table>\n"


def display_token(token: str) -> str:
    """A token as shown: SentencePiece's and byte-level BPE's space and newline markers as the characters they are."""
    return token.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\u21b5")


def token_runs(view: RowView) -> list[tuple[str, str, int, int]]:
    """A row's tokens as a page shows them, `(text, kind, start, end)`: each text or special token on its own, each
    run of image tokens as one `[image xN]` entry of kind `image` (positions `start:end` of the row)."""
    runs = []
    modality = view.modality.tolist()
    i = 0
    while i < len(view.tokens):
        code = modality[i]
        end = i + 1
        if code == Modality.IMAGE:
            while end < len(view.tokens) and modality[end] == Modality.IMAGE:
                end += 1
            runs.append((f"[image \u00d7{end - i}]", "image", i, end))
        else:
            runs.append((display_token(view.tokens[i]), "special" if code == Modality.SPECIAL else "text", i, end))
        i = end
    return runs


def tokens_html(view: RowView, activations: torch.Tensor | None = None, scale: float = 1.0) -> str:
    """
    A row's tokens as HTML spans (class `tok`, plus `text` / `special` / `image`), each run of image tokens as one
    `[image xN]` span. With `activations` (one per token), a span's background shows the activation divided by
    `scale` and spans with a positive activation get the class `active`; the exact value is in its tooltip.
    """
    parts = []
    for text, kind, i, end in token_runs(view):
        classes, style, title = ["tok", kind], "", f"{kind} token" if kind != "image" else f"{end - i} image tokens"
        if activations is not None:
            value = float(activations[i:end].max())
            if value > 0:
                classes.append("active")
                alpha = min(1.0, value / scale) if scale > 0 else 1.0
                style = f" style=\"background-color: rgba(255, 110, 0, {0.1 + 0.85 * alpha:.3f})\""
            title += f"; activation {value:.4g}" + (" (max over them)" if kind == "image" else "")
        parts.append(f"<span class=\"{' '.join(classes)}\" title=\"{_escape(title)}\"{style}>{_escape(text)}</span>")
    return f"<div class=\"tokens\">{''.join(parts)}</div>"


# -----------------------------------------------------------------------------------------------------------------
# Plots
# -----------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "The feature browser draws its plots with matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'saev-hf[notebooks]')."
        ) from error
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # a canvas of its own: no pyplot state, works under any backend
    return figure


def heatmap_png(image: Any, values: torch.Tensor | None, box: tuple[float, float, float, float] | None,
                vmax: float, path: Any) -> None:
    """Save `image` with `values` (rows, cols) drawn over the fraction `box` (left, top, right, bottom) of it, as a
    PNG to `path` (a file path or a binary file object)."""
    width, height = image.size
    figure = _figure(2.4, 2.4 * height / width)
    axes = figure.add_axes((0, 0, 1, 1))
    smooth = "nearest" if max(image.size) < 240 else "antialiased"  # tiny images stay crisp, photos are smoothed
    axes.imshow(image, extent=(0, width, height, 0), interpolation=smooth)
    if values is not None and box is not None:
        left, top, right, bottom = box
        data = values.float().numpy()
        scale = vmax if vmax > 0 else max(float(data.max()), 1e-12)
        # opacity grows with the activation and is 0 where the feature is silent, so the image shows through there
        alpha = np.where(data > 0, 0.25 + 0.6 * np.clip(data / scale, 0, 1), 0.0)
        axes.imshow(data, extent=(left * width, right * width, bottom * height, top * height), cmap=HEATMAP_CMAP,
                    alpha=alpha, vmin=0, vmax=scale, interpolation="nearest")
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.axis("off")
    figure.savefig(path, format="png")


def profile_png(summary: FeatureSummary, path: Path) -> None:
    """A horizontal bar split into the feature's image / text / special shares of firing positions."""
    figure = _figure(3.6, 0.55)
    axes = figure.add_axes((0.01, 0.05, 0.98, 0.9))
    left = 0.0
    for name, share in summary.modality_profile.items():
        if share > 0:
            axes.barh(0, share, left=left, color=MODALITY_COLOURS[name], height=1.0)
            if share > 0.12:
                axes.text(left + share / 2, 0, f"{name} {100 * share:.0f}%", ha="center", va="center", fontsize=7,
                          color="white" if name == "image" else "black")
        left += share
    if left == 0:
        axes.text(0.5, 0, "never fired", ha="center", va="center", fontsize=7, color="#777")
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.5, 0.5)
    axes.axis("off")
    figure.savefig(path, format="png")


def contributions_png(explanation: ExampleExplanation, path: Path) -> None:
    """Bars of the largest |w_f| contributions to the example's cosine score, coloured by sign."""
    shown = [c for c in explanation.contributions if c.contribution != 0][:MAX_BARS]
    figure = _figure(6.4, 2.6)
    axes = figure.add_subplot()
    if shown:
        axes.bar([str(c.feature) for c in shown], [c.contribution for c in shown],
                 color=["#1a7f37" if c.contribution > 0 else "#b00020" for c in shown])
        axes.tick_params(axis="x", labelrotation=60, labelsize=7)
    else:
        axes.text(0.5, 0.5, "no weighted co-occurring feature: score 0", ha="center", va="center",
                  transform=axes.transAxes)
        axes.set_xticks([])
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel("co-occurring feature")
    axes.set_ylabel("weight $w_f$")
    axes.set_title(f"Row {explanation.row}: cosine score {explanation.cosine_score:.4g}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _save_image(image: Any, path: Path) -> None:
    to_rgb(image).save(path, format="PNG")  # the pixels the model saw (transparency on white)


# -----------------------------------------------------------------------------------------------------------------
# Pages
# -----------------------------------------------------------------------------------------------------------------


def _feature_link(feature: int, inspection: Inspection, prefix: str) -> str:
    if feature in inspection.features:
        return f"<a href=\"{prefix}feature_{feature}.html\">{feature}</a>"
    return f"<span class=\"muted\">{feature}</span>"


def label_html(label: FeatureLabel | None) -> str:
    """A label with its detection score, escaped, or a muted "none"."""
    if label is None:
        return "<span class=\"muted\">none</span>"
    text = f"<b>{_escape(label.label)}</b>"
    if label.detection is not None:
        d = label.detection
        text += (f" <span class=\"muted\">(detection: accuracy {_number(d['accuracy'], 3)}, F1 {_number(d['f1'], 3)} "
                 f"on {int(d['num_activating'])} + {int(d['num_non_activating'])} held-out examples)</span>")
    return text


def explorer_link(explorer_url: str, feature: int) -> str:
    """The explorer's address for `feature` (it opens that feature's page)."""
    return f"{explorer_url.rstrip('/')}/?feature={feature}"


def _feature_page(summary: FeatureSummary, inspection: Inspection, folder: Path,
                  labels: dict[int, FeatureLabel] | None = None, explorer_url: str | None = None) -> str:
    f = summary.feature
    profile_png(summary, folder / f"feature_{f}_profile.png")
    weight = (f"{summary.weight:.4g}" if summary.has_weight
              else "none (single-modal, or too few text or image tokens among its top activations)")
    counts = summary.firing_counts
    facts = _table(None, [
        ["cross-modal weight w<sub>f</sub>", _escape(weight)],
        ["firing positions (z &gt; 0)", ", ".join(f"{_escape(n)} {counts[n]}" for n in MODALITY_NAMES)],
        ["rows where it fires", f"{summary.examples_fired} of {len(inspection.scanned_rows)} scanned"],
        [f"rows where it co-occurs (text and image &gt; {_escape(_number(inspection.delta))})",
         f"{summary.examples_cooccurring}"],
        ["on this page because", _escape(summary.selected_because)],
        *([["label (<code>saev label</code>)", label_html(labels.get(f))]] if labels is not None else []),
    ])
    explore = (f"<p><a class=\"explorer\" href=\"{_escape(explorer_link(explorer_url, f))}\">Open feature {f} in the "
               f"explorer</a> (try your own images, steer with it)</p>" if explorer_url else "")
    body = [f"<h1>Feature {f}</h1>", facts, explore,
            f"<h2>Modality profile</h2><p><img src=\"feature_{f}_profile.png\" alt=\"modality profile of feature {f}\">"
            "</p>"]
    if summary.logit_lens is not None:
        lens = summary.logit_lens
        rows = [[_escape(p[0]), _escape(_number(p[1])), _escape(n[0]), _escape(_number(n[1]))]
                for p, n in zip(lens.positive, lens.negative)]
        body.append("<h2>What it writes (logit lens)</h2><p class=\"note\">Its decoder direction through the final "
                    "norm's weight and the unembedding: the change in each token's logit per unit of activation "
                    "(layers after L left out: an approximation).</p>"
                    + _table(["promoted", "logit", "suppressed", "logit"], rows))
    in_explanations = [row for row, e in inspection.explanations.items()
                       if any(c.feature == f for c in e.contributions)]
    if in_explanations:
        links = ", ".join(f"<a href=\"../examples/example_{row}.html\">row {row}</a>" for row in in_explanations)
        body.append(f"<p>Co-occurs in the explained rows {links}.</p>")
    body.append("<h2>Top-activating examples</h2>")
    if not summary.top_examples:
        body.append("<p class=\"muted\">It fires on none of the scanned rows.</p>")
    scale = summary.top_examples[0].activation if summary.top_examples else 1.0
    for example in summary.top_examples:
        view = inspection.rows[example.row]
        images = []
        for k, image in enumerate(view.images):
            values = example.patch_activations[k] if example.patch_activations is not None else None
            box = view.grids[k].box if view.grids is not None else None
            name = f"feature_{f}_row{example.row}_image{k}.png"
            heatmap_png(image, values, box, scale, folder / name)
            images.append(f"<img src=\"{name}\" alt=\"row {example.row} image {k} with feature {f}'s activation\">")
        note = f"<p class=\"note\">{_escape(view.grid_note)}</p>" if view.grid_note else ""
        title = f"Row {example.row}"
        if example.row in inspection.explanations:
            title = f"<a href=\"../examples/example_{example.row}.html\">Row {example.row}</a>"
        body.append(
            f"<div class=\"example\"><h3>{title} &middot; max activation {_escape(_number(example.activation))}</h3>"
            f"<div class=\"images\">{''.join(images)}</div>{note}"
            f"{tokens_html(view, example.token_activations, scale)}</div>"
        )
    return _page(f"Feature {f} \u00b7 SAE-V inspection", "\n".join(body), root="../")


def _example_page(explanation: ExampleExplanation, inspection: Inspection, folder: Path) -> str:
    row = explanation.row
    view = inspection.rows[row]
    contributions_png(explanation, folder / f"example_{row}_contributions.png")
    images = []
    for k, image in enumerate(view.images):
        _save_image(image, folder / f"example_{row}_image{k}.png")
        images.append(f"<img src=\"example_{row}_image{k}.png\" alt=\"row {row} image {k}\">")
    rank = inspection.score_rank(row)
    scores = _table(["score", "value"], [
        ["saev_cosine_score (sum of the contributions)", _escape(_number(explanation.cosine_score))],
        ["saev_cooccur_l0 |C(x)|", str(explanation.cooccur_l0)],
        ["saev_l0", _escape(_number(explanation.l0))],
        ["rank among scanned rows (1 = lowest)",
         f"{rank} of {len(inspection.scanned_rows)}" if rank is not None else "not scanned"],
        ["text / image positions", f"{explanation.num_text_positions} / {explanation.num_image_positions}"],
    ], numeric={1})
    reasons = "".join(f"<li>{_escape(reason)}</li>" for reason in inspection.reasons(row))
    running, rows = 0.0, []
    for c in explanation.contributions:
        running += c.contribution
        sign = "pos" if c.contribution > 0 else "neg" if c.contribution < 0 else "muted"
        rows.append([
            _feature_link(c.feature, inspection, "../features/"),
            f"<span class=\"{sign}\">{_escape(_number(c.weight))}</span>",
            _escape(_number(c.contribution)),
            _escape(_number(running)),
            _escape(_number(c.max_text_activation)),
            _escape(_number(c.max_image_activation)),
        ])
    table = (_table(["feature", "weight w_f", "contribution", "running sum", "max text act.", "max image act."], rows,
                    numeric={1, 2, 3, 4, 5})
             if rows else "<p class=\"muted\">No co-occurring feature.</p>")
    body = [
        f"<h1>Row {row}</h1>", scores,
        f"<h2>Why this score</h2><ul>{reasons}</ul>",
        f"<h2>The example</h2><div class=\"images\">{''.join(images)}</div>{tokens_html(view)}",
        f"<h2>The features behind the score</h2>"
        f"<p>C(x): features whose activation exceeds delta = {_escape(_number(explanation.delta))} at some text "
        f"position{' (special tokens count as text)' if inspection.special_as_text else ''} and at some image "
        f"position. Each adds its weight w<sub>f</sub> (0 without one); largest |w<sub>f</sub>| first. Features with a "
        f"page are linked.</p>",
        f"<p><img src=\"example_{row}_contributions.png\" alt=\"contributions to row {row}'s score\"></p>",
        table,
    ]
    return _page(f"Row {row} \u00b7 SAE-V inspection", "\n".join(body), root="../")


def _index_page(inspection: Inspection, labels: dict[int, FeatureLabel] | None = None,
                explorer_url: str | None = None) -> str:
    config = inspection.sae_config
    facts = _table(None, [
        ["model read", _escape(inspection.model_name)],
        ["SAE-V trained on", _escape(config.get("base_model_name_or_path") or "unknown")],
        ["hook layer", _escape(config.get("hook_layer"))],
        ["d_in / d_sae", f"{_escape(config.get('d_in'))} / {_escape(config.get('d_sae'))}"],
        ["activation", _escape(config.get("activation", "relu"))],
        ["co-occurrence bound delta", _escape(_number(inspection.delta))],
        ["features with a cross-modal weight", str(inspection.num_weighted_features)],
        ["dataset", _escape(inspection.dataset_name or "(in memory)")],
        ["rows scanned", str(len(inspection.scanned_rows))],
    ])
    feature_rows = []
    for f, summary in inspection.features.items():
        top = summary.top_examples[0].activation if summary.top_examples else 0.0
        feature_rows.append([
            f"<a href=\"features/feature_{f}.html\">{f}</a>",
            _escape(_number(summary.weight)),
            f"<img src=\"features/feature_{f}_profile.png\" alt=\"modality profile of feature {f}\">",
            ", ".join(f"{summary.firing_counts[n]}" for n in MODALITY_NAMES),
            _escape(_number(top)),
            _escape(summary.selected_because),
            *([label_html(labels.get(f))] if labels is not None else []),
        ])
    example_rows = []
    for row, e in inspection.explanations.items():
        first = next((c for c in e.contributions if c.contribution != 0), None)
        example_rows.append([
            f"<a href=\"examples/example_{row}.html\">{row}</a>",
            _escape(_number(e.cosine_score)),
            str(e.cooccur_l0),
            str(e.num_weighted),
            (f"{_feature_link(first.feature, inspection, 'features/')} ({_escape(_number(first.contribution))})"
             if first else "<span class=\"muted\">none</span>"),
        ])
    body = [
        "<h1>SAE-V inspection</h1>", facts,
        (f"<p><a class=\"explorer\" href=\"{_escape(explorer_url)}\">Open the explorer</a> (your own images and "
         f"prompts, steering)</p>" if explorer_url else ""),
        "<h2>Features</h2>",
        _table(["feature", "weight w_f", "modality profile", "firing: image, text, special", "top activation",
                "why listed", *(["label"] if labels is not None else [])], feature_rows, numeric={1, 4})
        if feature_rows else "<p class=\"muted\">None.</p>",
        "<h2>Explained examples (lowest cosine score first)</h2>",
        _table(["row", "cosine score", "|C(x)|", "weighted in C(x)", "largest contribution"], example_rows,
               numeric={1, 2, 3}) if example_rows else "<p class=\"muted\">None.</p>",
    ]
    return _page("SAE-V inspection", "\n".join(body))


def inspection_summary(inspection: Inspection, labels: dict[int, FeatureLabel] | None = None) -> dict[str, Any]:
    """The report's `features.json`: the SAE-V's shape, the rows scanned, and per feature its weight (None without
    one), firing counts, top examples `(row, activation)`, logit lens and label."""
    config = inspection.sae_config
    features = {}
    for f, summary in inspection.features.items():
        label = (labels or {}).get(f)
        features[str(f)] = {
            "weight": summary.weight if summary.has_weight else None,
            "firing_counts": summary.firing_counts,
            "examples_fired": summary.examples_fired,
            "examples_cooccurring": summary.examples_cooccurring,
            "selected_because": summary.selected_because,
            "top_examples": [{"row": e.row, "activation": e.activation} for e in summary.top_examples],
            "logit_lens": asdict(summary.logit_lens) if summary.logit_lens is not None else None,
            "label": asdict(label) if label is not None else None,
        }
    return {"saev": {key: config.get(key) for key in ("d_sae", "d_in", "hook_layer")},
            "model_name": inspection.model_name, "num_scanned_rows": len(inspection.scanned_rows),
            "features": features}


def write_feature_browser(inspection: Inspection, output_dir: str | Path, overwrite: bool = False,
                          labels: dict[int, FeatureLabel] | None = None, explorer_url: str | None = None) -> Path:
    """
    Write `inspection` as a static HTML report (with PNGs) to `output_dir` and return the path of its `index.html`.

    Args:
        inspection ([`Inspection`]): what [`inspect_saev`] found.
        output_dir (`str` or `Path`): the folder to write (created if needed): new, empty, or an earlier report.
        overwrite (`bool`, *optional*, defaults to `False`): write even into a folder holding other files (an
            `index.html` of another site, ...), which may be replaced.
        labels (`dict[int, FeatureLabel]`, *optional*): feature labels ([`read_labels`] of a `saev label` run) to show
            with their detection scores.
        explorer_url (`str`, *optional*): a running explorer of the same SAE-V, which the feature pages link to.

    Returns:
        `Path`: `output_dir/index.html`; open it in a browser (file://, no server needed).

    Raises:
        FileExistsError: `output_dir` holds files that no earlier report wrote, and `overwrite` is False.
    """

    output = prepare_output_dir(output_dir, "write_feature_browser", overwrite)
    (output / "features").mkdir(parents=True, exist_ok=True)
    (output / "examples").mkdir(parents=True, exist_ok=True)
    for f, summary in inspection.features.items():
        page = _feature_page(summary, inspection, output / "features", labels, explorer_url)
        (output / "features" / f"feature_{f}.html").write_text(page, encoding="utf-8")
    for row, explanation in inspection.explanations.items():
        page = _example_page(explanation, inspection, output / "examples")
        (output / "examples" / f"example_{row}.html").write_text(page, encoding="utf-8")
    index = output / "index.html"
    index.write_text(_index_page(inspection, labels, explorer_url), encoding="utf-8")
    (output / "features.json").write_text(json.dumps(inspection_summary(inspection, labels), indent=1))
    mark_output_complete(output)
    return index


def run_inspection(sae_args: SAEArguments, model_args: ModelArguments, data_args: DataArguments,
                   prompt_format: PromptFormat, args: InspectionArguments,
                   output: OutputArguments) -> tuple[Inspection, Path]:
    """
    `saev inspect`: load what the arguments name, inspect the SAE-V on the dataset and write the feature browser (see
    [`write_feature_browser`]) to `output.output_dir`. Returns `(inspection, index page)`.
    """
    data_args.check_source(model_args, "saev inspect")
    labels = read_labels(args.labels) if args.labels else None  # a bad file is refused before the model loads
    # the report is write_feature_browser's output, whether written from Python or from here
    prepare_output_dir(output.output_dir, "write_feature_browser", output.overwrite_output_dir)
    sae, model, processor, dataset = load_sources(sae_args, model_args, data_args, prompt_format.image_column)
    reader = LayerReader(model, processor, layer=sae.config.hook_layer, prompt_format=prompt_format)
    if labels is not None:
        read_labels(args.labels, sae)  # labels of another SAE-V are refused
    inspection = inspect_saev(sae, reader, dataset, args)
    index = write_feature_browser(inspection, output.output_dir, overwrite=output.overwrite_output_dir,
                                  labels=labels, explorer_url=args.explorer_url)
    data_args.write_fetch_report(output.output_dir)
    return inspection, index
