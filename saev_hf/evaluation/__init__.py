"""How good an SAE-V is: sparsity, reconstruction, feature health and the MLLM's loss with it spliced in
([`evaluate_saev`], `metrics`), checked and laid out as a table ([`format_metrics_table`], `report`)."""

from .metrics import SAEVEvaluationArguments, evaluate_saev, run_evaluation
from .report import check_metrics, format_metrics_table

__all__ = ["SAEVEvaluationArguments", "check_metrics", "evaluate_saev", "format_metrics_table", "run_evaluation"]
