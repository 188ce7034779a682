"""SAE-Vs built for tests and benchmarks on the tiny models: a random SAE-V on a random tiny model fires on
everything, so scores would not tell rows apart. [`data_driven_sae`] makes one whose features do."""

from __future__ import annotations

from typing import Any

import torch

from ..model.config import SAEVConfig
from ..model.modeling import SAEV


@torch.no_grad()
def data_driven_sae(reader: Any, rows: Any, d_sae: int = 192, delta: float = 0.05) -> SAEV:
    """
    An SAE-V of `reader`'s layer whose features are directions of sampled token states of `rows` (centred), each
    firing on tokens like its own (encoder and decoder along the direction, a bias of half its norm), so that rows
    differ in which features co-occur. `delta` is its co-occurrence bound.
    """
    acts = reader.read(rows[:])
    hidden = acts.hidden_states[acts.token_mask]
    mean = hidden.mean(0)
    picked = hidden[torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(0))[:d_sae]] - mean
    sae = SAEV(SAEVConfig(d_in=hidden.shape[1], d_sae=d_sae, hook_layer=reader.layer, cooccurrence_threshold=delta,
                          apply_b_dec_to_input=True))
    directions = torch.nn.functional.normalize(picked, dim=-1)
    sae.W_enc.copy_(directions.T)
    sae.W_dec.copy_(directions)
    sae.b_dec.copy_(mean)
    sae.b_enc.copy_(-0.5 * picked.norm(dim=-1))
    return sae
