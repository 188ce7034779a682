"""benchmarks/memory_flat.py on small settings: it samples memory through all three runs and records every mark."""

import json

from benchmark_scripts import load_benchmark


def test_memory_flat_benchmark_records_a_mark_every_thousand_rows_and_steps(tmp_path):
    benchmark = load_benchmark("memory_flat")
    benchmark.main(["--rows", "1000", "--steps", "1000", "--interval", "0.05", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "memory_flat.json").read_text())
    assert [mark for mark, _ in results["scoring"]["marks"]] == [1000]
    assert [mark for mark, _ in results["weighting a stream (two passes)"]["marks"]] == [1000, 2000]
    assert [mark for mark, _ in results["training"]["marks"]] == [1000]
    assert all(rss > 50 for result in results.values() for _, rss in result["marks"])  # MiB: a real process's RSS
    assert "| training |" in (tmp_path / "memory_flat.md").read_text()
