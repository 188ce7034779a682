"""benchmarks/cache_throughput.py (saev_hf's activation cache against SAELens' cached activations) at small shapes:
every reader delivers every token once, and the table records each reader and the ratio."""

from benchmark_scripts import load_benchmark


def test_cache_throughput_benchmark_reads_every_token_with_each_reader(tmp_path):
    benchmark = load_benchmark("cache_throughput")
    seconds = benchmark.main(["--tokens", "3000", "--d_in", "64", "--context", "30", "--shard_tokens", "600",
                              "--batch_tokens", "300", "--rounds", "2", "--output-dir", str(tmp_path)])
    assert set(seconds) == {"saev_hf, stream order", "saev_hf, shuffled", "saev_hf bf16, shuffled", "SAELens"}
    assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
    table = (tmp_path / "cache_throughput.md").read_text()
    assert "| SAELens | " in table and "| saev_hf, shuffled | " in table and "--tokens 3000" in table
