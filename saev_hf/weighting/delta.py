"""Calibrating the co-occurrence bound delta on data: [`PositiveSample`] keeps a uniform sample of an SAE-V's positive
activations over a stream (independent of how the stream is chunked, mergeable across processes), whose quantile
becomes delta (`saev weights --threshold_quantile`)."""

from __future__ import annotations

import torch


class PositiveSample:
    """A uniform random sample (at most `capacity` values) of the positive activations of a stream, for quantiles:
    each value gets a random key and the smallest keys are kept, so the sample does not depend on chunking."""

    def __init__(self, capacity: int = 1 << 20, seed: int = 0) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.values = torch.empty(0)
        self.keys = torch.empty(0)
        self.seen = 0

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor) -> None:
        positive = feature_acts[feature_acts > 0].float().cpu()
        self.seen += len(positive)
        keys = torch.rand(len(positive), generator=self.generator)
        values, keys = torch.cat([self.values, positive]), torch.cat([self.keys, keys])
        if len(keys) > self.capacity:
            keys, kept = keys.topk(self.capacity, largest=False)
            values = values[kept]
        self.values, self.keys = values, keys

    @torch.no_grad()
    def merge(self, samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """
        Become the sample of several streams, given each one's `(values, keys, seen)` (this one's among them): the
        values with the `capacity` smallest keys. When all the positives fit (`seen` summed at most `capacity`),
        that is every positive, so quantiles equal one sample of the whole stream; otherwise it is still a uniform
        sample of it (every value has an independent uniform key: a distributed weighting seeds each process's
        generator with `seed + process_index`), but another one than a single process draws.
        """
        self.values = torch.cat([values for values, _, _ in samples])
        self.keys = torch.cat([keys for _, keys, _ in samples])
        self.seen = sum(seen for _, _, seen in samples)
        if len(self.keys) > self.capacity:
            self.keys, kept = self.keys.topk(self.capacity, largest=False)
            self.values = self.values[kept]

    @property
    def size(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float:
        if not self.size:
            raise ValueError("The SAE-V never fired on the weighting data, so delta cannot be calibrated on it.")
        return float(torch.quantile(self.values.double(), q))
