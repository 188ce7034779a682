"""`saev convert` and `saev info`: an SAE-V checkpoint rewritten in the other layout (saev-hf's transformers layout or
SAELens'), and a checkpoint's configuration at a glance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.folders import OutputArguments, mark_output_complete
from .modeling import SAEV

LAYOUTS = ("saev", "saelens")


@dataclass
class ConvertArguments:
    """Which layout `saev convert` writes."""

    to: str = field(default="saev", metadata={"help": "Layout to write: 'saev' (transformers) or 'saelens'.",
                                              "choices": LAYOUTS})

    def __post_init__(self) -> None:
        if self.to not in LAYOUTS:
            raise ValueError(f"--to {self.to!r} is not a layout; use 'saev' or 'saelens'.")


def convert_checkpoint(sae: SAEV, args: ConvertArguments, output: OutputArguments) -> Path:
    """Write `sae` (read from either layout) in layout `args.to` to `output.output_dir`."""
    folder = output.prepare("saev convert")
    if args.to == "saelens":
        sae.save_saelens(folder)
    else:
        sae.save_pretrained(folder)
    mark_output_complete(folder)
    return folder


def checkpoint_info(sae: SAEV) -> dict[str, Any]:
    """The checkpoint's configuration (what differs from the defaults) and how many of its features have a weight."""
    return {
        "config": sae.config.to_diff_dict(),
        "num_weighted_features": int(sae.has_feature_weight.sum()),
        "num_features": sae.config.d_sae,
    }
