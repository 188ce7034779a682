"""benchmarks/half_precision_scores.py on a few rows: it scores three ways and counts what moved."""

import json

from benchmark_scripts import load_benchmark


def test_half_precision_benchmark_counts_the_rows_each_score_moved(tmp_path):
    load_benchmark("half_precision_scores").main(["--rows", "8", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "half_precision_scores.json").read_text())
    assert set(results) == {"bfloat16 model, float32 SAE-V (default)", "bfloat16 model, bfloat16 SAE-V"}
    for by_column in results.values():
        assert set(by_column) == {"saev_cosine_score", "saev_l0", "saev_cooccur_l0"}
        assert all(0 <= c["rows_moved"] <= 8 and c["largest_change"] >= 0 for c in by_column.values())
    assert results["bfloat16 model, float32 SAE-V (default)"]["saev_l0"]["rows_moved"] > 0  # the states were rounded
