"""What a training run does at each optimizer step: the learning-rate and L1 schedules ([`TrainingSchedule`]), and the
windows of steps over which feature firing is counted for the dead-feature metric and the sparsity the SAE-V keeps
([`FeatureFiringCounter`])."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class FeatureFiringCounter:
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
