"""What the Hub cards are made of: their Jinja templates (package data in `saev_hf/hub/card_templates/`), the metadata
they share (tags, citation, links) and the helpers that format values for them.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import Any, Sequence

import numpy as np

TEMPLATES_FOLDER = "card_templates"
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


def template_text(name: str) -> str:
    """The Jinja template `name` (`MODEL_CARD_TEMPLATE` or `DATASET_CARD_TEMPLATE`), package data of `saev_hf.hub`."""
    resource = importlib.resources.files(__package__).joinpath(TEMPLATES_FOLDER, name)
    if not resource.is_file():
        raise FileNotFoundError(f"Card template {name!r} is not among saev_hf.hub's templates; use "
                                f"{MODEL_CARD_TEMPLATE!r} or {DATASET_CARD_TEMPLATE!r}.")
    return resource.read_text(encoding="utf-8")


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (`org/name`, not a local folder), else None: metadata wants repo ids."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def dataset_id(name: str | None) -> str | None:
    # Training records a dataset as "name" or "name:config".
    return name.split(":", 1)[0] if name else None


def link(name: str | None, kind: str, display: str | None = None) -> str | None:
    """Markdown for `name`: a link to its Hub page when it is a repo id, else the name as code."""
    if not name:
        return None
    repo = hub_id(dataset_id(name) if kind == "dataset" else name)
    text = f"`{display or name}`"
    if repo is None:
        return text
    prefix = "datasets/" if kind == "dataset" else ""
    return f"[{text}](https://huggingface.co/{prefix}{repo})"


def finite(values: Sequence[Any] | None) -> np.ndarray:
    if values is None:
        return np.array([], dtype=np.float64)
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def number(value: float) -> str:
    return f"{float(value) + 0.0:.4g}"  # + 0.0 prints -0.0 as 0


def count(value: int | None) -> str | None:
    return None if value is None else f"{int(value):,}"


def ratio(d_sae: int, d_in: int) -> str:
    return f"{d_sae // d_in}" if d_sae % d_in == 0 else f"{d_sae / d_in:.2f}"


def size_category(rows: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1B")
