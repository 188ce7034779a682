"""Folders a command reads and writes. It reads only folders that exist (a clear error, not a Hub lookup, for a
missing one); it writes a folder only if it is new, empty, or this command's own earlier output.

`saev train`, `weights`, `convert`, `score`, `filter`, `patches`, `inspect` and `write_feature_browser` write into a
folder the user names. Pointing one at the wrong folder (the base model's, the source dataset's, another command's
result) must not destroy it: as `Trainer`'s `overwrite_output_dir`, writing into a folder that holds anything else is
refused unless the user asks for it. Each command marks the folders it writes with `saev_output.json` (its name), so
that running it again into its own output is allowed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from .distributed import distributed_state


def check_local_path(name_or_path: str | os.PathLike, what: str) -> None:
    """
    Refuse a local path that does not exist with a clear error, instead of the Hub lookup's "Couldn't reach ... on the
    Hub" that a missing folder would otherwise give. A name is a local path when it is a `PathLike`, starts with
    `.`, `/` or `~`, or has more than one `/` (a Hub repo id is `name` or `owner/name`).
    """
    text = os.fspath(name_or_path)
    local = (isinstance(name_or_path, os.PathLike) or text.startswith((".", "/", "~", "\\")) or text.count("/") > 1
             or os.path.isabs(text))
    if local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"The {what} folder {text!r} does not exist (looked for {os.path.abspath(os.path.expanduser(text))}). "
            f"Check the path; a Hub repo id has the form 'name' or 'owner/name'."
        )


OUTPUT_RECORD = "saev_output.json"
"""File each command writes into its output folder: which command wrote it (what may write there again)."""


def output_owner(path: str | os.PathLike) -> str | None:
    """The command whose output `path` is (from its `saev_output.json`), or None."""
    record = Path(path) / OUTPUT_RECORD
    try:
        return json.loads(record.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_output_dir(path: str | os.PathLike | None, command: str, overwrite: bool = False) -> Path:
    """
    Check that `command` may write into `path`, create it, and mark it as `command`'s output.

    Allowed: a folder that does not exist, an empty one, one that `command` wrote before, or any folder with
    `overwrite=True`.

    Raises:
        ValueError: no folder was named (`path` None).
        FileExistsError: naming the folder, what it holds, and the two ways out (another folder, or overwrite).
    """
    if path is None:
        raise ValueError(f"output_dir is required: the folder `{command}` writes its result to (--output_dir DIR).")
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
    _write_record(path, {"command": command, "saev_hf": __version__, "complete": False})
    return path


def _write_record(path: Path, record: dict) -> None:
    temporary = path / (OUTPUT_RECORD + ".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path / OUTPUT_RECORD)


def mark_output_complete(path: str | os.PathLike) -> None:
    """Mark a command's output folder (prepared by [`prepare_output_dir`]) complete: its command finished writing it.
    Until then readers refuse it ([`check_output_complete`]), so an interrupted command's partial output is never
    taken for a result."""
    record_path = Path(path) / OUTPUT_RECORD
    record = json.loads(record_path.read_text())
    _write_record(Path(path), {**record, "complete": True})


def check_output_complete(path: str | os.PathLike, what: str) -> None:
    """Refuse a folder that a saev command started writing but did not finish (interrupted, killed, or failed): its
    `saev_output.json` says `complete: false`. Folders without the record (written by anything else, or by an older
    version) are not checked."""
    record_path = Path(path) / OUTPUT_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("complete") is False:
        raise ValueError(f"The {what} folder {str(path)!r} is the unfinished output of `{record.get('command')}`: the "
                         f"command was interrupted or failed before it finished writing. Run it again (it may write "
                         f"into its own output), then use the result.")


@dataclass
class OutputArguments:
    """Where a command writes its result, and how it reports progress."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder to write the result to: a new or empty folder, or this command's own earlier output "
                  "(any other folder is refused unless overwrite_output_dir)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files this command did not write, or its own output "
                  "made with other settings (they may be replaced)."},
    )
    disable_tqdm: bool = field(
        default=False,
        metadata={"help": "Hide the progress bars (saev-hf's, and those datasets, transformers and huggingface_hub "
                  "draw while the command runs)."},
    )

    def prepare(self, command: str, cpu: bool = False) -> Path:
        """Check that `command` may write into `output_dir` and mark it as `command`'s output ([`prepare_output_dir`]);
        under `torchrun` / `accelerate launch` the main process first, so that the others find the folder marked as
        this command's (`cpu`: the launched processes run on CPUs)."""
        state = distributed_state(cpu=cpu)
        if state is None:
            return prepare_output_dir(self.output_dir, command, self.overwrite_output_dir)
        with state.main_process_first():
            return prepare_output_dir(self.output_dir, command, self.overwrite_output_dir)
