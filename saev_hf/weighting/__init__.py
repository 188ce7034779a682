"""Cross-modal feature weights (Algorithm 1, stages 1-2), streaming and in bounded memory: each feature's top positions
(`top_k`), the cosine between its top text and image positions (`cosine`), the calibrated co-occurrence bound
(`delta`), and the two passes that compute them ([`compute_feature_weights`], `weights`)."""

from .weights import WeightingArguments, compute_feature_weights, model_cosine_score, run_weights

__all__ = ["WeightingArguments", "compute_feature_weights", "model_cosine_score", "run_weights"]
