"""Where work runs: the one device choice of saev-hf (accelerate's), whether an accelerator is there, and the matmul
precision an SAE-V encodes under."""

from __future__ import annotations

import contextlib
from dataclasses import field
from typing import Any

import torch
from accelerate import PartialState


def allow_tf32_field() -> Any:
    """The `allow_tf32` option of every step that encodes with an SAE-V (see [`sae_matmul_precision`])."""
    return field(default=True, metadata={
        "help": "Let a float32 SAE-V's matmuls use TF32 on a GPU that has it (Ampere and newer), only while it "
                "encodes (torch.set_float32_matmul_precision('high'), the previous setting restored afterwards): "
                "tensor-core speed, with products rounded to TF32's 10-bit mantissa (sums stay float32). No effect on "
                "the CPU or on a bf16 SAE-V. False keeps full float32 precision."
    })


def token_chunk_field() -> Any:
    """The `token_chunk` option of every step that encodes many tokens with an SAE-V: one name, one help."""
    return field(default=4096, metadata={
        "help": "Tokens the SAE-V encodes at once: bounds the memory of the (tokens, d_sae) activations."})


@contextlib.contextmanager
def sae_matmul_precision(device: torch.device | str, allow_tf32: bool = True):
    """
    Within the block, float32 matmuls may use TF32 when `device` is a CUDA device and `allow_tf32` (what an SAE-V
    encode runs under); PyTorch's global setting (`torch.get_float32_matmul_precision()`) comes back afterwards.
    A no-op on other devices, where TF32 does not exist.
    """
    if not allow_tf32 or torch.device(device).type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def choose_device(device: str | torch.device | None = "auto", use_cpu: bool = False,
                  rank: int | None = None) -> torch.device:
    """
    The device a step runs on: the one way saev-hf picks it.

    `device="auto"` (or None) is accelerate's choice: the device of this process when accelerate's state is set up (an
    `Accelerator`, a launcher), otherwise the machine's accelerator as accelerate ranks them (`PartialState.
    default_device`: CUDA, XPU, MPS, NPU, ...), else the CPU. `use_cpu` forces the CPU; any other `device` is taken as
    given. With `rank` (a `datasets.map(with_rank=True)` worker), an accelerator's device number is `rank` modulo
    the number of devices, one per worker.

    The state is read, never set up here: which backend a distributed run uses stays the launcher's and
    `Accelerator`'s decision (set up too early, it would run `torchrun` processes as separate jobs).
    """
    if use_cpu:
        return torch.device("cpu")
    if device not in (None, "auto"):
        return torch.device(device)
    state = PartialState.__new__(PartialState)  # a view of accelerate's shared state that does not initialise it
    state.__dict__ = PartialState._shared_state
    chosen = torch.device(state.device if state.initialized else state.default_device)
    if rank is not None and chosen.type != "cpu":
        chosen = torch.device(chosen.type, rank % getattr(torch, chosen.type).device_count())
    return chosen


def accelerator_available() -> bool:
    """Whether [`choose_device`] finds an accelerator (GPU, MPS, ...) on this machine."""
    return choose_device().type != "cpu"


