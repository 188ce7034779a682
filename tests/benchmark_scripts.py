"""The benchmark scripts (`benchmarks/*.py`: scripts, not a package) loaded as modules, for the tests that run them on
tiny settings."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A fresh module of `benchmarks/<name>.py`, registered in `sys.modules` as the importlib recipe asks (its
    dataclasses resolve their annotations through it)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
