"""Pushing to the Hub: an SAE-V with its model card in one commit, a filtered dataset with its card and histogram."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import TYPE_CHECKING, Any, Sequence

from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi, ModelCard

from ..cache.activation_cache import MANIFEST_NAME, ActivationCache
from ..model import saelens
from ..model.config import SAEVConfig
from .dataset_card import filtered_dataset_card
from .histograms import score_histogram_png
from .model_card import saev_model_card
from .templates import HISTOGRAM_FILE, PROJECT_URL

if TYPE_CHECKING:
    from ..model.config import SAEVConfig
    from ..model.modeling import SAEV


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
    histogram: bool | None = None,
    split: str = "train",
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    **card_arguments: Any,
):
    """
    Push a filtered dataset with `Dataset.push_to_hub`, then its card and a PNG histogram of the scores in a second
    commit. `card_arguments` are those of [`filtered_dataset_card`] (`source_dataset=` is required; `repo_id` and
    `histogram_file` are set here).

    The card keeps the `configs` and `dataset_info` metadata that `datasets` wrote, so `load_dataset(repo_id)` reads
    the data as usual. `histogram`: True uploads `score_histogram.png` (needs matplotlib), False does not, None does
    when matplotlib is installed; the card's text histogram is there either way.

    Returns:
        `huggingface_hub.CommitInfo` of the card's commit.
    """
    if histogram is None:
        histogram = importlib.util.find_spec("matplotlib") is not None
    card = filtered_dataset_card(dataset, repo_id=repo_id, histogram_file=HISTOGRAM_FILE if histogram else None,
                                 **card_arguments)
    card.validate(repo_type="dataset")  # before the upload: a bad card fails early
    png = None
    if histogram:
        filter_args, scored = card_arguments.get("filter_args"), card_arguments.get("scored")
        column = (filter_args.column if filter_args is not None
                  else card_arguments.get("column") or "saev_cosine_score")
        png = score_histogram_png((scored if scored is not None else dataset)[column], dataset[column], column)

    dataset.push_to_hub(repo_id, split=split, private=private, token=token,
                        commit_message=commit_message or "Upload SAE-V filtered dataset")
    # `datasets` wrote a README whose metadata says where the data files are; the card keeps those entries.
    written = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    for key in ("configs", "dataset_info"):
        if key in written.data:
            card.data[key] = written.data[key]

    operations = [CommitOperationAdd("README.md", str(card).encode("utf-8"))]
    if png is not None:
        operations.append(CommitOperationAdd(HISTOGRAM_FILE, png))
    return HfApi(token=token).create_commit(repo_id, operations=operations, repo_type="dataset",
                                            commit_message="Add the SAE-V dataset card and score histogram")


def activation_cache_card(cache: Any, repo_id: str, license: str | None = None,
                          tags: Sequence[str] = ()) -> DatasetCard:
    """The dataset card of an activation cache: what it was read from, its shapes and files, and how to read it."""

    manifest = cache.manifest
    data = DatasetCardData(license=license, tags=["saev", "activation-cache", *tags])
    modalities = ", ".join(f"{value} = {name}" for name, value in manifest["modalities"].items())
    text = f"""---
{data.to_yaml()}
---

# Activation cache: layer {cache.layer} of {manifest['model_name_or_path']}

Residual-stream activations of decoder layer {cache.layer} of `{manifest['model_name_or_path']}`, read by
[saev-hf]({PROJECT_URL})'s `saev cache` over `{manifest['dataset_name']}` (split
`{manifest['arguments']['dataset_split']}`): {cache.num_tokens} tokens of {cache.num_rows} rows, d_in = {cache.d_in},
stored in {manifest['storage_dtype']}, in {len(cache.shards)} safetensors shards of at most
{manifest['arguments']['shard_size_tokens']} tokens; special tokens {'included' if manifest['include_special_tokens']
else 'excluded'}.

Each shard holds `activations` (tokens, d_in), `modality` (int8: {modalities}), `row` (the dataset row) and `position`
(the token's position in the row). `cache_manifest.json` records the arguments that made the cache and its shards.

```python
from saev_hf.cache import ActivationCache

cache = ActivationCache("{repo_id}")  # downloads the shards
for batch in cache.batches(4096, shuffle=True, seed=0):
    ...
```

Train an SAE-V on it: `saev train --activation_cache <local copy> --layer {cache.layer} ...`.
"""
    return DatasetCard(text)


def push_activation_cache(
    path: str | os.PathLike,
    repo_id: str,
    *,
    license: str | None = None,
    tags: Sequence[str] = (),
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
):
    """
    Push a finished activation cache (written by `saev cache`) to the dataset repo `repo_id` with its dataset card
    ([`activation_cache_card`]), in one `upload_folder` commit of the manifest and the shards. The repo is created if
    needed. Read it back with `ActivationCache(repo_id)`.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.

    Raises:
        ValueError: `path` holds no activation cache, or an unfinished one.
    """

    cache = ActivationCache(path)
    card = activation_cache_card(cache, repo_id, license=license, tags=tags)
    card.validate(repo_type="dataset")  # before the upload: a bad card fails early
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        # the folder to upload: the card, and links to the manifest and the shards (never copies of them)
        card.save(os.path.join(folder, "README.md"))
        for name in [MANIFEST_NAME] + [shard["file"] for shard in cache.shards]:
            os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(folder, name))
        return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder,
                                 commit_message=commit_message or "Upload SAE-V activation cache")


def load_saev_config(name_or_path: str, subfolder: str | None = None, revision: str | None = None) -> SAEVConfig:
    """The [`SAEVConfig`] of an SAE-V checkpoint (either layout, folder or Hub repo), without loading its weights."""

    kwargs = {k: v for k, v in (("subfolder", subfolder), ("revision", revision)) if v is not None}
    if saelens.detect_layout(name_or_path, **kwargs) == "saelens":
        return saelens.read_saelens_config(name_or_path, **kwargs)
    return SAEVConfig.from_pretrained(name_or_path, **kwargs)
