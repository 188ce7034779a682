"""benchmarks/scoring_speed.py on a small model: the scorer's scores are checked against the direct computation
before timing, and the baselines run in the same scorer and apart."""

from benchmark_scripts import load_benchmark


def test_scoring_speed_benchmark_checks_the_scores_and_times_every_call(capsys):
    benchmark = load_benchmark("scoring_speed")
    benchmark.main(["--examples", "4", "--batch-size", "2", "--expansions", "2", "--repeats", "1", "--warmup", "0",
                    "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "2", "--layer", "1",
                    "--heads", "2", "--kv-heads", "1", "--vocab-size", "2000", "--goal", "100"])
    out = capsys.readouterr().out
    assert "scores checked" in out and "| x2 |" in out
    assert "scorer+baselines / scorer" in out and "computed apart" in out
