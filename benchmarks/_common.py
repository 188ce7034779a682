"""What every benchmark shares, in one place: import it first, before torch.

- One intra-op thread (`OMP_NUM_THREADS`, `MKL_NUM_THREADS` before torch is imported, `torch.set_num_threads(1)`): on
  the shared 2-core machines two threads make timings swing 10-40x;
- offline (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`, unless set): every benchmark builds its models and data locally;
- the checkout on `sys.path`, so that a benchmark runs from a clone without installing;
- the timing helpers: [`timed`] (one call's wall time), [`interleaved_timings`] (the one timing loop: calls warmed
  up, then timed in an order rotated every repetition, the garbage collector paused) and [`quartiles`];
- one output convention: `--output-dir DIR` ([`add_output_dir`], default `benchmarks/results`), into which a benchmark
  writes `<name>.md` (and `<name>.json`, `<name>.png` where it has them: [`output_path`]).

A benchmark starts with

```python
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
```
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
"""The checkout's root folder."""
RESULTS = ROOT / "benchmarks" / "results"
"""Where benchmarks write their results by default (committed with their commands)."""
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of `fn`, in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_timings(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each call in `calls`, `repeats` times: every call first run `warmup` times untimed, then each
    repetition times every call once, in an order rotated from one repetition to the next (so that a slow phase of the
    shared machine hits them alike), with the garbage collector paused. Compare ratios of the same repetition."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(calls[name]))
    finally:
        gc.enable()
    return times


def add_output_dir(parser: argparse.ArgumentParser, default: Path | None = RESULTS) -> None:
    """The `--output-dir` option every benchmark that writes results takes (one name, one meaning)."""
    parser.add_argument("--output-dir", type=Path, default=default, required=default is None,
                        help=f"folder to write the results to (<name>.md, and .json / .png where there are)"
                             + (f"; default {default.relative_to(ROOT)}" if default is not None else ""))


def output_path(args: argparse.Namespace, name: str, suffix: str = ".md") -> Path:
    """`args.output_dir / (name + suffix)`, its folder created."""
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}{suffix}"


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles of `values` (with fewer than 4 values, their minimum and maximum)."""
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def mean_std(values: list[float | None]) -> dict | None:
    """Mean and sample std over the seeds that have a value (None: a run that could not be made), with the values
    themselves; None when no seed has one."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "values": values}
