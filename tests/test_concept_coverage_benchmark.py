"""benchmarks/concept_coverage.py (issue 25, item 3) on tiny settings: each configuration's SAE-V is trained as asked
and every concept is counted once, as covered or as missing, in the json and the report."""

import json

from benchmark_scripts import load_benchmark

from saev_hf.demo.scenes import CONCEPTS


def test_each_configuration_reports_every_concept_once(tmp_path):
    module = load_benchmark("concept_coverage")
    configs = [{"steps": 20, "expansion_factor": 1}, {"steps": 20, "expansion_factor": 2, "training_rows": 60}]
    args = module.parse_args(["--output-dir", str(tmp_path), "--rows", "30", "--configs", json.dumps(configs)])
    record = module.main(args)
    assert [r["d_sae"] for r in record["results"]] == [128, 256]  # the embedded model's d_in is 128
    assert record["results"][1]["saev"]["training_rows"] == 60
    for result in record["results"]:
        assert sorted(result["shared"] + result["missing"]) == sorted(CONCEPTS)
        assert [c["concept"] for c in result["concepts"] if c["shared"]] == result["shared"]
    text = (tmp_path / "concept_coverage.md").read_text()
    assert all(f"| {r['d_sae']} | 20 |" in text for r in record["results"])
    assert json.loads((tmp_path / "concept_coverage.json").read_text())["results"][0]["missing"] == \
        record["results"][0]["missing"]
