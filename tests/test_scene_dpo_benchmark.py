"""benchmarks/scene_dpo.py (does DPO on the scene rows help?) on tiny settings: its records hold what its table says."""

import json

from benchmark_scripts import load_benchmark


def test_scene_dpo_benchmark_records_clean_and_all_runs_per_setup(tmp_path):
    module = load_benchmark("scene_dpo")
    configs = [{"steps": 1, "batch_size": 2}, {"steps": 1, "batch_size": 2, "beta": 0.5}]
    record = module.run(module.parse_args(["--output-dir", str(tmp_path), "--configs", json.dumps(configs),
                                           "--num-pairs", "10", "--eval-rows", "8", "--on-policy",
                                           "--refusal-rejected", "1.0", "--seeds", "0", "1"]))
    assert json.loads((tmp_path / "scene_dpo.json").read_text()) == json.loads(json.dumps(record))
    assert [seed["seed"] for seed in record["seeds"]] == [0, 1]
    for seed in record["seeds"]:
        assert seed["num_pairs"] == 10 and seed["num_clean"] == 6 and seed["base"]["rows"] == 8
        assert [entry["config"] for entry in seed["results"]] == configs
        for entry in seed["results"]:
            assert entry["clean"]["train_rows"] == 6 and entry["all"]["train_rows"] == 10
    table = (tmp_path / "scene_dpo.md").read_text()
    assert table.count("| `{") == 2 + 2 + 2 * 2  # the main table, the paired effects, then clean and all by question kind
    assert "likeliest wrong answer" in table and "rejecting 'none'" in table and "Seeds 0, 1" in table


def test_an_effect_counts_only_beyond_the_seed_spread():
    module = load_benchmark("scene_dpo")
    assert module._beyond([0.80, 0.82, 0.84], [0.70, 0.71, 0.72])
    assert not module._beyond([0.80, 0.70, 0.90], [0.75, 0.74, 0.76])  # a higher mean within the spread
    assert module._beyond([0.80], [0.79])  # one seed has no spread


def test_on_policy_subsets_differ_only_by_the_low_quality_rows(tmp_path, monkeypatch):
    module = load_benchmark("scene_dpo")
    subsets = []
    monkeypatch.setattr(module, "dpo_and_evaluate", lambda model, processor, rows, *rest: subsets.append(rows) or
                        {"accuracy": 0.0, "hallucination_rate": 0.0, "by_kind": {}, "train_rows": len(rows)})
    monkeypatch.setattr(module, "on_policy", lambda model, processor, rows: [{**r, "rejected": "on-policy"} for r in rows])
    module.run(module.parse_args(["--output-dir", str(tmp_path), "--configs", '[{"steps": 1}]', "--num-pairs", "10",
                                  "--eval-rows", "4", "--on-policy"]))
    clean, every = subsets
    assert all(row["rejected"] == "on-policy" for row in clean)
    assert [row for row in every if not row["low_quality"]] == clean  # the same clean rows in both subsets
    assert all(row["rejected"] != "on-policy" for row in every if row["low_quality"])


def test_paired_effects_count_the_seeds_that_go_the_right_way():
    module = load_benchmark("scene_dpo")
    assert module._paired([0.72, 0.70, 0.75], [0.70, 0.69, 0.76], 1) == "+0.7 ± 1.5 (2/3 seeds)"
    assert module._paired([0.50, 0.40], [0.80, 0.70], -1) == "-30.0 ± 0.0 (2/2 seeds)"
