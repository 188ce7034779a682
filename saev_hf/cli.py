"""The `saev` command line.

Each command parses a dataclass with transformers' `HfArgumentParser`, the same dataclass the Python API takes, so
every option is defined once. `saev COMMAND --help` lists a command's options.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable

from transformers import HfArgumentParser


@dataclass
class ConvertArguments:
    """Convert an SAE-V checkpoint between saev-hf's layout and SAELens'."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint to read (either layout)."})
    output_dir: str = field(metadata={"help": "Folder to write to."})
    to: str = field(default="saev", metadata={"help": "Layout to write: 'saev' (transformers) or 'saelens'."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})

    def __post_init__(self) -> None:
        if self.to not in ("saev", "saelens"):
            raise ValueError(f"--to {self.to!r} is not a layout; use 'saev' or 'saelens'.")


@dataclass
class InfoArguments:
    """Print an SAE-V checkpoint's configuration and feature-weight summary as JSON."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint (either layout)."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})


def _load(args: ConvertArguments | InfoArguments):
    from . import SAEV

    return SAEV.from_pretrained(args.source, subfolder=args.subfolder, revision=args.revision)


def convert(args: ConvertArguments) -> None:
    sae = _load(args)
    if args.to == "saelens":
        sae.save_saelens(args.output_dir)
    else:
        sae.save_pretrained(args.output_dir)
    print(f"Wrote {args.source} as {args.to} layout to {args.output_dir}")


def info(args: InfoArguments) -> None:
    sae = _load(args)
    summary = {
        "config": sae.config.to_diff_dict(),
        "num_weighted_features": int(sae.has_feature_weight.sum()),
        "num_features": sae.config.d_sae,
    }
    print(json.dumps(summary, indent=2, default=str))


def demo(args) -> None:
    from .demo import run_demo

    summary = run_demo(args)
    if not summary["reloads_identical"]:
        raise SystemExit("saev demo: a checkpoint did not reload to identical encodings")


def _demo_arguments() -> type:
    from .demo import DemoArguments

    return DemoArguments


COMMANDS: dict[str, tuple[type | Callable[[], type], Callable]] = {
    "convert": (ConvertArguments, convert),
    "info": (InfoArguments, info),
    "demo": (_demo_arguments, demo),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `saev` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: saev COMMAND [options]   (commands: {names}; `saev COMMAND --help` for options)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"saev: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    arguments_class, run = COMMANDS[argv[0]]
    if not isinstance(arguments_class, type):  # commands whose module is heavy are imported only when used
        arguments_class = arguments_class()
    parser = HfArgumentParser(arguments_class, prog=f"saev {argv[0]}", description=arguments_class.__doc__)
    try:
        (arguments,) = parser.parse_args_into_dataclasses(argv[1:])
    except ValueError as error:
        parser.error(str(error))
    run(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
