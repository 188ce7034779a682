"""[`SAEVTrainingArguments`]: every option of a training run, shared by the Python API and `saev train` (the paper's
recipe as defaults), in the way of TRL's `<method>_config.py`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from accelerate.utils import LoggerType

from ..activations.reader import include_special_tokens_field, layer_field
from ..data.pipeline import read_batch_size_field
from ..model.config import ACTIVATIONS
from ..runtime.folders import OutputArguments
from .schedule import TrainingSchedule

PAPER_MAX_STEPS = 30000

RUN_ONLY_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "report_to",
        "run_name",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "save_buffer_in_checkpoint",
        "disable_tqdm",
    }
)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(kw_only=True)
class SAEVTrainingArguments(OutputArguments):
    """
    Train an SAE-V on the residual stream of decoder layer `layer` of a multimodal LLM (or a plain SAE on a text-only
    causal LM and text data). Defaults are the paper's recipe (LLaVA-NeXT-7B: Adam lr 5e-5, betas (0.9, 0.999), LR
    warm-up over the first 5% of steps and linear decay over the last 20%, L1 coefficient 5 warmed up over the first
    5%, gradient clipping 1.0, fp32, seed 42, 30000 steps of 4096 tokens, dead-feature window 1000 steps and
    threshold 1e-4).

    Groups of options:

    - what is read: `layer`, `include_special_tokens` (the MLLM, its device and the data are
      [`saev_hf.ModelArguments`] and [`saev_hf.DataArguments`], given to the trainer beside these; the columns are a
      [`saev_hf.PromptFormat`]);
    - the SAE: `expansion_factor` / `d_sae`, `activation`, `k`, `l1_coefficient`, `input_scale`,
      `input_scale_estimation_tokens`;
    - optimisation: `learning_rate`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, `lr_warmup_steps`, `lr_decay_steps`,
      `l1_warmup_steps`, `max_grad_norm`, `max_steps` / `total_training_tokens`, `train_batch_size_tokens`,
      `read_batch_size`, `buffer_size_tokens`, `shuffle_dataset`, `seed`, `dead_feature_window`,
      `dead_feature_threshold`;
    - output: `output_dir`, `overwrite_output_dir`, `disable_tqdm` (of [`OutputArguments`]), `save_steps`,
      `save_total_limit`, `save_buffer_in_checkpoint`, `resume_from_checkpoint`, `report_to`, `run_name`,
      `logging_steps`.

    `train_batch_size_tokens` is per process, like `per_device_train_batch_size`: with N processes a step trains on
    N times as many tokens. Options left at `None` that depend on the number of steps (`lr_warmup_steps`,
    `lr_decay_steps`, `l1_warmup_steps`) are resolved by [`SAEVTrainingArguments.schedule`].

    A sweep (`saev train --sweep`, `saev_hf.training.train_saevs`) trains several SAE-Vs from one pass of activations:
    these arguments are then its base, and each member overrides some of the SAE and optimisation options
    (`saev_hf.training.sweep.SWEEP_FIELDS`).
    """

    # --- what is read -------------------------------------------------------------------------------------------
    layer: int = layer_field()
    include_special_tokens: bool = include_special_tokens_field()

    # --- the SAE -------------------------------------------------------------------------------------------------
    expansion_factor: int | None = field(
        default=None, metadata=_help("d_sae / d_in. Default 16 (the paper's LLaVA-NeXT SAE-V) unless d_sae is given.")
    )
    d_sae: int | None = field(default=None, metadata=_help("Number of features; give this or expansion_factor."))
    activation: str = field(
        default="relu",
        metadata=_help("'relu' (the paper: L1 penalty weighted by decoder norms) or 'topk' (exactly k active "
                       "features, no L1 penalty).", choices=ACTIVATIONS),
    )
    k: int | None = field(default=None, metadata=_help("Active features per token for activation='topk'."))
    l1_coefficient: float = field(default=5.0, metadata=_help("Weight lambda of the sparsity penalty (ReLU)."))
    input_scale: float | None = field(
        default=None,
        metadata=_help("Factor s the inputs are multiplied by during training. None estimates the paper's "
                       "s = sqrt(d_in) / E||x|| before the first step. Folded into the saved weights either way."),
    )
    input_scale_estimation_tokens: int = field(
        default=65536,
        metadata=_help("Tokens over which E||x|| is estimated (the paper used about 1000 batches of 4096)."),
    )

    # --- optimisation --------------------------------------------------------------------------------------------
    learning_rate: float = field(default=5e-5, metadata=_help("Adam learning rate."))
    adam_beta1: float = field(default=0.9, metadata=_help("Adam beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("Adam beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("Adam epsilon."))
    lr_warmup_steps: int | None = field(
        default=None,
        metadata=_help("Linear LR warm-up steps. None: 5 percent of the steps (the paper: 1500 of 30000)."),
    )
    lr_decay_steps: int | None = field(
        default=None,
        metadata=_help("Linear LR decay to 0 over the last steps. None: the last 20 percent of the steps."),
    )
    l1_warmup_steps: int | None = field(
        default=None, metadata=_help("Linear L1-coefficient warm-up steps. None: 5 percent of the steps.")
    )
    max_grad_norm: float | None = field(default=1.0, metadata=_help("Gradient clipping norm; 0 or None disables it."))
    max_steps: int | None = field(
        default=None,
        metadata=_help(f"Optimizer steps. Give this or total_training_tokens; neither: {PAPER_MAX_STEPS} (the paper)."),
    )
    total_training_tokens: int | None = field(
        default=None,
        metadata=_help("Tokens to train on, over all processes; sets max_steps = ceil(tokens / "
                       "(train_batch_size_tokens x processes))."),
    )
    train_batch_size_tokens: int = field(default=4096, metadata=_help("Tokens per step and process."))
    read_batch_size: int = read_batch_size_field()
    buffer_size_tokens: int = field(
        default=262144,
        metadata=_help("Tokens in each process's shuffling buffer after a refill (refilled when half empty); at least "
                       "2 x train_batch_size_tokens."),
    )
    shuffle_dataset: bool = field(default=True, metadata=_help("Read the rows in a new random order on each pass."))
    seed: int = field(default=42, metadata=_help("Seed of the SAE initialisation, row order and token shuffle."))
    dead_feature_window: int = field(
        default=1000,
        metadata=_help("Steps over which firing frequencies are counted; windows end at the last step, and the last "
                       "window's frequencies are saved as the SAE's feature_log_sparsity."),
    )
    dead_feature_threshold: float = field(
        default=1e-4, metadata=_help("A feature firing on fewer than this fraction of a window's tokens is dead.")
    )

    # --- output --------------------------------------------------------------------------------------------------
    save_steps: int = field(default=1000, metadata=_help("Save a checkpoint every this many steps; 0 never."))
    save_total_limit: int | None = field(
        default=2, metadata=_help("Keep at most this many checkpoints (the oldest are deleted); 0 or None keeps all.")
    )
    save_buffer_in_checkpoint: bool = field(
        default=True,
        metadata=_help("Save each process's activation buffer in checkpoints, so that a resumed run trains on exactly "
                       "the batches an uninterrupted run would. Without it checkpoints are smaller and a resumed run "
                       "skips the tokens that were in the buffer."),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help("A checkpoint folder to resume from, or 'latest' for the newest checkpoint-* in output_dir."),
    )
    report_to: str = field(
        default="none",
        metadata=_help("Comma-separated trackers to log to through accelerate ('tensorboard', 'wandb', 'trackio', "
                       "'mlflow', ...), 'all', or 'none'."),
    )
    run_name: str | None = field(default=None, metadata=_help("Run name for the trackers (default: 'saev')."))
    logging_steps: int = field(default=50, metadata=_help("Log metrics every this many steps."))

    def __post_init__(self) -> None:
        # a flat list of independent checks, each naming its field and the fix: long by design
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer: the 0-based decoder layer index.")
        if not self.output_dir:
            raise ValueError("output_dir must name a folder for the trained SAE-V and its checkpoints.")
        if self.expansion_factor is not None and self.d_sae is not None:
            raise ValueError(
                f"Give either d_sae ({self.d_sae}) or expansion_factor ({self.expansion_factor}), not both."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported; use one of {ACTIVATIONS}.")
        if self.activation == "topk" and self.k is None:
            raise ValueError("activation='topk' needs k, the number of active features per token (e.g. --k 64).")
        if self.activation != "topk" and self.k is not None:
            raise ValueError(f"k={self.k} is only used with activation='topk'; remove it or set activation='topk'.")
        for name in ("train_batch_size_tokens", "read_batch_size", "buffer_size_tokens", "logging_steps",
                     "dead_feature_window"):
            _check_positive(name, getattr(self, name))
        for name in ("expansion_factor", "d_sae", "k", "max_steps", "total_training_tokens"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for name in ("lr_warmup_steps", "lr_decay_steps", "l1_warmup_steps", "save_steps", "save_total_limit",
                     "input_scale_estimation_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be a non-negative integer.")
        if self.buffer_size_tokens < 2 * self.train_batch_size_tokens:
            raise ValueError(
                f"buffer_size_tokens={self.buffer_size_tokens} must be at least twice train_batch_size_tokens="
                f"{self.train_batch_size_tokens} (the buffer refills when half empty). Raise it to at least "
                f"{2 * self.train_batch_size_tokens}."
            )
        if self.max_steps is not None and self.total_training_tokens is not None:
            raise ValueError(
                f"Give either max_steps ({self.max_steps}) or total_training_tokens ({self.total_training_tokens}), "
                f"not both."
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number, e.g. 5e-5.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise ValueError(f"l1_coefficient={self.l1_coefficient} must be a finite number >= 0.")
        if self.input_scale is not None and not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale={self.input_scale} must be a positive number, or None to estimate it.")
        if self.input_scale is None and self.input_scale_estimation_tokens == 0:
            raise ValueError(
                "input_scale_estimation_tokens=0 leaves nothing to estimate the input scale from: give "
                "input_scale (1.0 disables scaling) or a positive number of tokens."
            )
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(
                f"max_grad_norm={self.max_grad_norm} must be positive, or 0 (or None) to disable clipping."
            )
        if not 0 <= self.dead_feature_threshold <= 1:
            raise ValueError(f"dead_feature_threshold={self.dead_feature_threshold} must be a fraction in [0, 1].")
        self.trackers  # validates report_to
        if self.max_steps is not None or self.total_training_tokens is None:
            self.schedule(num_processes=1)  # validates warm-up and decay lengths against the number of steps

    # --- derived values ------------------------------------------------------------------------------------------

    @property
    def trackers(self) -> list[str] | str | None:
        """`report_to` as accelerate's `log_with`: None for 'none', 'all', or a list of tracker names."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if not names or names == ["none"]:
            return None
        if names == ["all"]:
            return "all"
        known = sorted(t.value for t in LoggerType)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"report_to={self.report_to!r}: unknown tracker(s) {unknown}. Use 'none', 'all' or a comma-separated "
                f"list of {known}."
            )
        return names

    def schedule(self, num_processes: int = 1) -> TrainingSchedule:
        """The number of steps and the warm-up/decay lengths for a run on `num_processes` processes."""
        if self.max_steps is not None:
            steps = self.max_steps
        elif self.total_training_tokens is not None:
            steps = math.ceil(self.total_training_tokens / (self.train_batch_size_tokens * num_processes))
        else:
            steps = PAPER_MAX_STEPS
        schedule = TrainingSchedule(
            max_steps=steps,
            lr_warmup_steps=round(0.05 * steps) if self.lr_warmup_steps is None else self.lr_warmup_steps,
            lr_decay_steps=round(0.2 * steps) if self.lr_decay_steps is None else self.lr_decay_steps,
            l1_warmup_steps=round(0.05 * steps) if self.l1_warmup_steps is None else self.l1_warmup_steps,
        )
        if schedule.lr_warmup_steps + schedule.lr_decay_steps > steps:
            raise ValueError(
                f"lr_warmup_steps={schedule.lr_warmup_steps} + lr_decay_steps={schedule.lr_decay_steps} exceed the "
                f"{steps} training steps. Shorten them or train for more steps."
            )
        if schedule.l1_warmup_steps > steps:
            raise ValueError(f"l1_warmup_steps={schedule.l1_warmup_steps} exceeds the {steps} training steps.")
        return schedule

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a JSON-serialisable dict."""
        return asdict(self)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
