"""Reading an activation cache where a [`LayerReader`] reads the MLLM: [`CacheReader`] hands the activation buffer,
the feature weighting and the evaluation the cached activations of the rows they ask for, so that each computes what
it computes reading the MLLM."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import datasets
import torch

from ..activations.reader import LayerActivations, Modality, check_same_device
from ..data.batching import is_indexable
from ..data.pipeline import PreparedBatch
from ..data.prompts import PromptFormat
from .activation_cache import ActivationCache


class CacheReader:
    """
    Stands in for a [`LayerReader`] wherever activations of dataset rows are read: in an [`ActivationBuffer`]
    (training), in [`compute_feature_weights`] and in [`evaluate_saev`], over the cache's [`cached_rows`]. Reading a
    batch of row indices gives the cached activations of those rows as a right-padded [`LayerActivations`] (positions
    not cached are PAD), so each of them computes what it computes reading the MLLM: bit-identical with a float32
    cache whose `read_batch_size` is the forward batch size of the run it stands in for (the same padding).

    Args:
        cache ([`ActivationCache`]): the cache.
        device (`str` or `torch.device`, defaults to `"cpu"`): where the activations are put (the SAE-V's device).
    """

    def __init__(self, cache: ActivationCache, device: str | torch.device = "cpu") -> None:
        self.cache = cache
        self.layer = cache.layer
        self.device = torch.device(device)
        self.model = None
        self.prompt_format = PromptFormat(**cache.manifest["arguments"]["prompt_format"])

    @property
    def hidden_size(self) -> int:
        """Width of the cached activations."""
        return self.cache.d_in

    @property
    def include_special_tokens(self) -> bool:
        """Whether the cache holds the special/template tokens."""
        return bool(self.cache.manifest["include_special_tokens"])

    def check_sae(self, sae: Any) -> None:
        """Refuse an SAE-V not made for the cached layer's width and index, or not on this reader's device."""
        where = f"the activation cache {str(self.cache.path)!r}"
        if sae.config.d_in != self.hidden_size:
            raise ValueError(f"The SAE-V reads d_in={sae.config.d_in} but {where} holds activations of width "
                             f"{self.hidden_size} ({self.cache.manifest['model_name_or_path']}). Use an SAE-V trained "
                             f"on that model, or a cache of its model.")
        if sae.config.hook_layer is not None and sae.config.hook_layer != self.layer:
            raise ValueError(f"The SAE-V was trained on layer {sae.config.hook_layer} but {where} holds layer "
                             f"{self.layer}. Cache layer {sae.config.hook_layer} (`saev cache --layer "
                             f"{sae.config.hook_layer}`).")
        made_for, cached = sae.config.base_model_name_or_path, self.cache.manifest.get("model_name_or_path")
        if made_for and cached and _model_name(made_for) != _model_name(cached):
            raise ValueError(f"The SAE-V was made for {made_for!r} but {where} holds the activations of {cached!r}: "
                             f"an SAE-V reads the model it was trained on. Use a cache of {made_for!r} (`saev cache "
                             f"--model_name_or_path {made_for}`); if the two name the same model (a local copy), set "
                             f"sae.config.base_model_name_or_path = {cached!r}.")
        check_same_device(sae, self.device, f"{where}'s reader (CacheReader(cache, device=...))")

    def check_rows(self, dataset: Any) -> None:
        """Refuse a dataset whose rows are not the cache's: it must have the cache's number of rows (its
        [`cached_rows`], or the dataset the cache was made from)."""
        if not is_indexable(dataset) or len(dataset) != self.cache.num_rows:
            size = f"{len(dataset)} rows" if is_indexable(dataset) else f"a stream ({type(dataset).__name__})"
            raise ValueError(f"Reading from the activation cache {str(self.cache.path)!r} ({self.cache.num_rows} "
                             f"rows), the dataset must be its rows, but it is {size}. Pass cached_rows(cache).")

    def prepared_batches(self, dataset: Any, batch_size: int,
                         indices: Sequence[int] | None = None) -> Iterator[PreparedBatch]:
        """The rows at `indices` (positions of `dataset`, which are cache rows: see [`check_rows`]) in batches of
        `batch_size`, as [`prepared_batches`] hands them to a [`LayerReader`]: each batch's inputs are its row
        indices, which [`read_inputs`] reads (nothing to prepare, so no workers)."""
        self.check_rows(dataset)
        order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield PreparedBatch(positions=rows, rows=rows, inputs={"row": rows})

    def read_inputs(self, inputs: dict[str, Sequence[int]]) -> LayerActivations:
        """The cached activations of a prepared batch (see [`prepared_batches`])."""
        return self.read(inputs)

    def read(self, rows: dict[str, Sequence[int]], first_row: int | Sequence[int] = 0) -> LayerActivations:
        """The cached tokens of rows `rows["row"]` (dataset indices, a batch of [`cached_rows`]), right-padded, on
        `device`; positions not cached are PAD."""
        parts = self.cache.rows([int(row) for row in rows["row"]])
        length = max([int(part["position"].max()) + 1 for part in parts if len(part["position"])], default=1)
        hidden = torch.zeros(len(parts), length, self.cache.d_in)
        modality = torch.full((len(parts), length), int(Modality.PAD), dtype=torch.int8)
        for j, part in enumerate(parts):
            positions = part["position"].long()
            hidden[j, positions] = part["activations"]
            modality[j, positions] = part["modality"]
        return LayerActivations(hidden_states=hidden.to(self.device), modality=modality,
                                input_ids=torch.zeros(len(parts), length, dtype=torch.long), layer=self.layer)


def _model_name(name_or_path: str) -> str:
    """A model's name for comparison: a Hub repo id and a folder of the same name (a local copy, a snapshot) agree."""
    return str(name_or_path).rstrip("/").rsplit("/", 1)[-1]


def cached_rows(cache: ActivationCache):
    """The cache's rows as the dataset an [`ActivationBuffer`] reads with a [`CacheReader`]: a `datasets.Dataset`
    with one column, ``row`` (the dataset indices), so that batching and `split_dataset_by_node` work as on any
    dataset."""
    return datasets.Dataset.from_dict({"row": list(range(cache.num_rows))})
