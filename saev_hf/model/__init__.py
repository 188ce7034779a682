"""The SAE-V itself: its configuration (`config`, [`SAEVConfig`]), the model (`modeling`, [`SAEV`]: encode, decode,
feature weights, checkpoints), the SAELens checkpoint layout (`saelens`), whether its co-occurrence bound can be reached
(`cooccurrence`), and `saev convert` / `saev info` (`convert`)."""

from .config import SAEVConfig
from .modeling import SAEV, SAEVOutput

__all__ = ["SAEV", "SAEVConfig", "SAEVOutput"]
