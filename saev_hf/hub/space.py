"""The explorer as a Hugging Face Space: [`write_space`] writes the folder (`app.py` serving
`saev_hf.interpret.explorer` on an SAE-V and an MLLM from the Hub, `requirements.txt`, a README with the Space's
metadata), [`push_space`] uploads it (`saev push --space`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from huggingface_hub import HfApi

from .._version import __version__
from ..interpret.labels import read_labels

# ---------------------------------------------------------------------------------------------------------------------

SPACE_APP = '''"""SAE-V explorer for {sae} on {model}: a Gradio app from saev-hf (`saev explore`), written by `saev push --space`."""

from saev_hf.arguments import ModelArguments, SAEArguments
from saev_hf.interpret.explorer import ExploreArguments, build_explorer, load_explorer

explorer = load_explorer(
    SAEArguments(sae_name_or_path={sae!r}, sae_revision={sae_revision!r}),
    ModelArguments(model_name_or_path={model!r}, model_revision={model_revision!r}),
    ExploreArguments(labels={labels!r}, top_k={top_k!r}, max_new_tokens={max_new_tokens!r}),
)
demo = build_explorer(explorer)

if __name__ == "__main__":
    demo.launch()  # a Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
'''


def write_space(folder: str | Path, sae: str, model: str, sae_revision: str | None = None,
                model_revision: str | None = None, labels_file: str | Path | None = None, top_k: int = 12,
                max_new_tokens: int = 30, title: str | None = None) -> Path:
    """
    Write the explorer as a Hugging Face Space folder: `app.py` (loads `sae` and `model` from the Hub and serves the
    app), `requirements.txt` (this saev-hf with its explorer extra), `README.md` (the Space's metadata: Gradio SDK and
    version, `app.py`, the SAE-V and model repos under `models`), and `labels.json` when `labels_file` is given.

    Raises:
        FileExistsError: `folder` holds files that are not a Space's.
    """
    import gradio

    folder = Path(folder)
    own = {"app.py", "requirements.txt", "README.md", "labels.json"}
    if folder.exists() and any(p.name not in own for p in folder.iterdir()):
        raise FileExistsError(f"{folder} holds files that are not a Space's ({sorted(p.name for p in folder.iterdir() if p.name not in own)}): "
                              f"write the Space to a new or empty folder.")
    folder.mkdir(parents=True, exist_ok=True)
    labels = None
    if labels_file is not None:
        read_labels(labels_file)  # refuse a malformed file before it ships
        (folder / "labels.json").write_text(Path(labels_file).read_text())
        labels = "labels.json"
    (folder / "app.py").write_text(SPACE_APP.format(sae=sae, model=model, sae_revision=sae_revision,
                                                    model_revision=model_revision, labels=labels, top_k=top_k,
                                                    max_new_tokens=max_new_tokens))
    requirement = f"saev-hf[explorer]=={__version__}"
    (folder / "requirements.txt").write_text(requirement + "\n")
    title = title or f"SAE-V explorer: {sae.split('/')[-1]}"
    metadata = {"title": title[:60], "emoji": "\U0001f50d", "colorFrom": "indigo", "colorTo": "yellow",
                "sdk": "gradio", "sdk_version": gradio.__version__, "app_file": "app.py", "pinned": False,
                "models": [sae, model], "tags": ["saev-hf", "sae-v", "sparse-autoencoder", "interpretability"]}
    card = (f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
            f"An interactive explorer of the SAE-V [{sae}](https://huggingface.co/{sae}) on "
            f"[{model}](https://huggingface.co/{model}), made with [saev-hf](https://github.com/saev-hf/saev-hf) "
            f"(`saev explore`). Upload an image and type a prompt to see which features fire where, the SAE-V "
            f"scores of the input and why, each feature's logit lens{' and label' if labels else ''}, and steer the "
            f"model by clamping features.\n\nRun it locally: `pip install -r requirements.txt && python app.py`.\n")
    (folder / "README.md").write_text(card)
    return folder


def push_space(repo_id: str, sae: str, model: str, sae_revision: str | None = None, model_revision: str | None = None,
               labels_file: str | Path | None = None, private: bool = False, commit_message: str | None = None,
               token: str | None = None, **app_options):
    """Write the explorer Space for `sae` on `model` ([`write_space`]) and upload it to the Space `repo_id` (created,
    with the Gradio SDK, if needed) in one commit; returns the commit info."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        write_space(folder, sae, model, sae_revision=sae_revision, model_revision=model_revision,
                    labels_file=labels_file, **app_options)
        return api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder,
                                 commit_message=commit_message or f"SAE-V explorer for {sae} on {model}")
