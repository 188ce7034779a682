"""Training an SAE-V (or, on a text-only causal LM and text data, a plain SAE: the paper's baseline).

Data flows one way: dataset rows -> [`LayerReader`] (the base model up to layer L) -> [`ActivationBuffer`] (real
tokens only, shuffled) -> [`SAEV`] trained with the paper's recipe -> a checkpoint that reads raw hidden states.

- [`SAEVTrainingArguments`]: every option, shared by the Python API and `saev train` (the paper's recipe as defaults).
- [`SAEVTrainer`]: the loop, on `accelerate.Accelerator`: devices, data-parallel processes (`torchrun` or
  `accelerate launch` run the same code on several processes; each reads its own shard of the dataset and gradients
  are averaged), checkpoints (`save_state`/`load_state` plus the activation buffer of every process), and the
  `report_to` trackers.
- [`train_saev`]: one call, for scripts and the CLI.

Why `Accelerator` and not `transformers.Trainer`: the training data is not a dataset of examples but a stream that
the base model produces on the fly, one shuffling buffer per process, whose state must be checkpointed with the
optimizer for an exact resume; and the input scale is estimated before the first step and reduced over the processes.
`Trainer` would need its data loader, sampler, loss, schedule and checkpoint code overridden (and by default steps a
prepared scheduler once per process); an explicit loop on `Accelerator` is shorter and keeps each of these visible,
as EleutherAI's sparsify does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .activation_buffer import ActivationBuffer, activation_norm_statistics, input_scale_from_norms
from .activations import LayerReader, image_token_id_of
from .config import ACTIVATIONS, SAEVConfig
from .loading import MODEL_DTYPES, accelerator_available, load_dataset_split, load_model_and_processor  # noqa: F401
from .model import SAEV
from .prompts import PromptFormat, undecoded_images

logger = logging.getLogger(__name__)

PAPER_MAX_STEPS = 30000
CHECKPOINT_PREFIX = "checkpoint-"
ARGS_NAME = "training_args.json"
STATE_NAME = "trainer_state.json"
LOG_SPARSITY_EPS = 1e-10  # SAELens' epsilon: a feature that never fired gets log10 sparsity -10

# Fields that do not change what is trained: they may differ between a run and its resumption.
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
        "use_cpu",
    }
)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(kw_only=True)
class SAEVTrainingArguments(PromptFormat):
    """
    Train an SAE-V on the residual stream of decoder layer `layer` of a multimodal LLM (or a plain SAE on a text-only
    causal LM and text data). Defaults are the paper's recipe (LLaVA-NeXT-7B: Adam lr 5e-5, betas (0.9, 0.999), LR
    warm-up over the first 5% of steps and linear decay over the last 20%, L1 coefficient 5 warmed up over the first
    5%, gradient clipping 1.0, fp32, seed 42, 30000 steps of 4096 tokens, dead-feature window 1000 steps and
    threshold 1e-4).

    Groups of options:

    - base model and data: `model_name_or_path`, `model_revision`, `model_dtype`, `dataset_name`, `dataset_config`,
      `dataset_split`, `streaming`, the prompt columns of [`PromptFormat`] (`image_column`, `prompt_column`,
      `response_column`, `max_length`), `layer`, `include_special_tokens`;
    - the SAE: `expansion_factor` / `d_sae`, `activation`, `k`, `l1_coefficient`, `input_scale`,
      `input_scale_estimation_tokens`;
    - optimisation: `learning_rate`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, `lr_warmup_steps`, `lr_decay_steps`,
      `l1_warmup_steps`, `max_grad_norm`, `max_steps` / `total_training_tokens`, `train_batch_size_tokens`,
      `read_batch_size`, `buffer_size_tokens`, `shuffle_dataset`, `seed`, `dead_feature_window`,
      `dead_feature_threshold`;
    - output: `output_dir`, `overwrite_output_dir`, `save_steps`, `save_total_limit`, `save_buffer_in_checkpoint`,
      `resume_from_checkpoint`, `report_to`, `run_name`, `logging_steps`, `disable_tqdm`, `use_cpu`.

    `train_batch_size_tokens` is per process, like `per_device_train_batch_size`: with N processes a step trains on
    N times as many tokens. Options left at `None` that depend on the number of steps (`lr_warmup_steps`,
    `lr_decay_steps`, `l1_warmup_steps`) are resolved by [`SAEVTrainingArguments.schedule`].
    """

    # --- base model and data -------------------------------------------------------------------------------------
    layer: int = field(metadata=_help("0-based index of the decoder layer whose output (residual stream) is read. "
                                      "The paper: 16 for LLaVA-NeXT-7B, 8 for Chameleon-7B."))
    output_dir: str = field(metadata=_help("Folder for the trained SAE-V, its checkpoints and logs."))
    model_name_or_path: str | None = field(
        default=None,
        metadata=_help("Hub repo id or local folder of the base model: an image-text-to-text model (SAE-V) or a "
                       "text-only causal LM (plain SAE). Not needed when a model is passed to the Python API."),
    )
    model_revision: str | None = field(default=None, metadata=_help("Revision of the base model on the Hub."))
    model_dtype: str = field(
        default="float32",
        metadata=_help(f"dtype the base model is loaded in, one of {MODEL_DTYPES}. The SAE itself trains in fp32.",
                       choices=MODEL_DTYPES),
    )
    dataset_name: str | None = field(
        default=None,
        metadata=_help("Hub dataset name, a folder written by `Dataset.save_to_disk`, or anything `load_dataset` "
                       "reads. Not needed when a dataset is passed to the Python API."),
    )
    dataset_config: str | None = field(default=None, metadata=_help("Configuration name of the dataset."))
    dataset_split: str = field(default="train", metadata=_help("Split of the dataset to train on."))
    streaming: bool = field(default=False, metadata=_help("Stream the dataset instead of downloading it whole."))
    include_special_tokens: bool = field(
        default=True,
        metadata=_help("Train on special/template tokens (BOS, role markers, image start/end) too: they are residual "
                       "stream like any other position. Padding is never trained on."),
    )

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
    read_batch_size: int = field(default=8, metadata=_help("Dataset rows per forward pass of the base model."))
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help("Write into output_dir even if it holds a different training run or files that no training "
                       "run wrote (they may be replaced)."),
    )
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
    disable_tqdm: bool = field(
        default=False, metadata=_help("Hide the progress bars (input-scale estimate, buffer fills, training steps).")
    )
    use_cpu: bool = field(default=False, metadata=_help("Train on the CPU even when an accelerator is available."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} must be a non-negative integer: the 0-based decoder layer index.")
        if not self.output_dir:
            raise ValueError("output_dir must name a folder for the trained SAE-V and its checkpoints.")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype={self.model_dtype!r} is not supported; use one of {MODEL_DTYPES}.")
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
    def prompt_format(self) -> PromptFormat:
        """The [`PromptFormat`] part of these arguments."""
        return PromptFormat(**{f.name: getattr(self, f.name) for f in fields(PromptFormat)})

    @property
    def trackers(self) -> list[str] | str | None:
        """`report_to` as accelerate's `log_with`: None for 'none', 'all', or a list of tracker names."""
        from accelerate.utils import LoggerType

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


