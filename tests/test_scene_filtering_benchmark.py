"""benchmarks/scene_filtering.py (the paper's filtering sweep on the scene miniature) on tiny settings: every method's
subsets are the top of its score, the full-data run is shared, and the report says what the numbers say."""

import json

import numpy as np
import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    module = load_benchmark("scene_filtering")
    output = tmp_path_factory.mktemp("scene_filtering")
    args = module.parse_args(["--output-dir", str(output), "--seeds", "0", "1", "--fractions", "0.5", "1.0",
                              "--num-pairs", "20", "--eval-rows", "8", "--saev-steps", "20",
                              "--methods", "saev_cosine", "random", "oracle", "--dpo", '{"steps": 1, "batch_size": 2}'])
    return module, args, module.run(args), output


def test_the_sweep_records_every_method_fraction_and_seed(sweep):
    module, args, record, output = sweep
    assert json.loads((output / "scene_filtering.json").read_text()) == json.loads(json.dumps(record))
    assert (output / "scene_filtering.png").stat().st_size > 10_000
    for seed in record["seeds"]:
        assert set(seed["runs"]) == {"saev_cosine", "random", "oracle"}
        assert set(seed["auroc"]) == set(module.DETECTORS)
        assert seed["auroc"]["oracle"] == 1.0
        by_quality = seed["auroc_by_quality"]["oracle"]
        assert set(by_quality) == set(module.QUALITY_GROUPS)
        assert all(value in (1.0, None) for value in by_quality.values())
        assert by_quality["hallucination"] == by_quality["swap"] == 1.0  # 4 rows of each kind among 20
        assert set(seed["uninformative"]) <= {"saev_cosine"}  # a tiny SAE-V may weight nothing: every row ties
        for method, runs in seed["runs"].items():
            if method in seed["uninformative"]:
                assert runs["0.5"] is None  # no top half can be chosen by a score on which every row ties
            else:
                assert runs["0.5"]["rows"] == 10
            assert runs["1.0"] == seed["runs"]["random"]["1.0"]  # one shared full-data run
        assert seed["runs"]["oracle"]["0.5"]["low_quality_fraction"] == 0.0  # 12 clean rows: the top 10 are clean
        assert seed["runs"]["random"]["1.0"]["low_quality_fraction"] == pytest.approx(0.4)
    summary = record["summary"]
    accuracy = [s["runs"]["oracle"]["0.5"]["accuracy"] for s in record["seeds"]]
    assert summary["accuracy"]["oracle"]["0.5"]["mean"] == pytest.approx(np.mean(accuracy))
    assert summary["relative_to_full"]["oracle"]["1.0"]["mean"] == pytest.approx(1.0)


def test_the_report_states_the_paper_check_and_calls_inverted_scores_inverted(sweep):
    module, args, record, output = sweep
    text = (output / "scene_filtering.md").read_text()
    assert record["headline"] in text
    for seed in record["seeds"]:
        if seed["uninformative"]:
            assert f"seed {seed['seed']}: saev_cosine" in text
    assert any(word in record["headline"] for word in ("Reproduced", "Not reproduced", "Only in form"))
    for name, stat in record["summary"]["auroc"].items():
        verdict = "inverted" if stat["mean"] < 0.45 else "chance" if stat["mean"] < 0.55 else "separates"
        assert f"| {module.LABELS[name]} | {stat['mean']:.3f} ± {stat['std']:.3f} | {verdict} |" in text


def test_per_kind_aurocs_compare_the_rows_each_group_names(sweep):
    module = sweep[0]
    import datasets
    scored = datasets.Dataset.from_dict({
        "quality": ["clean", "clean", "clean", "hallucination", "swap", "swap"],
        "present": [True, False, False, False, True, False]})
    groups = module.quality_groups(scored)
    as_lists = {name: (keep.tolist(), good.tolist()) for name, (keep, good) in groups.items()}
    assert as_lists["hallucination"] == ([True, True, True, True, False, False], [True, True, True, False, False, False])
    assert as_lists["swap"] == ([True, True, True, False, True, True], [True, True, True, False, False, False])
    # hallucination rows against the clean rows about absent objects only (rows 1 and 2), not the present one (row 0)
    assert as_lists["hallucination_vs_faithful_absent"] == ([False, True, True, True, False, False],
                                                            [False, True, True, False, False, False])
    text = (sweep[3] / "scene_filtering.md").read_text()
    assert "| score | AUROC, hallucination | AUROC, swap | AUROC, hallucination vs faithful absent |" in text


def test_fractions_must_include_the_full_data_run():
    module = load_benchmark("scene_filtering")
    with pytest.raises(SystemExit):
        module.parse_args(["--fractions", "0.5"])


def test_without_dpo_the_sweep_still_reports_detectors_and_what_each_score_keeps(tmp_path):
    module = load_benchmark("scene_filtering")
    record = module.run(module.parse_args(["--output-dir", str(tmp_path), "--seeds", "0", "--fractions", "0.5", "1.0",
                                           "--num-pairs", "20", "--eval-rows", "8", "--saev-steps", "20",
                                           "--methods", "random", "oracle", "--no-dpo"]))
    runs = record["seeds"][0]["runs"]
    assert runs["oracle"]["0.5"] == {"rows": 10, "low_quality_fraction": 0.0}  # filtered, not trained
    assert record["summary"]["accuracy"]["oracle"]["0.5"] is None and record["paper_check"] == {}
    assert record["summary"]["low_quality_kept"]["oracle"]["0.5"]["mean"] == 0.0
    text = (tmp_path / "scene_filtering.md").read_text()
    assert "No DPO run" in text and "Held-out accuracy after DPO" not in text
