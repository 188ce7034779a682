"""SAE-V checkpoints as files: converting between saev-hf's layout and SAELens' (`saev convert`), and describing one
without using it (`saev info`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import SAEV
from .outputs import prepare_output_dir


@dataclass
class ConvertArguments:
    """Convert an SAE-V checkpoint between saev-hf's layout and SAELens'."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint to read (either layout)."})
    output_dir: str = field(metadata={"help": "Folder to write to."})
    to: str = field(default="saev", metadata={"help": "Layout to write: 'saev' (transformers) or 'saelens'."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that `saev convert` did not write."},
    )

    def __post_init__(self) -> None:
        if self.to not in ("saev", "saelens"):
            raise ValueError(f"--to {self.to!r} is not a layout; use 'saev' or 'saelens'.")


@dataclass
class InfoArguments:
    """Print an SAE-V checkpoint's configuration and feature-weight summary as JSON."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint (either layout)."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})


def _load(args: ConvertArguments | InfoArguments) -> SAEV:
    return SAEV.from_pretrained(args.source, subfolder=args.subfolder, revision=args.revision)


def convert_checkpoint(args: ConvertArguments) -> Path:
    """Read the checkpoint `args.source` (either layout) and write it in layout `args.to` to `args.output_dir`."""
    prepare_output_dir(args.output_dir, "saev convert", args.overwrite_output_dir)
    sae = _load(args)
    if args.to == "saelens":
        sae.save_saelens(args.output_dir)
    else:
        sae.save_pretrained(args.output_dir)
    return Path(args.output_dir)


def checkpoint_info(args: InfoArguments) -> dict[str, Any]:
    """The checkpoint's configuration (what differs from the defaults) and how many of its features have a weight."""
    sae = _load(args)
    return {
        "config": sae.config.to_diff_dict(),
        "num_weighted_features": int(sae.has_feature_weight.sum()),
        "num_features": sae.config.d_sae,
    }
