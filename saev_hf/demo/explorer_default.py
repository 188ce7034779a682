"""What `saev explore` shows with no model named: the embedded grounded tiny LLaVA and an SAE-V trained on it with
`saev demo`'s settings, with a few held-out scenes as examples. The SAE-V is trained once and kept in
`$SAEV_HF_DEMO_CACHE` (default `$HF_HOME/saev_hf/demo_saev`), under a key of everything it depends on (the model's
weights, the settings, the library's version), so a changed model or setting never reuses a stale one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub.constants import HF_HOME

from .._version import __version__
from ..model.modeling import SAEV
from .run import EMBEDDED_MODEL, DemoArguments, load_grounded_llava, load_recipe, require_demo_packages
from .scene_saev import train_scene_saev
from .scenes import DigitScans, question_rows


def demo_cache_dir() -> Path:
    """Where the demo's SAE-Vs are kept: `$SAEV_HF_DEMO_CACHE`, else `$HF_HOME/saev_hf/demo_saev`."""
    return Path(os.environ.get("SAEV_HF_DEMO_CACHE", Path(HF_HOME) / "saev_hf" / "demo_saev"))


def demo_saev(model: Any, processor: Any, scans: DigitScans, steps: int, progress: bool = True) -> SAEV:
    """The demo's SAE-V on the embedded model: from the cache when one was trained with the same weights, settings
    and library version, else trained now (about a minute on 2 CPU threads for 1000 steps) and cached."""
    args = DemoArguments(saev_steps=steps).saev_arguments()
    weights = hashlib.sha256((EMBEDDED_MODEL / "model.safetensors").read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps({"model": weights, "saev": asdict(args), "version": __version__},
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = demo_cache_dir() / key
    if (folder / "config.json").is_file():
        return SAEV.from_pretrained(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        train_scene_saev(model, processor, scans, args, scratch, progress=progress)
        try:
            os.replace(scratch, folder)  # complete or absent: a killed run leaves no half-written SAE-V
        except OSError:  # another process cached it first
            pass
        os.makedirs(scratch, exist_ok=True)  # for TemporaryDirectory's own clean-up
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"The demo SAE-V could not be cached in {folder}.")
    return SAEV.from_pretrained(folder)


def demo_explorer_sources(steps: int = 1000, num_examples: int = 6, progress: bool = True):
    """`(sae, model, processor, examples, title)` for `saev explore` without a model: the embedded grounded LLaVA,
    the demo's SAE-V and `num_examples` held-out scenes with their questions."""
    require_demo_packages()
    model, processor = load_grounded_llava()
    recipe = load_recipe(None)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    sae = demo_saev(model, processor, scans, steps, progress)
    rows = question_rows(scans, num_examples, "held_out", np.random.default_rng([0, 31]), absent_fraction=0.0)
    examples = [(row["images"][0], row["prompt"]) for row in rows]
    return sae, model, processor, examples, "the saev demo's SAE-V (embedded grounded tiny LLaVA)"
