"""`saev demo` (saev_hf/demo/pipeline.py): the embedded grounded model, and the pipeline end to end on small settings."""

import json

import numpy as np
import pytest

from saev_hf.cli import main
from saev_hf.demo.run import EMBEDDED_MODEL, DemoArguments, load_grounded_llava, run_demo
from saev_hf.demo.defects import DEFECTS
from saev_hf.demo.report import SCORE_COLUMNS
from saev_hf.demo import grounded_llava as gl
from saev_hf.demo.gate import auroc

SMALL = dict(imperfect_steps=0, hidden_size=32, num_heads=2, vision_hidden_size=16, batch_size=4, language_steps=20, alignment_steps=20,
             instruction_steps=20)


def test_the_embedded_model_loads_and_answers_as_recorded():
    recipe = json.loads((EMBEDDED_MODEL / "recipe.json").read_text())
    model, processor = load_grounded_llava()
    args = gl.GroundedLlavaArguments(**recipe["arguments"])
    rows = gl.recorded_questions(args)
    assert [row["prompt"] for row in rows] == recipe["recorded_questions"]
    assert gl.predict_answers(model, processor, rows) == recipe["recorded_answers"]
    assert sum((EMBEDDED_MODEL / name).stat().st_size for name in ("model.safetensors",)) < 8 * 2**20


def test_auroc_reads_inverted_scores_below_one_half():
    clean = np.array([True, True, False, False])
    assert auroc(clean, np.array([3.0, 2.0, 1.0, 0.0])) == 1.0
    assert auroc(clean, np.array([0.0, 1.0, 2.0, 3.0])) == 0.0
    assert auroc(clean, np.array([1.0, 1.0, 1.0, 1.0])) == 0.5


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("grounded")
    model, processor, summary = gl.train_grounded_llava(gl.GroundedLlavaArguments(**SMALL), eval_rows=8,
                                                        progress=False)
    gl.save_grounded_llava(model, processor, summary, path)
    return path


