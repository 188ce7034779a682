"""[`SAEVRun`]: one SAE-V under training and everything that is its own (optimizer, LR schedule, firing counter, metric
sums, log history). [`saev_hf.training.SAEVTrainer`] holds one, or one per sweep member, and steps each on the same
batch."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ..model.config import SAEVConfig
from ..model.modeling import SAEV
from .arguments import SAEVTrainingArguments
from .schedule import FeatureFiringCounter

LOG_SPARSITY_EPS = 1e-10  # SAELens' epsilon: a feature that never fired gets log10 sparsity -10


class SAEVRun:
    """
    One SAE-V under training and everything that is its own: the SAE-V, Adam and the LR scheduler (as
    `accelerator.prepare` returns them), its [`TrainingSchedule`], its [`FeatureFiringCounter`], its metric sums and
    log history. [`SAEVTrainer`] holds one (a single run) or one per sweep member, and steps each on the same batch.

    Args:
        args ([`SAEVTrainingArguments`]): this SAE-V's arguments (a sweep member's: the base ones with its overrides).
        config ([`SAEVConfig`]): the SAE-V to build. It is initialised right after `torch.manual_seed(args.seed)`, so
            a sweep member starts from the weights a separate run with its arguments starts from.
        accelerator (`accelerate.Accelerator`): prepares the SAE-V, the optimizer and the scheduler.
        name (`str`, *optional*, defaults to `""`): the sweep member's name: its folder under `output_dir` (and in
            checkpoints), the prefix `name/` of its metrics in the trackers and of its counters in checkpoints. `""`
            for a single run, whose folder is `output_dir` itself.

    Attributes:
        sae ([`SAEV`]), prepared_sae, optimizer, lr_scheduler, schedule ([`TrainingSchedule`]), firing_counter
        ([`FeatureFiringCounter`]), log_history (`list[dict]`): as described on [`SAEVTrainer`].
    """

    def __init__(self, args: SAEVTrainingArguments, config: SAEVConfig, accelerator, name: str = "") -> None:
        self.args, self.name, self.accelerator = args, name, accelerator
        self.schedule = args.schedule(accelerator.num_processes)
        torch.manual_seed(args.seed)  # the same initialisation on every process, for every data order, in a sweep
        self.sae = SAEV(config).to(accelerator.device)
        optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_factor)
        self.prepared_sae, self.optimizer, self.lr_scheduler = accelerator.prepare(self.sae, optimizer, scheduler)
        self.firing_counter = FeatureFiringCounter(
            config.d_sae, args.dead_feature_window, self.schedule.max_steps, accelerator.device
        )
        self.log_history: list[dict[str, Any]] = []
        self._log_sums: dict[str, torch.Tensor] = {}
        self._steps_in_log = 0
        self._logged_at = 0
        self._last_rates = (float(args.learning_rate), float(args.l1_coefficient))
        self.diverged: str | None = None  # set when its loss or weights became non-finite: where and what

    def check_divergence(self, steps_done: int, logs: dict[str, float], logged_since: int) -> None:
        """Record where this run diverged when its logged loss (the mean since step `logged_since`) or its weights
        are no longer finite; a diverged run takes no more steps and is never saved as trained."""
        if self.diverged is not None:
            return
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.diverged = (f"its loss became {loss} between steps {logged_since + 1} and {steps_done} (the mean "
                             f"logged at step {steps_done})")
        elif any(not torch.isfinite(p).all() for p in self.sae.parameters()):
            self.diverged = f"its weights held NaN or inf at step {steps_done}"

    @property
    def metric_prefix(self) -> str:
        """Prefix of this SAE-V's metrics in the trackers: `name/` in a sweep, nothing in a single run."""
        return f"{self.name}/" if self.name else ""

    def train_step(self, batch: torch.Tensor, step: int) -> None:
        """Optimizer step `step` (0-based) on `batch`; counts firing features and adds the step's metrics to the
        running sums."""
        args, accelerator = self.args, self.accelerator
        l1 = self.schedule.l1_coefficient(step, args.l1_coefficient)
        output = self.prepared_sae(batch, l1_coefficient=l1)
        accelerator.backward(output.loss)
        grad_norm = (
            accelerator.clip_grad_norm_(self.prepared_sae.parameters(), args.max_grad_norm)
            if args.max_grad_norm  # None or 0: no clipping (and no norm to log)
            else None
        )
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.firing_counter.update(output.feature_acts)
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
                self._log_sums[name] = self._log_sums.get(name, 0) + value.float().to(accelerator.device)
        self._steps_in_log += 1
        self._last_rates = (lr, l1)

    def log(self, steps_done: int) -> dict[str, float]:
        """After `steps_done` steps: the dead features when a firing window closes, the metrics' means every
        `logging_steps` (averaged over processes) and at the last step. Added to `log_history`; returned."""
        args, accelerator = self.args, self.accelerator
        logs: dict[str, float] = {}
        if self.diverged is not None:  # it takes no steps any more: nothing to log
            return logs
        if self.firing_counter.window_ends_at(steps_done - 1):
            frequency = self.firing_counter.close_window(accelerator.reduce if accelerator.num_processes > 1 else None)
            logs["dead_features"] = int((frequency < args.dead_feature_threshold).sum())
        if steps_done % args.logging_steps == 0 or steps_done == self.schedule.max_steps:
            sums = self._log_sums
            means = torch.stack([sums[name] for name in sums]) / self._steps_in_log
            if accelerator.num_processes > 1:
                means = accelerator.reduce(means, "mean")
            logs.update({name: float(value) for name, value in zip(sums, means)})
            lr, l1 = self._last_rates
            logs.update({"learning_rate": lr, "l1_coefficient": l1})
            self._log_sums, self._steps_in_log = {}, 0
        if logs:
            self.log_history.append({"step": steps_done, **logs})
        if "loss" in logs or steps_done == self.schedule.max_steps:
            self.check_divergence(steps_done, logs, self._logged_at)
            self._logged_at = steps_done
        return logs

    @torch.no_grad()
    def export_sae(self, training_tokens: int) -> SAEV:
        """A copy of the SAE as it would be saved: provenance recorded, sparsity filled, input scale folded."""
        sae = copy.deepcopy(self.sae)
        sae.config.training_tokens = training_tokens
        if self.firing_counter.frequency is not None:
            log_sparsity = torch.log10(self.firing_counter.frequency + LOG_SPARSITY_EPS)
            sae.feature_log_sparsity.copy_(log_sparsity.to(sae.feature_log_sparsity))
        return sae.fold_input_scale()

    def args_record(self, source: dict[str, Any]) -> dict[str, Any]:
        """Its `training_args.json`: what a single run with these arguments, reading `source` (the trainer's record
        of the model, data and columns), writes."""
        return {"args": self.args.to_dict(), "source": source, "num_processes": self.accelerator.num_processes}

    def state_record(self, shared: dict[str, Any]) -> dict[str, Any]:
        """Its `trainer_state.json`: the run's shared record (steps, tokens, input scale, processes) with its own
        dead features and log history."""
        frequency = self.firing_counter.frequency
        return {
            **shared,
            "dead_features": None if frequency is None else int((frequency < self.args.dead_feature_threshold).sum()),
            "log_history": self.log_history,
        }

    def counter_state(self) -> dict[str, torch.Tensor]:
        """The firing counter's tensors for a checkpoint, under keys prefixed with `name/` in a sweep."""
        prefix = self.metric_prefix
        return {prefix + key: value for key, value in self.firing_counter.state_dict().items()}

    def load_counter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the firing counter from a checkpoint's tensors ([`counter_state`])."""
        prefix = self.metric_prefix
        self.firing_counter.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                             if key.startswith(prefix) and "/" not in key[len(prefix):]})


def _explained_variance(scaled_batch: torch.Tensor, output, sae: SAEV) -> torch.Tensor:
    """1 - residual variance / total variance of a batch, on scaled inputs."""
    residual = (output.reconstruction * sae.config.input_scale - scaled_batch).pow(2).sum()
    total = (scaled_batch - scaled_batch.mean(0)).pow(2).sum()
    return 1 - residual / total.clamp_min(torch.finfo(total.dtype).tiny)
