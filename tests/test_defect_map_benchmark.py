"""benchmarks/defect_map.py (issue 25's map of defect kinds) on tiny settings: every score's AUROC per defect kind and
per kind of clean row, DPO on both mixes with a composition-matched control, the model-level score, and a merge of
seeds run side by side that equals one run of them."""

import json

import numpy as np
import pytest

from benchmark_scripts import load_benchmark

TINY = ["--clean", "24", "--per-kind", "6", "--absent-shares", "0.25", "--saev", '{"steps": 40}', "--fractions", "0.5",
        "--methods", "saev_cooccur_jaccard", "saev_polarity_jaccard", "random", "oracle", "--dpo-steps", "2",
        "--eval-rows", "16", "--weighting-rows", "24"]


@pytest.fixture(scope="module")
def defect_map(tmp_path_factory):
    module = load_benchmark("defect_map")
    output = tmp_path_factory.mktemp("defect_map")
    runs = []
    for seed in (0, 1):
        args = module.parse_args(["--output-dir", str(output), "--seeds", str(seed), "--dpo", "--name", f"s{seed}",
                                  *TINY])
        runs.append(module.run(args))
    merged = module.run(module.parse_args(["--output-dir", str(output), "--name", "merged", "--merge",
                                           str(output / "s0.json"), str(output / "s1.json")]))
    return module, runs, merged, output


def test_every_score_has_an_auroc_per_defect_kind_and_the_oracle_is_perfect(defect_map):
    module, runs, merged, output = defect_map
    table = runs[0]["seeds"][0]["pools"]["0.25"]["auroc"]
    assert set(table) == set(module.SCORES)
    groups = {*module.DEFECTS, "prompt_defects", "response_defects"}
    assert groups <= set(table["oracle"]) and all(table["oracle"][g] == 1.0 for g in groups)
    assert all(0.0 <= value <= 1.0 for row in table.values() for value in row.values())
    assert {"clean_present_vs_prompt", "clean_absent_vs_response", "clean_count_vs_prompt"} <= set(table["oracle"])
    composition = runs[0]["seeds"][0]["pools"]["0.25"]["composition"]
    assert all(composition[kind] == 6 for kind in module.DEFECTS)


def test_dpo_runs_every_method_with_a_composition_matched_control(defect_map):
    module, runs, merged, output = defect_map
    for family in ("prompt", "response"):
        mix = runs[0]["seeds"][0]["dpo"][family]
        assert set(mix["runs"]) == {"full@1.0", "saev_cooccur_jaccard@0.5", "saev_polarity_jaccard@0.5",
                                    "random@0.5", "oracle@0.5", "matched_random@0.5"}
        assert mix["rows"] == 24 + 6 * 4
        matched_to = {"prompt": "saev_cooccur_jaccard", "response": "saev_polarity_jaccard"}[family]
        assert mix["runs"]["matched_random@0.5"]["composition"] == mix["runs"][f"{matched_to}@0.5"]["composition"]
        assert mix["runs"]["oracle@0.5"]["defect_share"] == 0.0  # 24 clean rows of 48: the top half is clean
        assert mix["runs"]["full@1.0"]["defect_share"] == pytest.approx(0.5)
        for run in mix["runs"].values():
            assert run["rows"] == sum(run["composition"].values())
            assert np.isfinite(run["mean_cosine_score"])


def test_a_merge_of_seeds_equals_their_runs_and_reports_them(defect_map):
    module, runs, merged, output = defect_map
    assert [s["seed"] for s in merged["seeds"]] == [0, 1]
    oracle = merged["summary"]["auroc"]["0.25"]["saev_cooccur_jaccard"]["swap"]
    values = [r["seeds"][0]["pools"]["0.25"]["auroc"]["saev_cooccur_jaccard"]["swap"] for r in runs]
    assert oracle["mean"] == pytest.approx(np.mean(values)) and oracle["values"] == values
    assert len(merged["summary"]["model_level"]["per_seed"]) == 2
    text = (output / "merged.md").read_text()
    assert "## AUROC, clean rows vs each defect kind" in text and "### prompt defects" in text
    assert "The paper's model-level score" in text and (output / "merged.png").stat().st_size > 10_000
    assert json.loads((output / "merged.json").read_text())["summary"] == json.loads(json.dumps(merged["summary"]))


def test_matched_to_must_be_a_method_that_runs():
    module = load_benchmark("defect_map")
    with pytest.raises(SystemExit):
        module.parse_args(["--dpo", "--methods", "random"])