def test_demo_runs_the_scene_task_end_to_end_and_reports_honestly(small_model, tmp_path, capsys, monkeypatch):
    from saev_hf.demo import preference

    trained_with = []
    real = preference.dpo_and_evaluate
    monkeypatch.setattr(preference, "dpo_and_evaluate",
                        lambda *a, **k: trained_with.append(a[4]) or real(*a, **k))
    out = tmp_path / "demo"
    argv = ["demo", "--output_dir", str(out), "--grounded_llava", str(small_model), "--layer", "1",
            "--saev_steps", "10", "--num_pairs", "40", "--dpo_steps", "2", "--eval_rows", "16", "--disable_tqdm",
            "--map_clean_rows", "16", "--map_rows_per_kind", "4"]
    assert main(argv) == 0
    assert trained_with and all(a.sft_weight == 1.0 and a.steps == 2 for a in trained_with)  # DPO + SFT loss
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_rows"] == 40 and summary["num_low_quality"] == 16
    assert summary["low_quality_kinds"] == {"hallucination": 8, "swap": 8}
    informative = {f"saev_{n}" for n in SCORE_COLUMNS if n not in summary["uninformative_scores"]}
    assert set(summary["dpo"]) == {"full", "clean_only", "random"} | informative and "saev_l0" in informative
    assert summary["dpo"]["clean_only"]["low_quality_fraction"] == 0 and summary["dpo"]["full"]["rows"] == 40
    assert all(summary["dpo"][n]["rows"] == 20 for n in ("saev_l0", "random"))
    for png in ("scores.png", "dpo.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## What DPO did" in report and "hallucination rate" in report and "## What this run found" in report
    assert "plus TRL's SFT loss on the chosen answer at weight 1 as in RPO" in report
    assert ("The SAE-V filter that helped most" in report) != ("- No SAE-V filter that ranks" in report)
    for name, value in summary["auroc"].items():  # an AUROC below 0.4 is called inverted, never best
        line = next(line for line in report.splitlines() if line.startswith(f"| {SCORE_COLUMNS[name]} |"))
        assert ("inverted" in line) == (value <= 0.4)
    for name in summary["uninformative_scores"]:  # a score on which every row ties is said to be, not used
        assert f"Every row has the same {SCORE_COLUMNS[name]}" in report
    brief = summary["defect_map"]
    assert sum(brief["composition"].values()) == 16 + 4 * 8 and set(brief["kinds"]) == set(DEFECTS)
    assert report.splitlines()[2] == f"**In brief: {brief['sentence']}**"  # the report leads with it
    assert "## Which kinds of low-quality data does SAE-V's filter catch?" in report
    for kind, verdict in brief["kinds"].items():  # the verdict is the AUROC's, for every kind
        best = max(verdict["paper"][1], verdict["beyond_paper"][1])
        assert verdict["verdict"] == ("catches" if best >= 0.75 else "inverted" if best <= 0.25 else "misses")
        assert brief["auroc"][verdict["paper"][0]][kind] == verdict["paper"][1]
    # polarity's threshold: midway between the median Jaccard of clean questions about present and absent objects
    import datasets

    from saev_hf import SAEV
    from saev_hf.demo.scenes import DigitScans, question_rows
    from saev_hf.scoring import SAEVScorer, ScorerArguments

    model, processor = load_grounded_llava(str(small_model))
    questions = [r for r in question_rows(DigitScans(0.3, seed=0), 300, "held_out", np.random.default_rng([0, 23]),
                                          absent_fraction=0.5) if r["kind"] != "count"]
    scored = datasets.Dataset.from_list([{"images": r["images"], "prompt": r["prompt"]} for r in questions]).map(
        SAEVScorer(SAEV.from_pretrained(out / "saev"), model, processor,
                   args=ScorerArguments(scores=["cooccur_jaccard"])), batched=True, batch_size=32)
    jaccard, present = np.array(scored["saev_cooccur_jaccard"]), np.array([r["present"] for r in questions])
    assert brief["polarity_threshold"] == pytest.approx((np.median(jaccard[present]) + np.median(jaccard[~present])) / 2)
    assert "## What this run found" in capsys.readouterr().out
    with pytest.raises(FileExistsError):  # a folder holding someone else's files is not overwritten
        (tmp_path / "theirs").mkdir()
        (tmp_path / "theirs" / "notes.txt").write_text("mine")
        run_demo(DemoArguments(output_dir=str(tmp_path / "theirs"), grounded_llava=str(small_model)))


def test_demo_arguments_are_checked():
    with pytest.raises(ValueError, match="low_quality_fraction"):
        DemoArguments(low_quality_fraction=1.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        DemoArguments(keep_fraction=0)
    with pytest.raises(ValueError, match="dpo_sft_weight"):
        DemoArguments(dpo_sft_weight=-1.0)
    with pytest.raises(ValueError, match="map_rows_per_kind=-1 must be >= 0"):
        DemoArguments(map_rows_per_kind=-1)
    with pytest.raises(FileNotFoundError, match="No grounded LLaVA"):
        load_grounded_llava("/nonexistent/folder")


def test_demo_names_the_install_when_its_packages_are_missing(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needs matplotlib.*pip install 'saev-hf\[demo\]'"):
        run_demo(DemoArguments(output_dir=str(tmp_path / "demo")))
    assert not (tmp_path / "demo").exists()  # refused before anything was written


def test_the_report_names_the_filter_that_helped_most_and_never_an_inverted_one():
    from saev_hf.demo.report import _filter_verdict

    rand = {"accuracy": 0.70}
    filters = {"cosine": {"accuracy": 0.80}, "l0": {"accuracy": 0.72}, "cooccur_l0": {"accuracy": 0.74}}
    aurocs = {"cosine": 0.30, "l0": 0.55, "cooccur_l0": 0.68}  # the biggest gain comes from an inverted score
    line = _filter_verdict(filters, aurocs, rand)
    assert SCORE_COLUMNS["cooccur_l0"] in line and "+4.0 points" in line and SCORE_COLUMNS["cosine"] not in line
    none = _filter_verdict({"l0": {"accuracy": 0.69}, "cosine": {"accuracy": 0.9}},
                           {"l0": 0.6, "cosine": 0.2}, rand)
    assert none.startswith("- No SAE-V filter")
