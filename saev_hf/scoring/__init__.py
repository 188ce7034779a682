"""SAE-V's data-quality scores as `datasets.map` functions (Algorithm 1 stage 3, Algorithms 2-3): what an example
fires (`activity`), a map function's identity and caching (`identity`, [`SAEVMapFunction`] in `map_function`), running
one over a dataset on one process or many (`mapping`), and the scorer ([`SAEVScorer`], `scorer`)."""

from .map_function import SAEVMapFunction
from .mapping import MapArguments, score_dataset
from .scorer import SCORES, SAEVScorer, ScorerArguments, run_scoring

__all__ = ["SCORES", "MapArguments", "SAEVMapFunction", "SAEVScorer", "ScorerArguments", "run_scoring",
           "score_dataset"]
