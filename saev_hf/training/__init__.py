"""Training SAE-Vs on the MLLM's layer L: the options ([`SAEVTrainingArguments`], `arguments`), the schedules
(`schedule`), the shuffled stream of activations (`buffer`), one SAE-V under training ([`SAEVRun`], `run`), several from
one pass (`sweep`), checkpoints and records (`checkpoints`) and the loop ([`SAEVTrainer`], `trainer`)."""

from .arguments import SAEVTrainingArguments
from .run import SAEVRun
from .sweep import SWEEP_FIELDS, parse_sweep, sweep_members
from .trainer import SAEVTrainer, train_saev, train_saevs

__all__ = ["SWEEP_FIELDS", "SAEVRun", "SAEVTrainer", "SAEVTrainingArguments", "parse_sweep", "sweep_members",
           "train_saev", "train_saevs"]
