"""The options every command shares, each declared once, as TRL's `ModelConfig` and `ScriptArguments` are: which SAE-V
([`SAEArguments`]), which MLLM and where it runs ([`ModelArguments`]) and which data ([`DataArguments`]); where the
result goes is [`saev_hf.runtime.folders.OutputArguments`]. A command composes the ones it needs with its own (`saev score` parses
`SAEArguments, ModelArguments, DataArguments, PromptFormat, ScorerArguments, MapArguments, OutputArguments`), and each
has the one loader behind every command (`.load()`).

```python
sae = SAEArguments("PKU-Alignment/SAE-V", sae_subfolder="SAEV_LLaVA_NeXT-7b_OBELICS").load()
model, processor = ModelArguments("llava-hf/llava-v1.6-mistral-7b-hf", model_dtype="bfloat16").load()
dataset = DataArguments("openbmb/RLAIF-V-Dataset").load()
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from .activations.mllm import MODEL_DTYPES, check_model_dtype, load_model_and_processor
from .activations.reader import layer_device
from .data.images import undecoded_images
from .data.layouts import LAYOUTS, MISSING_PREFERENCE_POLICIES, check_layout, to_trl_layout
from .data.loading import load_dataset_split
from .data.urls import IMAGE_FAILURE_POLICIES, REPORT_FILE, FetchReport, FetchSettings, ImageFetcher, fetch_images
from .model.modeling import SAEV
from .runtime.devices import choose_device

logger = logging.getLogger(__name__)


@dataclass
class SAEArguments:
    """The SAE-V a command uses, in either checkpoint layout (saev-hf's or SAELens'), and its co-occurrence bound."""

    sae_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub repo id of the SAE-V (saev-hf or SAELens layout). Required, except by "
                  "`saev score` asked for baselines alone."},
    )
    sae_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of the SAE-V repo holding it."})
    sae_revision: str | None = field(default=None, metadata={"help": "Revision of the SAE-V repo on the Hub."})
    cooccurrence_threshold: float | None = field(
        default=None,
        metadata={"help": "Set the SAE-V's co-occurrence bound delta (recorded in its config, with where it came "
                  "from). Default: the SAE-V's own (the paper's 1.0 unless set or calibrated)."},
    )

    def load(self) -> SAEV:
        """The SAE-V, with the co-occurrence bound these arguments set."""
        if self.sae_name_or_path is None:
            raise ValueError("sae_name_or_path is required: the SAE-V to use (--sae_name_or_path FOLDER_OR_REPO).")
        sae = SAEV.from_pretrained(self.sae_name_or_path, subfolder=self.sae_subfolder, revision=self.sae_revision)
        if self.cooccurrence_threshold is not None:
            sae.set_cooccurrence_threshold(self.cooccurrence_threshold,
                                           info={"method": "set with --cooccurrence_threshold"})
        return sae


@dataclass
class ModelArguments:
    """The MLLM a command reads (or a text-only causal LM, for a plain SAE), how it is loaded and where it runs."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub repo id or local folder of the MLLM (an image-text-to-text model; a text-only causal LM "
                  "for a plain SAE). Not needed with an activation cache."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the MLLM on the Hub."})
    model_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype the MLLM is loaded in, one of {MODEL_DTYPES}. 'auto' keeps the checkpoint's own "
                  f"(bfloat16 for most released MLLMs: half the memory of float32) where the model is read; `saev "
                  f"dpo` trains float32 weights for 'auto' (mixed precision is its --bf16). An SAE-V itself trains "
                  f"and encodes in its own dtype.", "choices": MODEL_DTYPES},
    )
    device: str = field(
        default="auto",
        metadata={"help": "Where the MLLM runs, and the SAE-V with the layer it reads: 'auto' (the accelerator of this "
                  "process if there is one, else the CPU), 'cpu', 'cuda:1', ... With an activation cache, where the "
                  "SAE-V runs. `saev train` takes 'auto' or 'cpu' (several GPUs: torchrun or accelerate launch)."},
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "Place the MLLM while it loads, as transformers' from_pretrained(device_map=...): 'auto' "
                  "spreads a model too large for one GPU over the GPUs (and the CPU). The SAE-V goes on the device of "
                  "the layer it reads. Give device or device_map, not both."},
    )

    def __post_init__(self) -> None:
        check_model_dtype(self.model_dtype)
        if self.device_map is not None and self.device not in ("auto", None):
            raise ValueError(f"Give either device={self.device!r} (the whole model on one device) or "
                             f"device_map={self.device_map!r} (placed while it loads), not both.")

    def load(self, device: torch.device | str | None = None):
        """`(model, processor)`: the MLLM in `model_dtype` (eval mode), placed by `device_map`, or on `device` (this
        call's, else these arguments' `device`)."""
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required: the MLLM to read (--model_name_or_path NAME_OR_FOLDER).")
        place = None if self.device_map is not None else choose_device(device if device is not None else self.device)
        return load_model_and_processor(self.model_name_or_path, revision=self.model_revision, dtype=self.model_dtype,
                                        device=place, device_map=self.device_map)


