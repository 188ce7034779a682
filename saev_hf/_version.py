"""The version of saev-hf, from one source: the installed package's metadata (written from pyproject.toml); a source
checkout put on `PYTHONPATH` without installing reads pyproject.toml itself."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path


def _version() -> str:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
    if re.search(r'^name = "saev-hf"$', text, re.MULTILINE):  # a checkout: its own version, not an installed copy's
        return re.search(r'^version = "([^"]+)"$', text, re.MULTILINE).group(1)
    return importlib.metadata.version("saev-hf")


__version__ = _version()
