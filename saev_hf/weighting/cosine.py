"""The cross-modal weight of each feature (stage 2 of Algorithm 1): the mean cosine between the MLLM hidden states at
its top text and top image positions, accumulated as two sums of unit vectors per weighted feature, since
mean_ij cos(t_i, v_j) = (sum_i t_i/|t_i|) . (sum_j v_j/|v_j|) / (n_text * n_image)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .top_k import POSITION_STRIDE


class CosineAccumulator:
    """Sums of unit hidden states at each weighted feature's chosen text and image positions (pass 2)."""

    def __init__(self, weighted: torch.Tensor, chosen: torch.Tensor, per_modality: int, d_in: int,
                 center: torch.Tensor | None = None) -> None:
        self.per_modality = per_modality
        self.features = weighted.nonzero().flatten()  # features that get a weight
        slots = chosen[:, self.features]  # (2 * per_modality, q)
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        local = torch.arange(len(self.features), device=slots.device)[None].expand_as(slots)
        order = slots.flatten().argsort()
        self.need_positions = slots.flatten()[order]  # sorted stream positions needed
        self.need_feature = local.flatten()[order]  # which weighted feature (local index) needs it
        self.need_is_image = (rows.flatten() >= per_modality)[order]
        self.center = center
        # float64: each sum adds at most per_modality unit vectors, so that the order they come in (one process's
        # stream order, or the distributed runs' per-process sums) leaves the float32 weights unchanged
        self.text_sum = torch.zeros(len(self.features), d_in, dtype=torch.float64, device=slots.device)
        self.image_sum = torch.zeros(len(self.features), d_in, dtype=torch.float64, device=slots.device)
        self.seen = torch.zeros(len(self.need_positions), dtype=torch.bool, device=slots.device)

    def needed_examples(self) -> list[int]:
        """Indices of the examples (in the weighting stream) that hold a needed position."""
        return sorted(set((self.need_positions // POSITION_STRIDE).tolist()))

    @torch.no_grad()
    def update(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the unit hidden states (n, d_in) of the tokens at stream `positions` (n,) that some feature needs."""
        lo = torch.searchsorted(self.need_positions, positions, right=False)
        counts = torch.searchsorted(self.need_positions, positions, right=True) - lo
        if int(counts.sum()) == 0:
            return
        # one row per (token, feature that needs it): token index and the slot in the sorted need list
        token = torch.repeat_interleave(torch.arange(len(positions), device=counts.device), counts)
        offsets = torch.arange(len(token), device=counts.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        slot = lo[token] + offsets
        hidden = hidden_states.float()
        if self.center is not None:
            hidden = hidden - self.center
        used = counts > 0
        unit = torch.zeros_like(hidden)
        unit[used] = hidden[used] / hidden[used].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = unit.double()
        image = self.need_is_image[slot]
        self.text_sum.index_add_(0, self.need_feature[slot[~image]], unit[token[~image]])
        self.image_sum.index_add_(0, self.need_feature[slot[image]], unit[token[image]])
        self.seen[slot] = True

    def weights(self, d_sae: int) -> torch.Tensor:
        """The weights (d_sae,), NaN for features without one."""
        if not bool(self.seen.all()):
            missing = int((~self.seen).sum())
            raise RuntimeError(
                f"{missing} positions chosen in pass 1 were not seen again in pass 2: the data or the model changed "
                f"between passes (they must read the same examples in the same order)."
            )
        out = torch.full((d_sae,), math.nan, device=self.text_sum.device)
        out[self.features] = (torch.einsum("qd,qd->q", self.text_sum, self.image_sum) / self.per_modality**2).float()
        return out

    @torch.no_grad()
    def merge_across_processes(self) -> None:
        """Add up every process's sums and seen positions (each process read only some of the needed rows)."""

        dist.all_reduce(self.text_sum)
        dist.all_reduce(self.image_sum)
        seen = self.seen.to(torch.uint8)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        self.seen = seen.bool()
