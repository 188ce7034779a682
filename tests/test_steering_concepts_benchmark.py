"""benchmarks/steering_concepts.py on small settings: it finds a concept feature per digit, clamps and ablates it, and
records every measure its table reports."""

import json

from benchmark_scripts import load_benchmark


def test_steering_concepts_benchmark_records_clamp_and_ablation_for_every_digit(tmp_path):
    load_benchmark("steering_concepts").main(["--rows", "24", "--concept-rows", "40", "--saev-steps", "40",
                                              "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "steering_concepts.json").read_text())
    assert [r["digit"] for r in result["digits"]] == [str(d) for d in range(10)]
    for r in result["digits"]:
        assert r["questions_other"] + r["questions_own"] == 24
        for key in ("answer_is_digit_plain", "answer_is_digit_clamped", "accuracy_other_plain",
                    "accuracy_other_ablated"):
            assert 0 <= r[key] <= 1
    assert "| digit | feature | shared |" in (tmp_path / "steering_concepts.md").read_text()
