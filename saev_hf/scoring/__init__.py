"""SAE-V's data-quality scores as `datasets.map` functions (Algorithm 1 stage 3, Algorithms 2-3): what an example
fires (`activity`), a map function's identity and caching (`identity`, [`SAEVMapFunction`] in `map_function`), running
one over a dataset on one process or many (`mapping`), the scorer ([`SAEVScorer`], `scorer`) and the baselines it
computes beside SAE-V's scores (`baselines`: length, answer log-likelihood, IFD, image-text similarity, CLIP score)."""

from .baselines import BASELINES, ClipScore
from .map_function import SAEVMapFunction
from .mapping import MapArguments, score_dataset
from .scorer import SCORES, SAEVScorer, ScorerArguments, run_scoring

__all__ = ["BASELINES", "SCORES", "ClipScore", "MapArguments", "SAEVMapFunction", "SAEVScorer", "ScorerArguments", "run_scoring",
           "score_dataset"]