@dataclass(frozen=True)
class TrainingSchedule:
    """
    Step counts of a run and the paper's schedules as functions of the 0-based optimizer step.

    Learning rate: `lr * min(1, (step + 1) / lr_warmup_steps, (max_steps - step) / lr_decay_steps)`: a linear
    warm-up reaching `lr` at the last warm-up step, constant, then a linear decay over the last `lr_decay_steps` steps
    (reaching `lr / lr_decay_steps` at the last step), as SAELens' "constant" schedule with warm-up and decay.
    L1 coefficient: `l1 * min(1, (step + 1) / l1_warmup_steps)`. A length of 0 disables that phase.
    """

    max_steps: int
    lr_warmup_steps: int
    lr_decay_steps: int
    l1_warmup_steps: int

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step `step`."""
        factor = 1.0
        if self.lr_warmup_steps > 0:
            factor = min(factor, (step + 1) / self.lr_warmup_steps)
        if self.lr_decay_steps > 0:
            factor = min(factor, (self.max_steps - step) / self.lr_decay_steps)
        return factor

    def l1_coefficient(self, step: int, l1_coefficient: float) -> float:
        """The L1 coefficient used at optimizer step `step`."""
        if self.l1_warmup_steps <= 0:
            return l1_coefficient
        return l1_coefficient * min(1.0, (step + 1) / self.l1_warmup_steps)


class FeatureFiringTracker:
    """
    Counts how often each feature fires (z > 0), over windows of `window` steps that end at the last step.

    Windows are aligned to the end of training (the first one may be shorter), so the frequencies of the last window
    cover exactly the last `window` steps; they become the SAE's `feature_log_sparsity`. In a distributed run each
    process counts its own tokens and [`close_window`] sums them over processes.
    """

    def __init__(self, d_sae: int, window: int, max_steps: int, device: torch.device | str = "cpu") -> None:
        self.window = window
        self.max_steps = max_steps
        self.counts = torch.zeros(d_sae, dtype=torch.float64, device=device)  # exact up to 2**53 tokens
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.frequency: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor) -> None:
        """Count the features active on each token of a batch `(tokens, d_sae)`."""
        self.counts += (feature_acts > 0).float().sum(0)  # float: summing a bool mask copies it to int64 first
        self.tokens += feature_acts.shape[0]

    def window_ends_at(self, step: int) -> bool:
        """Whether a window ends with optimizer step `step` (0-based)."""
        return (self.max_steps - (step + 1)) % self.window == 0

    def close_window(self, reduce=None) -> torch.Tensor:
        """End the window: firing frequency per feature over it (summed over processes by `reduce`), then reset."""
        counts, tokens = self.counts, self.tokens
        if reduce is not None:
            counts, tokens = reduce(counts.clone(), "sum"), reduce(tokens.clone(), "sum")
        self.frequency = counts.double() / max(int(tokens), 1)
        self.counts.zero_()
        self.tokens.zero_()
        return self.frequency

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"firing_counts": self.counts.cpu(), "firing_tokens": self.tokens.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts.copy_(state["firing_counts"])
        self.tokens.copy_(state["firing_tokens"])


# ------------------------------------------------------------------------------------------------------------------
# Loading a base model and a dataset from names (the CLI)
# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------------


class SAEVTrainer:
    """
    Trains an [`SAEV`] on activations streamed from a base model, with `accelerate`.

    Example:

    ```python
    args = SAEVTrainingArguments(
        layer=16,
        output_dir="saev-llava-next",
        model_name_or_path="llava-hf/llava-v1.6-mistral-7b-hf",
        dataset_name="my-org/image-text-pairs",  # columns "images" and "prompt" (see PromptFormat)
    )
    sae = SAEVTrainer(args).train()  # or: train_saev(args, model=model, processor=processor, dataset=dataset)
    ```

    Args:
        args ([`SAEVTrainingArguments`]): the run's options.
        model (*optional*): the base model; loaded from `args.model_name_or_path` when not given.
        processor (*optional*): its processor or tokenizer; required with `model`.
        train_dataset (`datasets.Dataset` or `IterableDataset`, *optional*): the rows to read; loaded from
            `args.dataset_name` when not given. In a distributed run each process reads its own shard of it.

    Attributes:
        sae ([`SAEV`]): the SAE being trained (unwrapped; `config.input_scale` is the training scale).
        accelerator (`accelerate.Accelerator`), reader ([`LayerReader`]), schedule ([`TrainingSchedule`]),
        global_step (`int`), log_history (`list[dict]`).
    """

    def __init__(self, args: SAEVTrainingArguments, model=None, processor=None, train_dataset=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args = args
        # On a machine without an accelerator, `torchrun`/`accelerate launch` processes must be told to use the CPU
        # backend (gloo) or accelerate silently runs each of them as a separate single-process job.
        use_cpu = args.use_cpu or not accelerator_available()
        self.accelerator = Accelerator(
            cpu=use_cpu,
            log_with=args.trackers,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
            ),
            # The schedule counts global optimizer steps; a prepared scheduler would otherwise step once per process.
            step_scheduler_with_optimizer=False,
        )
        set_seed(args.seed)
        self.schedule = args.schedule(self.accelerator.num_processes)
        self.resume_dir = self._resolve_checkpoint()
        self._check_output_dir()

        if model is None:
            if args.model_name_or_path is None:
                raise ValueError("No base model: pass model= and processor=, or set model_name_or_path.")
            model, processor = load_model_and_processor(
                args.model_name_or_path, args.model_revision, args.model_dtype, self.accelerator.device
            )
        elif processor is None:
            raise ValueError("A model was passed without its processor (or tokenizer): pass processor= too.")
        model.eval()  # activations are read without dropout
        if train_dataset is None:
            if args.dataset_name is None:
                raise ValueError("No training data: pass train_dataset=, or set dataset_name.")
            train_dataset = load_dataset_split(
                args.dataset_name, args.dataset_config, args.dataset_split, args.streaming
            )
            # read image bytes ourselves, so that a corrupt image is an error naming its row
            train_dataset, _ = undecoded_images(train_dataset, args.image_column)
        self.train_dataset = train_dataset

        prompt_format = args.prompt_format
        if image_token_id_of(model, processor) is None and prompt_format.image_column is not None:
            # A text-only causal LM reads text only (the paper's SAE baseline); the image column is not used.
            prompt_format = PromptFormat(image_column=None, prompt_column=prompt_format.prompt_column,
                                         response_column=prompt_format.response_column,
                                         max_length=prompt_format.max_length)
        self.reader = LayerReader(model, processor, layer=args.layer, prompt_format=prompt_format)

        config = SAEVConfig(
            d_in=self.reader.hidden_size,
            d_sae=args.d_sae,
            expansion_factor=args.expansion_factor,
            activation=args.activation,
            k=args.k,
            hook_layer=args.layer,
            base_model_name_or_path=args.model_name_or_path or getattr(model.config, "_name_or_path", None) or None,
            base_model_revision=args.model_revision,
            l1_coefficient=args.l1_coefficient,
            dataset_name=_dataset_description(args, train_dataset),
            training_tokens=0,
        )
        torch.manual_seed(args.seed)  # the same initialisation on every process and for every data order
        self.sae = SAEV(config).to(self.accelerator.device)
        optimizer = torch.optim.Adam(
            self.sae.parameters(),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_factor)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.sae, optimizer, scheduler)
        self.tracker = FeatureFiringTracker(
            config.d_sae, args.dead_feature_window, self.schedule.max_steps, self.accelerator.device
        )
        self.global_step = 0
        self.log_history: list[dict[str, Any]] = []
        self.buffer: ActivationBuffer | None = None

    # --- data ----------------------------------------------------------------------------------------------------

    def activation_buffer(self, process_index: int | None = None, num_processes: int | None = None) -> ActivationBuffer:
        """
        A fresh activation buffer over the shard of the training data that process `process_index` of
        `num_processes` reads (default: this process of this run). Its shuffle is seeded with `seed + process_index`.
        """
        from datasets.distributed import split_dataset_by_node

        index = self.accelerator.process_index if process_index is None else process_index
        world = self.accelerator.num_processes if num_processes is None else num_processes
        data = self.train_dataset
        if world > 1:
            data = split_dataset_by_node(data, rank=index, world_size=world)
        return ActivationBuffer(
            self.reader,
            data,
            batch_size_tokens=self.args.train_batch_size_tokens,
            buffer_size_tokens=self.args.buffer_size_tokens,
            read_batch_size=self.args.read_batch_size,
            include_special_tokens=self.args.include_special_tokens,
            shuffle_dataset=self.args.shuffle_dataset,
            seed=self.args.seed + index,
            device=self.accelerator.device,
            progress=not self.args.disable_tqdm and self.accelerator.is_local_main_process,
        )

    @torch.no_grad()
    def estimate_input_scale(self) -> float:
        """
        The paper's `s = sqrt(d_in) / E||x||` over the first `input_scale_estimation_tokens` tokens of the data
        (each process reads its share from the start of its shard; the mean is taken over all of them).
        """
        world = self.accelerator.num_processes
        per_process = math.ceil(self.args.input_scale_estimation_tokens / world)
        norm_sum, count = activation_norm_statistics(self.activation_buffer(), per_process)
        totals = torch.tensor([norm_sum, float(count)], dtype=torch.float64, device=self.accelerator.device)
        if world > 1:
            totals = self.accelerator.reduce(totals, "sum")
        return input_scale_from_norms(self.reader.hidden_size, float(totals[0]), int(totals[1]))

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self, batches: Iterable[torch.Tensor] | None = None) -> SAEV:
        """
        Train, save the SAE-V to `output_dir` (input scale folded into the weights) and return it.

        Args:
            batches (iterable of `torch.Tensor` `(tokens, d_in)`, *optional*): train on these activation batches
                (e.g. cached activations) instead of the base model's stream; one per step. Checkpoints then hold no
                data position: resuming is up to the caller.

        Returns:
            [`SAEV`]: a copy of the trained SAE-V that reads raw hidden states (`config.input_scale == 1`), with
            `feature_log_sparsity` filled from the last `dead_feature_window` steps. On every process.
        """
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir, own_batches=batches is not None)
        elif args.input_scale is not None:
            self.sae.config.input_scale = float(args.input_scale)
        else:
            self.sae.config.input_scale = self.estimate_input_scale()
            logger.info("Input scale sqrt(d_in) / E||x|| = %.6g", self.sae.config.input_scale)
        if batches is None:
            if self.buffer is None:
                self.buffer = self.activation_buffer()
            batches = self.buffer
        batch_iterator: Iterator[torch.Tensor] = iter(batches)

        if accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self._write_json(Path(args.output_dir) / ARGS_NAME, self._args_record())
        accelerator.init_trackers(args.run_name or "saev", config=_tracker_config(args))
        progress = tqdm(
            total=self.schedule.max_steps,
            initial=self.global_step,
            desc="Training SAE-V",
            unit="step",
            disable=args.disable_tqdm or not accelerator.is_local_main_process,
        )
        sums: dict[str, torch.Tensor] = {}
        steps_in_log = 0
        self.model.train()
        while self.global_step < self.schedule.max_steps:
            step = self.global_step
            try:
                batch = next(batch_iterator)
            except StopIteration:
                raise ValueError(
                    f"The batches ran out after {step} steps, before max_steps={self.schedule.max_steps}. Pass more "
                    f"batches or fewer steps."
                ) from None
            batch = batch.to(accelerator.device, torch.float32)
            if batch.dim() != 2 or batch.shape[1] != self.sae.config.d_in:
                raise ValueError(
                    f"Training batches must be (tokens, d_in={self.sae.config.d_in}) activations; got shape "
                    f"{tuple(batch.shape)}."
                )
            l1 = self.schedule.l1_coefficient(step, args.l1_coefficient)
            output = self.model(batch, l1_coefficient=l1)
            accelerator.backward(output.loss)
            grad_norm = (
                accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                if args.max_grad_norm  # None or 0: no clipping (and no norm to log)
                else None
            )
            lr = self.lr_scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            with torch.no_grad():
                self.tracker.update(output.feature_acts)
                step_metrics = {
                    "loss": output.loss.detach(),
                    "mse_loss": output.mse_loss.detach(),
                    "sparsity_loss": output.sparsity_loss.detach(),
                    "l0": output.l0.detach(),
                    "explained_variance": _explained_variance(batch * self.sae.config.input_scale, output, self.sae),
                }
                if grad_norm is not None:
                    step_metrics["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32).detach()
                for name, value in step_metrics.items():
                    sums[name] = sums.get(name, 0) + value.float().to(accelerator.device)
            steps_in_log += 1
            self.global_step += 1
            progress.update(1)

            logs: dict[str, float] = {}
            if self.tracker.window_ends_at(step):
                frequency = self.tracker.close_window(accelerator.reduce if accelerator.num_processes > 1 else None)
                logs["dead_features"] = int((frequency < args.dead_feature_threshold).sum())
            if self.global_step % args.logging_steps == 0 or self.global_step == self.schedule.max_steps:
                means = torch.stack([sums[name] for name in sums]) / steps_in_log
                if accelerator.num_processes > 1:
                    means = accelerator.reduce(means, "mean")
                logs.update({name: float(value) for name, value in zip(sums, means)})
                logs.update({"learning_rate": lr, "l1_coefficient": l1})
                sums, steps_in_log = {}, 0
                progress.set_postfix(loss=f"{logs['loss']:.4g}", l0=f"{logs['l0']:.1f}")
            if logs:
                self.log_history.append({"step": self.global_step, **logs})
                accelerator.log(logs, step=self.global_step)
            last = self.global_step == self.schedule.max_steps  # the final model is saved below instead
            if args.save_steps and self.global_step % args.save_steps == 0 and not last:
                self.save_checkpoint()
        progress.close()

        sae = self.export_sae()
        state = self._state_record()  # gathers from every process
        if accelerator.is_main_process:
            sae.save_pretrained(args.output_dir)
            self._write_json(Path(args.output_dir) / STATE_NAME, state)
        accelerator.wait_for_everyone()
        # Finish the trackers but leave the process group to whoever started it, as transformers' Trainer does.
        # accelerate's end_training() destroys it; the DDP reducer freed afterwards then tears gloo down while holding
        # the GIL, which deadlocks when gloo's worker thread is still releasing the last collective's tensors.
        for tracker in accelerator.trackers:
            tracker.finish()
        return sae

    @torch.no_grad()
    def export_sae(self) -> SAEV:
        """A copy of the SAE as it would be saved: provenance recorded, sparsity filled, input scale folded."""
        sae = copy.deepcopy(self.sae)
        sae.config.training_tokens = self._training_tokens()
        if self.tracker.frequency is not None:
            log_sparsity = torch.log10(self.tracker.frequency + LOG_SPARSITY_EPS)
            sae.feature_log_sparsity.copy_(log_sparsity.to(sae.feature_log_sparsity))
        return sae.fold_input_scale()

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save everything needed to resume at this step to `output_dir/checkpoint-<step>` and return the folder."""
        accelerator = self.accelerator
        path = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.global_step}"
        accelerator.save_state(str(path))  # model, optimizer, scheduler, RNG states of every process
        data_state = self.tracker.state_dict()
        metadata = {}
        if self.buffer is not None:
            buffer_state = self.buffer.state_dict(include_tokens=self.args.save_buffer_in_checkpoint)
            if buffer_state["tokens"] is not None:
                data_state["buffer_tokens"] = buffer_state["tokens"]
            data_state["buffer_generator"] = buffer_state["generator"]
            metadata = {name: str(value) for name, value in buffer_state.items() if name not in ("tokens", "generator")}
        save_file(
            {name: tensor.contiguous() for name, tensor in data_state.items()},
            str(path / f"data_state_{accelerator.process_index}.safetensors"),
            metadata=metadata,
        )
        state = self._state_record()  # gathers from every process
        if accelerator.is_main_process:
            self._write_json(path / ARGS_NAME, self._args_record())
            self._write_json(path / STATE_NAME, state)
            self.export_sae().save_pretrained(path / "saev")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.args.save_total_limit:
            for old in _checkpoints(self.args.output_dir)[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path, own_batches: bool) -> None:
        accelerator = self.accelerator
        state = json.loads((path / STATE_NAME).read_text())
        if state["num_processes"] != accelerator.num_processes:
            raise ValueError(
                f"Checkpoint {path} was written by {state['num_processes']} processes but this run has "
                f"{accelerator.num_processes}. Each process resumes its own data shard and buffer: resume with "
                f"{state['num_processes']} processes."
            )
        accelerator.load_state(str(path))
        self.global_step = int(state["global_step"])
        self.sae.config.input_scale = float(state["input_scale"])
        self.log_history = list(state.get("log_history", []))
        data_file = path / f"data_state_{accelerator.process_index}.safetensors"
        from safetensors import safe_open

        with safe_open(str(data_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        data_state = load_file(str(data_file))
        self.tracker.load_state_dict(data_state)
        if not own_batches and "buffer_generator" in data_state:
            self.buffer = self.activation_buffer()
            self.buffer.load_state_dict(
                {
                    "tokens": data_state.get("buffer_tokens"),
                    "generator": data_state["buffer_generator"],
                    **{name: int(value) for name, value in metadata.items()},
                }
            )
        logger.info("Resumed from %s at step %d", path, self.global_step)

    def _resolve_checkpoint(self) -> Path | None:
        """The checkpoint folder to resume from (None for a fresh run), after checking that it matches the args."""
        value = self.args.resume_from_checkpoint
        if value is None:
            return None
        if value == "latest":
            found = _checkpoints(self.args.output_dir)
            if not found:
                raise ValueError(
                    f"resume_from_checkpoint='latest' but {self.args.output_dir} holds no {CHECKPOINT_PREFIX}* folder. "
                    f"Point it at a checkpoint folder, or drop it to start a new run."
                )
            path = found[-1]
        else:
            path = Path(value)
        if not (path / STATE_NAME).exists() or not (path / ARGS_NAME).exists():
            raise ValueError(
                f"resume_from_checkpoint={value!r}: {path} is not an SAE-V training checkpoint (no {STATE_NAME} and "
                f"{ARGS_NAME}). Use a {CHECKPOINT_PREFIX}<step> folder written by SAEVTrainer, or 'latest'."
            )
        saved = json.loads((path / ARGS_NAME).read_text())
        differences = _differences(saved["args"], self.args.to_dict())
        if differences:
            raise ValueError(
                f"Cannot resume from {path}: it was trained with different settings: {'; '.join(differences)}. "
                f"Resume with the checkpoint's settings, or start a new run in another output_dir."
            )
        return path

    def _check_output_dir(self) -> None:
        output = Path(self.args.output_dir)
        saved_file = output / ARGS_NAME
        if self.resume_dir is not None or self.args.overwrite_output_dir:
            return
        if not saved_file.exists():
            # not an earlier training run (its record is training_args.json): anything there is someone else's
            entries = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
            if entries:
                shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
                raise FileExistsError(
                    f"output_dir {self.args.output_dir} already holds files that no training run wrote ({shown}); "
                    f"saving the SAE-V there would replace them (e.g. a model's config.json and model.safetensors). "
                    f"Choose a new or empty folder, or pass overwrite_output_dir=True (--overwrite_output_dir) to "
                    f"write into it anyway."
                )
            if output.exists() and not output.is_dir():
                raise FileExistsError(f"output_dir {self.args.output_dir} is a file; name a folder.")
            return
        saved = json.loads(saved_file.read_text())
        differences = _differences(saved["args"], self.args.to_dict())
        if differences:
            raise ValueError(
                f"output_dir {self.args.output_dir} holds a different training run ({'; '.join(differences)}). "
                f"Choose another output_dir, pass overwrite_output_dir=True to replace it, or resume it with "
                f"resume_from_checkpoint='latest' and its settings."
            )
        if _checkpoints(self.args.output_dir):
            logger.warning(
                "%s holds checkpoints of this same run; starting again from step 0. Pass "
                "resume_from_checkpoint='latest' to continue it instead.", self.args.output_dir
            )

    # --- records -------------------------------------------------------------------------------------------------

    def _args_record(self) -> dict[str, Any]:
        return {"args": self.args.to_dict(), "num_processes": self.accelerator.num_processes}

    def _state_record(self) -> dict[str, Any]:
        accelerator = self.accelerator
        data = self.buffer.state_dict(include_tokens=False) if self.buffer is not None else {}
        counters = [data.get(name, -1) for name in ("rows_read", "tokens_read", "data_pass")]
        per_process = torch.tensor([accelerator.process_index, *counters], dtype=torch.long, device=accelerator.device)
        gathered = accelerator.gather(per_process[None]) if accelerator.num_processes > 1 else per_process[None]
        frequency = self.tracker.frequency
        return {
            "global_step": self.global_step,
            "max_steps": self.schedule.max_steps,
            "training_tokens": self._training_tokens(),
            "input_scale": self.sae.config.input_scale,
            "num_processes": accelerator.num_processes,
            "processes": [
                {"process_index": int(p), "rows_read": int(r), "tokens_read": int(t), "data_passes": int(d) + 1}
                for p, r, t, d in gathered.tolist()
            ],
            "dead_features": None if frequency is None else int((frequency < self.args.dead_feature_threshold).sum()),
            "log_history": self.log_history,
        }

    def _training_tokens(self) -> int:
        return self.global_step * self.args.train_batch_size_tokens * self.accelerator.num_processes

    def _write_json(self, path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def train_saev(
    args: SAEVTrainingArguments, model=None, processor=None, dataset=None, batches: Iterable[torch.Tensor] | None = None
) -> SAEV:
    """
    Train an SAE-V as `args` say and save it to `args.output_dir`; see [`SAEVTrainer`].

    Pass `model`, `processor` and `dataset` to use objects already in memory; otherwise they are loaded from
    `args.model_name_or_path` and `args.dataset_name`. Run the same script with `torchrun --nproc_per_node N` or
    `accelerate launch` to train data-parallel on N processes.

    Returns the trained [`SAEV`], reading raw hidden states (input scale folded into the weights).
    """
    return SAEVTrainer(args, model=model, processor=processor, train_dataset=dataset).train(batches)


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    names = sorted((set(saved) | set(current)) - RUN_ONLY_FIELDS)
    return [
        f"{name}: {saved.get(name)!r} (saved) vs {current.get(name)!r} (now)"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def _dataset_description(args: SAEVTrainingArguments, dataset: Any) -> str | None:
    if args.dataset_name is not None:
        name = args.dataset_name
        if args.dataset_config:
            name += f":{args.dataset_config}"
        return name
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or None


def _tracker_config(args: SAEVTrainingArguments) -> dict[str, Any]:
    # TensorBoard's hparams and some trackers accept only scalars.
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in args.to_dict().items()
    }


def _explained_variance(scaled_batch: torch.Tensor, output, sae: SAEV) -> torch.Tensor:
    """1 - residual variance / total variance of a batch, on scaled inputs."""
    residual = (output.reconstruction * sae.config.input_scale - scaled_batch).pow(2).sum()
    total = (scaled_batch - scaled_batch.mean(0)).pow(2).sum()
    return 1 - residual / total.clamp_min(torch.finfo(total.dtype).tiny)
