"""benchmarks/scoring_pipeline.py (the scorer with and without its input pipeline) on a small model: it runs end to
end, checks that every setting gives the same scores, and records what its table claims."""

import json

from benchmark_scripts import load_benchmark


def test_scoring_pipeline_benchmark_records_throughput_and_padding(tmp_path):
    benchmark = load_benchmark("scoring_pipeline")
    benchmark.main(["--examples", "8", "--batch-size", "2", "--map-batch-size", "8", "--repeats", "1",
                    "--warmup", "0", "--image-size", "32", "--hidden-size", "64", "--intermediate-size", "128",
                    "--num-layers", "2", "--layer", "1", "--heads", "2", "--kv-heads", "1", "--vocab-size", "2000",
                    "--expansion", "2", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "scoring_pipeline.json").read_text())["results"]
    assert set(results) == {"benchmark prompts", "mixed-length prompts"}
    for by_setting in results.values():
        plain, grouped = by_setting["no pipeline (map batch 2)"], by_setting["grouped (map batch 8, forward 2)"]
        assert by_setting["grouped + workers=1"]["rows_per_s"] > 0 and plain["speedup"] == 1.0
        assert grouped["padding_fraction"] < plain["padding_fraction"]
        assert 0 < by_setting[benchmark.PREPARATION]["share_of_no_pipeline"] < 1
    assert "| mixed-length prompts | grouped + workers=1 |" in (tmp_path / "scoring_pipeline.md").read_text()
