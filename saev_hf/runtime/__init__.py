"""Plumbing every stage shares: where work runs (`devices`), which process of a launched run this is (`distributed`),
which folders a command may read and write (`folders`, [`OutputArguments`]) and progress bars (`progress`)."""

from .devices import accelerator_available, choose_device
from .distributed import end_distributed
from .folders import OutputArguments, prepare_output_dir
from .progress import disable_progress_bars, enable_progress_bars, progress_bars

__all__ = ["OutputArguments", "accelerator_available", "choose_device", "disable_progress_bars",
           "enable_progress_bars", "end_distributed", "prepare_output_dir", "progress_bars"]
