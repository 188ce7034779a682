"""benchmarks/patch_filtering.py (the patch filtering experiment in miniature) on tiny settings: it runs end to end
and its records hold what its tables claim."""

import json

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("patch_filtering")


def test_patch_filtering_benchmark_records_every_scorer(benchmark, tmp_path):
    record = benchmark.main(["--seeds", "0", "--fractions", "0.25", "0.75", "--pretrain-digits", "120",
                             "--pretrain-steps", "30", "--saev-digits", "60", "--saev-steps", "30",
                             "--eval-digits", "20", "--fills", "white", "--output-dir", str(tmp_path)])
    for name in ("patch_filtering.md", "patch_filtering.json", "patch_filtering.png", "patch_filtering_examples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "patch_filtering.json").read_text())
    accuracy = saved["summary"]["accuracy"]
    assert set(accuracy) == {f"white/{s}/{f}" for s in benchmark.SCORERS for f in (0.25, 0.75)}
    assert all(0 <= stat["mean"] <= 1 and len(stat["values"]) == 1 for stat in accuracy.values())
    kept = saved["summary"]["kept_paper_rule"]  # the paper's >= rule keeps ties: at least the nominal fraction
    assert all(kept[f"{s}/0.25"] >= 0.25 and kept[f"{s}/0.75"] >= 0.75 for s in benchmark.SCORERS)
    assert kept["random/0.25"] == pytest.approx(0.25)  # random scores have no ties: exactly 4 of 16 patches
    markdown = (tmp_path / "patch_filtering.md").read_text()
    assert "| cosine |" in markdown and "keep 25%" in markdown and record["seconds"] > 0
