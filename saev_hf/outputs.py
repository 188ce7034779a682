"""Where commands write: a folder is written only if it is new, empty, or this command's own earlier output.

`saev train`, `weights`, `convert`, `score`, `filter`, `patches`, `inspect` and `write_feature_browser` write into a
folder the user names. Pointing one at the wrong folder (the base model's, the source dataset's, another command's
result) must not destroy it: as `Trainer`'s `overwrite_output_dir`, writing into a folder that holds anything else is
refused unless the user asks for it. Each command marks the folders it writes with `saev_output.json` (its name), so
that running it again into its own output is allowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTPUT_RECORD = "saev_output.json"
"""File each command writes into its output folder: which command wrote it (what may write there again)."""


def output_owner(path: str | os.PathLike) -> str | None:
    """The command whose output `path` is (from its `saev_output.json`), or None."""
    record = Path(path) / OUTPUT_RECORD
    try:
        return json.loads(record.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_output_dir(path: str | os.PathLike, command: str, overwrite: bool = False) -> Path:
    """
    Check that `command` may write into `path`, create it, and mark it as `command`'s output.

    Allowed: a folder that does not exist, an empty one, one that `command` wrote before, or any folder with
    `overwrite=True`.

    Raises:
        FileExistsError: naming the folder, what it holds, and the two ways out (another folder, or overwrite).
    """
    from . import __version__

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output_dir {str(path)!r} is a file, not a folder. Name a folder to write into.")
    entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    owner = output_owner(path) if entries else None
    if entries and owner != command and not overwrite:
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        whose = f"the output of `{owner}`" if owner else f"files that `{command}` did not write"
        raise FileExistsError(
            f"output_dir {str(path)!r} already holds {whose} ({shown}); writing there could replace them. Choose a "
            f"new or empty folder, or pass overwrite_output_dir=True (--overwrite_output_dir) to write into it anyway."
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_RECORD).write_text(json.dumps({"command": command, "saev_hf": __version__}, indent=2))
    return path
