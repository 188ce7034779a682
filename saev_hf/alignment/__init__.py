"""After scoring: keep the best-scored rows (`filtering`) and train the MLLM on them with TRL (`dpo`, imported on its
own: `from saev_hf.alignment.dpo import train_dpo`; TRL costs seconds to import)."""

from .filtering import FILTER_RECORD, FilterArguments, filter_by_score, kept_indices, run_filter

__all__ = ["FILTER_RECORD", "FilterArguments", "filter_by_score", "kept_indices", "run_filter"]
