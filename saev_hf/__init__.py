"""saev-hf: SAE-V multimodal sparse autoencoders for interpreting MLLMs and filtering their data, on Hugging Face.

`import saev_hf` registers the `"saev"` model type with transformers' Auto classes, so that
`AutoConfig.from_pretrained` and `AutoModel.from_pretrained` load SAE-V checkpoints without `trust_remote_code`.
It stays light: heavy optional stacks (TRL, PEFT) are imported only by the parts that use them.

The package is laid out by the stages of the method, in the order data flows through them; each subpackage imports
only those before it:

| stage | subpackage | what it holds |
|---|---|---|
| plumbing | `runtime` | devices, processes, output folders, progress bars |
| the SAE-V | `model` | `SAEVConfig`, `SAEV`, the SAELens layout, the co-occurrence bound |
| rows | `data` | loading a split, images, prompts with the chat template, the input pipeline |
| layer L | `activations` | loading the MLLM, `LayerReader` (hidden states with a modality per position) |
| what to read | `arguments` | `SAEArguments`, `ModelArguments`, `DataArguments`: the options every command shares |
| kept on disk | `cache` | the activation cache: writer, reader |
| training | `training` | `SAEVTrainingArguments`, `SAEVTrainer`, sweeps, checkpoints |
| measuring | `evaluation` | L0, MSE, explained variance, CE-loss-recovered |
| Algorithm 1, stages 1-2 | `weighting` | cross-modal feature weights, the calibrated delta |
| Algorithms 1-3, stage 3 | `scoring` | `SAEVScorer`, a `datasets.map` function |
| after scoring | `alignment` | `filter_by_score`, DPO / SFT with TRL |
| Algorithms 4-7 | `patches` | image patches scored and masked |
| interpretation | `interpret` | top examples, explanations of a score, the feature browser |
| publishing | `hub` | model and dataset cards, pushes |
| the command | `cli` | `saev COMMAND`, one library call each |

`saev_hf.demo` (the grounded miniature behind `saev demo`) and `saev_hf.testing` (tiny offline models for tests) are
never imported by any of these.
"""

from transformers import AutoConfig, AutoModel

from ._version import __version__
from .activations import LayerActivations, LayerReader, Modality
from .alignment import FilterArguments, filter_by_score
from .arguments import DataArguments, ModelArguments, SAEArguments
from .cache import ActivationCache, CacheArguments, cache_activations
from .data import PromptFormat, RowError
from .evaluation import SAEVEvaluationArguments, evaluate_saev, format_metrics_table
from .hub import filtered_dataset_card, push_filtered_dataset, push_saev, saev_model_card
from .interpret import (
                        ExampleExplanation,
                        FeatureSummary,
                        Inspection,
                        InspectionArguments,
                        explain_rows,
                        inspect_saev,
                        write_feature_browser,
)
from .model import SAEV, SAEVConfig, SAEVOutput
from .patches import PatchFilter, PatchFilterArguments, PatchLocator
from .runtime import OutputArguments, disable_progress_bars, enable_progress_bars, end_distributed
from .scoring import SAEVScorer, ScorerArguments, score_dataset
from .training import SAEVRun, SAEVTrainer, SAEVTrainingArguments, train_saev, train_saevs
from .weighting import WeightingArguments, compute_feature_weights

AutoConfig.register(SAEVConfig.model_type, SAEVConfig, exist_ok=True)
AutoModel.register(SAEVConfig, SAEV, exist_ok=True)

__all__ = [
    "SAEV",
    "ActivationCache",
    "CacheArguments",
    "DataArguments",
    "ExampleExplanation",
    "FeatureSummary",
    "FilterArguments",
    "Inspection",
    "InspectionArguments",
    "LayerActivations",
    "LayerReader",
    "Modality",
    "ModelArguments",
    "OutputArguments",
    "PatchFilter",
    "PatchFilterArguments",
    "PatchLocator",
    "PromptFormat",
    "RowError",
    "SAEArguments",
    "SAEVConfig",
    "SAEVEvaluationArguments",
    "SAEVOutput",
    "SAEVRun",
    "SAEVScorer",
    "SAEVTrainer",
    "SAEVTrainingArguments",
    "ScorerArguments",
    "WeightingArguments",
    "__version__",
    "cache_activations",
    "compute_feature_weights",
    "disable_progress_bars",
    "enable_progress_bars",
    "end_distributed",
    "evaluate_saev",
    "explain_rows",
    "filter_by_score",
    "filtered_dataset_card",
    "format_metrics_table",
    "inspect_saev",
    "push_filtered_dataset",
    "push_saev",
    "saev_model_card",
    "score_dataset",
    "train_saev",
    "train_saevs",
    "write_feature_browser",
]
