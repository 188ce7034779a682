"""Running the data commands on many processes (`torchrun`, `accelerate launch`): which process this is, read from
accelerate's state, and how a list of work is cut between the processes.

A script is distributed by its launcher, never by an option: started alone (or as the only process of a launch), it
runs exactly as before, with no process group. `saev weights` ([`saev_hf.weighting.compute_feature_weights`]) and
`saev score` ([`saev_hf.scoring.score_dataset`]) use it; the training has accelerate's `Accelerator` for this.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Sequence

import torch.distributed as dist
from accelerate import PartialState

from .devices import accelerator_available


def distributed_state(cpu: bool = False) -> Any:
    """
    accelerate's `PartialState` when this process is one of several started together by a launcher (`torchrun`,
    `accelerate launch`, which set `WORLD_SIZE`), else None.

    The state is set up only in a launched process (`WORLD_SIZE` above 1), so that a process started alone never
    touches accelerate's shared state: setting it up joins the launcher's process group and gives each process its
    own device. `cpu=True` (or a machine without
    an accelerator) asks for the CPU backend (gloo); without it, accelerate would run each process of a CPU launch as
    a separate one-process job. Once set up (by this function, an `Accelerator` or the caller), the state is as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    state = PartialState(cpu=cpu or not accelerator_available())
    return state if state.num_processes > 1 else None


def batch_share(rows: Sequence[int], batch_size: int, state: Any) -> list[int]:
    """
    This process's share of `rows`: the forward batches of `batch_size` that one process would cut from `rows`, a
    contiguous run of whole batches per process (as accelerate's `split_between_processes` cuts a list: the first
    processes take one batch more when the batches do not divide evenly). All of `rows` without a `state`.

    Whole batches, so that each row is read in the very batch a one-process run reads it in: a row's hidden states
    can change in their last bits with the rows batched (and padded) with it, and the distributed results are to
    equal the one-process ones exactly.
    """
    rows = list(rows)
    if state is None:
        return rows
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    with state.split_between_processes(batches) as mine:
        return [row for batch in mine for row in batch]


def end_distributed() -> None:
    """Destroy the process group that a launcher (`torchrun`, `accelerate launch`) had this process join, as PyTorch
    asks every trainer process to do at the end of its script; a no-op outside a distributed run.

    Left to interpreter exit, gloo's worker threads can abort the process (`terminate called without an active
    exception`) after the work is done. Call it once nothing uses the DDP-wrapped SAE-V any more: the trainer is
    collected first, so that no DDP reducer is torn down after the group it reduces over.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
