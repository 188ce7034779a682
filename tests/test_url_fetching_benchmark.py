"""benchmarks/url_fetching.py on small settings: it fetches every URL in both settings, reads the stream with and
without a worker, and records what its tables claim."""

import json

from benchmark_scripts import load_benchmark


def test_url_fetching_benchmark_records_throughput_and_the_forwards_busy_share(tmp_path):
    benchmark = load_benchmark("url_fetching")
    benchmark.main(["--urls", "24", "--documents", "20", "--repeats", "1", "--latency", "0.01", "--image-size", "32",
                    "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "2", "--layer", "1",
                    "--heads", "2", "--kv-heads", "1", "--vocab-size", "2000", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "url_fetching.json").read_text())
    throughput, pipeline = results["throughput"], results["pipeline"]
    assert throughput["urls"] == 24 and throughput["workers"] == 16
    assert throughput["images_per_second_default"] > throughput["images_per_second_one"] > 0
    assert pipeline["images"] == sum(1 + d % 3 for d in range(20))
    assert 0 < pipeline["busy_share_inline"] <= 1 and 0 < pipeline["busy_share_ahead"] <= 1
    assert "| one at a time |" in (tmp_path / "url_fetching.md").read_text()