@dataclass
class DataArguments:
    """The dataset a command reads (a Hub dataset or a folder) and its layout, or an activation cache that stands in
    for the MLLM and the dataset; and how images given as URLs are fetched."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, a folder written by Dataset.save_to_disk, or anything load_dataset reads."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the dataset."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it whole (`saev train`, `cache`, and `weights` "
                  "with num_examples): rows are read in order."},
    )
    dataset_layout: str = field(
        default="trl",
        metadata={"help": "How the dataset's rows are laid out: 'trl' (images, prompt, chosen, rejected, or the "
                  "columns the column options name), 'rlaif_v' (openbmb/RLAIF-V-Dataset), 'align_anything' "
                  "(PKU-Alignment/align-anything, text-image-to-text: chosen and rejected from overall_response), "
                  "'obelics' (HuggingFaceM4/OBELICS: interleaved documents, images as URLs). Every layout is read "
                  "into TRL's (see saev_hf.data.layouts).", "choices": LAYOUTS},
    )
    missing_preference: str = field(
        default="error",
        metadata={"help": "A row whose preference is missing or a tie (align_anything's overall_response not 1 or 2): "
                  "'error' names the row, 'drop' leaves it out and counts it.", "choices": MISSING_PREFERENCE_POLICIES},
    )
    image_failure_policy: str = field(
        default="error",
        metadata={"help": "An image URL that cannot be fetched: 'error' names the row and the URL, 'skip_image' leaves "
                  "the image out (a document keeps its text), 'skip_row' leaves the row out. Counts and a sample of "
                  f"failed URLs go to {REPORT_FILE} beside the output.", "choices": IMAGE_FAILURE_POLICIES},
    )
    image_fetch_workers: int = field(default=16, metadata={"help": "Image URLs fetched at once (threads)."})
    image_fetch_timeout: float = field(
        default=20.0, metadata={"help": "Seconds to wait for an image URL's server (to read; 5 s to connect)."})
    image_fetch_retries: int = field(
        default=2, metadata={"help": "Retries of an image URL after a failure that may pass (timeout, 5xx, cut "
                                     "body), with exponential backoff."})
    image_max_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "Largest image fetched from a URL."})
    image_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where fetched images are kept, by content (default: $SAEV_HF_IMAGE_CACHE, else "
                  "$HF_HOME/saev_hf/images): a rerun fetches nothing again."},
    )
    allow_private_urls: bool = field(
        default=False,
        metadata={"help": "Fetch image URLs that point to loopback or private addresses (refused by default: a "
                  "dataset can be crafted to reach inside a network)."},
    )
    activation_cache: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub repo of an activation cache (`saev cache`) to read instead of running the "
                  "MLLM over the dataset (`saev train`, `weights`, `eval`): model_name_or_path and dataset_name are "
                  "then not given."},
    )

    def __post_init__(self) -> None:
        check_layout(self.dataset_layout)
        if self.missing_preference not in MISSING_PREFERENCE_POLICIES:
            raise ValueError(f"missing_preference={self.missing_preference!r} must be one of "
                             f"{MISSING_PREFERENCE_POLICIES}.")
        if self.image_failure_policy not in IMAGE_FAILURE_POLICIES:
            raise ValueError(f"image_failure_policy={self.image_failure_policy!r} must be one of "
                             f"{IMAGE_FAILURE_POLICIES}.")
        self.fetch_settings  # checks the fetching settings
        self.fetch_report: FetchReport | None = None  # set by load() when the data had image URLs

    @property
    def fetch_settings(self) -> FetchSettings:
        """The image fetcher's settings these arguments give."""
        return FetchSettings(workers=self.image_fetch_workers, read_timeout=self.image_fetch_timeout,
                             retries=self.image_fetch_retries, max_bytes=self.image_max_bytes,
                             cache_dir=self.image_cache_dir, allow_private_urls=self.allow_private_urls)

    def load(self, image_column: str | None = None, fetch_column: str = "images"):
        """
        The dataset split, in TRL's layout ([`to_trl_layout`]), the image URLs of `image_column` (else of
        `fetch_column`) fetched into the image cache ([`fetch_images`]; the live report in `self.fetch_report`); with
        `image_column`, that column's images are left undecoded, so that a corrupt image is an error naming its row
        rather than a failure inside `datasets` ([`undecoded_images`]).
        """
        if self.dataset_name is None:
            raise ValueError("dataset_name is required: the data to read (--dataset_name NAME_OR_FOLDER).")
        column = image_column or fetch_column
        self.check_columns(column)
        dataset = load_dataset_split(self.dataset_name, self.dataset_config, self.dataset_split, self.streaming)
        dataset = to_trl_layout(dataset, self.dataset_layout, self.missing_preference)
        if _holds_urls(dataset, column, self.dataset_layout):
            dataset, self.fetch_report = fetch_images(dataset, column, ImageFetcher(self.fetch_settings),
                                                      self.image_failure_policy)
        return undecoded_images(dataset, image_column)[0] if image_column else dataset

    def check_columns(self, image_column: str | None, prompt_column: str = "prompt") -> None:
        """Refuse column options that a layout other than 'trl' contradicts: it writes TRL's columns."""
        if self.dataset_layout == "trl":
            return
        for option, column, expected in (("image_column", image_column, "images"),
                                         ("prompt_column", prompt_column, "prompt")):
            if column not in (None, expected):
                raise ValueError(f"dataset_layout={self.dataset_layout!r} reads the rows into TRL's layout, whose "
                                 f"{expected} are in `{expected}`, but {option}={column!r}. Leave the column options "
                                 f"at their defaults with a layout other than 'trl'.")

    def write_fetch_report(self, folder: str | None) -> None:
        """Write the image fetching report (if the data had image URLs) beside the output in `folder`, and log it."""
        if self.fetch_report is None or not self.fetch_report.merged().urls:
            return
        logger.warning(self.fetch_report.summary())
        if folder is not None:
            self.fetch_report.write(folder)

    @property
    def description(self) -> str | None:
        """The dataset as a provenance record names it: `name` or `name:config`."""
        if self.dataset_name is None:
            return None
        return self.dataset_name + (f":{self.dataset_config}" if self.dataset_config else "")

    def check_source(self, model: ModelArguments, command: str, cache_allowed: bool = False) -> None:
        """Refuse what `command` cannot read: with an activation cache (where `cache_allowed`), neither an MLLM name
        nor a dataset; without one, both."""
        if self.activation_cache is not None:
            if not cache_allowed:
                raise ValueError(f"activation_cache is read by `saev train`, `weights` and `eval`; `{command}` runs "
                                 f"the MLLM on the rows. Give model_name_or_path and dataset_name instead.")
            given = [name for name, value in (("model_name_or_path", model.model_name_or_path),
                                              ("dataset_name", self.dataset_name)) if value is not None]
            if given:
                raise ValueError(f"activation_cache={self.activation_cache!r} stands in for the MLLM and the dataset: "
                                 f"drop {' and '.join(given)}, or drop activation_cache.")
            if model.device_map is not None:
                raise ValueError(f"device_map={model.device_map!r} places the MLLM, but activation_cache="
                                 f"{self.activation_cache!r} stands in for it. Drop device_map (--device names where "
                                 f"the SAE-V runs).")
            return
        missing = [name for name, value in (("model_name_or_path", model.model_name_or_path),
                                            ("dataset_name", self.dataset_name)) if value is None]
        if missing:
            alternative = ", or an activation cache of them (--activation_cache)" if cache_allowed else ""
            raise ValueError(f"{' and '.join(missing)} required: the MLLM the SAE-V reads and the dataset "
                             f"(--{' --'.join(missing)}){alternative}.")


def _holds_urls(dataset: Any, column: str, layout: str) -> bool:
    """Whether `column` holds image URLs to fetch: a column of strings (or lists of them), or an OBELICS document's."""
    if layout == "obelics":
        return True
    feature = (getattr(dataset, "features", None) or {}).get(column)
    while feature is not None and hasattr(feature, "feature"):  # List, Sequence
        feature = feature.feature
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def load_sources(sae: SAEArguments | None, model: ModelArguments, data: DataArguments, image_column: str | None = None,
                 fetch_column: str = "images"):
    """`(sae, model, processor, dataset)` for a command that runs the MLLM over a dataset: the SAE-V on the device of
    the layer it reads (None without `sae`), the MLLM as `model` says, the dataset with `image_column` undecoded ([`DataArguments.load`])."""
    loaded_sae = sae.load() if sae is not None else None
    loaded_model, processor = model.load()
    if loaded_sae is not None:
        loaded_sae.to(layer_device(loaded_model, loaded_sae.config.hook_layer))
    return loaded_sae, loaded_model, processor, data.load(image_column, fetch_column)

