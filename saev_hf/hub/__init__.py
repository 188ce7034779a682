"""Publishing SAE-V artefacts on the Hugging Face Hub, each with a card that says where it came from.

- [`saev_model_card`]: the model card of an SAE-V: base model and revision, layer, sizes, training data, evaluation
  metrics (an [`evaluate_saev`] dict, as a table), where its cross-modal feature weights came from, a usage snippet,
  license and citation.
- [`filtered_dataset_card`]: the card of a dataset filtered by an SAE-V score: source dataset and revision, the SAE-V
  and the score, the kept fraction or threshold, rows before and after, and the score distribution (summary
  statistics and a text histogram; with matplotlib, a PNG histogram uploaded next to the data).
- [`push_saev`]: the SAE-V's weights, config and card in one commit.
- [`push_filtered_dataset`]: `Dataset.push_to_hub`, then the card (and histogram) in a second commit.
- [`push_activation_cache`]: an activation cache (`saev cache`) as a dataset repo, with its card
  ([`activation_cache_card`]), in one commit; `saev_hf.cache.ActivationCache(repo_id)` reads it back.

The cards are Jinja templates, package data in `saev_hf/hub/card_templates/`, rendered with huggingface_hub's
`ModelCard.from_template` / `DatasetCard.from_template`, so that their YAML metadata is what the Hub expects.

One concept a file: `templates` (the templates, shared metadata and formatting), `model_card`, `dataset_card`,
`histograms` (text and PNG score histograms), `push` (the uploads), `push_command` (`saev push`).

Metadata choices: models get `library_name: saev-hf` (not `transformers`: the Hub would then offer an
`AutoModel.from_pretrained` snippet that fails unless `saev_hf` is imported first, which registers the `saev` model
type; SAELens checkpoints on the Hub likewise say `library_name: saelens`), the tags `saev`, `sparse-autoencoder`,
`interpretability` and `multimodal`, `base_model` (the MLLM it reads) and `datasets` (training and weighting data) when
they are Hub repo ids. No `pipeline_tag`: an SAE-V is not a pipeline the Hub can run. Filtered datasets get
`source_datasets: [extended|<source>]` (the datasets convention for data derived from another dataset),
`task_categories` (`image-text-to-text` by default), `size_categories` and the tags `saev` and `data-filtering`.
"""

from .dataset_card import filtered_dataset_card
from .histograms import score_histogram_png, text_histogram
from .model_card import saev_model_card
from .push import activation_cache_card, load_saev_config, push_activation_cache, push_filtered_dataset, push_saev
from .push_command import PushArguments, read_metrics_json, run_push
from .templates import CITATION, DATASET_CARD_TEMPLATE, HISTOGRAM_FILE, MODEL_CARD_TEMPLATE, template_text

__all__ = [
    "CITATION",
    "DATASET_CARD_TEMPLATE",
    "HISTOGRAM_FILE",
    "MODEL_CARD_TEMPLATE",
    "PushArguments",
    "activation_cache_card",
    "filtered_dataset_card",
    "load_saev_config",
    "push_activation_cache",
    "push_filtered_dataset",
    "push_saev",
    "read_metrics_json",
    "run_push",
    "saev_model_card",
    "score_histogram_png",
    "template_text",
    "text_histogram",
]
