"""saev-hf: SAE-V multimodal sparse autoencoders for interpreting MLLMs and filtering their data, on Hugging Face.

`import saev_hf` registers the `"saev"` model type with transformers' Auto classes, so that
`AutoConfig.from_pretrained` and `AutoModel.from_pretrained` load SAE-V checkpoints without `trust_remote_code`.
It stays light: heavy optional stacks (TRL, PEFT) are imported only by the parts that use them.

The data flow, one stage per module: rows (`batching`) -> `prompts` -> `activations` (layer L of the MLLM, with
the position masks; kept on disk by `cache`) -> `model` (SAE-V; trained by `training` with `training_args`, `schedule`
and `activation_buffer`; measured by `evaluation`) -> `weighting` (cross-modal feature weights) -> `activity` (C(x), L0,
maxima) -> `scoring` (a `datasets.map` scorer) -> `filtering` -> trainers (`dpo`); `inspection` and
`feature_browser` show what the features and scores mean; `patches` lays image tokens out on their patches and
filters patches by SAE-V scores; `hub` publishes with cards; `cli` runs each step as a command. `saev_hf.demo` (the
tiny models and the miniature) is never imported by any of these.
"""

from transformers import AutoConfig, AutoModel


def _version() -> str:
    """The version, from one source: the installed package's metadata (written from pyproject.toml); a source checkout
    put on `PYTHONPATH` without installing reads pyproject.toml itself."""
    import importlib.metadata
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
    if re.search(r'^name = "saev-hf"$', text, re.MULTILINE):  # a checkout: its own version, not an installed copy's
        return re.search(r'^version = "([^"]+)"$', text, re.MULTILINE).group(1)
    return importlib.metadata.version("saev-hf")



from .activations import LayerActivations, LayerReader, Modality
from .cache import ActivationCache, CacheArguments, cache_activations
from .config import SAEVConfig
from .evaluation import SAEVEvaluationArguments, evaluate_saev, format_metrics_table
from .feature_browser import write_feature_browser
from .filtering import FilterArguments, filter_by_score
from .hub import filtered_dataset_card, push_filtered_dataset, push_saev, saev_model_card
from .inspection import ExampleExplanation, FeatureSummary, Inspection, InspectionArguments, explain_rows, inspect_saev
from .model import SAEV, SAEVOutput
from .patches import PatchFilter, PatchFilterArguments, PatchLocator
from .prompts import PromptFormat, RowError
from .scoring import SAEVScorer, ScorerArguments, score_dataset
from .training import SAEVRun, SAEVTrainer, SAEVTrainingArguments, end_distributed, train_saev, train_saevs
from .weighting import WeightingArguments, compute_feature_weights

__version__ = _version()

AutoConfig.register(SAEVConfig.model_type, SAEVConfig, exist_ok=True)
AutoModel.register(SAEVConfig, SAEV, exist_ok=True)

__all__ = [
    "SAEV",
    "ActivationCache",
    "CacheArguments",
    "ExampleExplanation",
    "FeatureSummary",
    "FilterArguments",
    "Inspection",
    "InspectionArguments",
    "LayerActivations",
    "LayerReader",
    "Modality",
    "PatchFilter",
    "PatchFilterArguments",
    "PatchLocator",
    "PromptFormat",
    "RowError",
    "SAEVConfig",
    "SAEVEvaluationArguments",
    "SAEVOutput",
    "SAEVScorer",
    "SAEVRun",
    "SAEVTrainer",
    "SAEVTrainingArguments",
    "ScorerArguments",
    "WeightingArguments",
    "__version__",
    "cache_activations",
    "compute_feature_weights",
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
