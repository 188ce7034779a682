"""How good an SAE-V is: sparsity, reconstruction, feature health and the MLLM's loss with it spliced in
([`evaluate_saev`], `metrics`), checked, laid out as a table, plotted and written by `saev eval`
([`format_metrics_table`], [`plot_feature_density`], [`run_evaluation`], `report`)."""

from .metrics import SAEVEvaluationArguments, evaluate_saev
from .report import check_metrics, format_metrics_table, plot_feature_density, run_evaluation

__all__ = ["SAEVEvaluationArguments", "check_metrics", "evaluate_saev", "format_metrics_table", "plot_feature_density",
           "run_evaluation"]
