"""The digit-captioning miniature (saev_hf.demo.digits) with small settings: the report, plots and summary."""

import json

import pytest

from saev_hf.demo.digits import SCORE_COLUMNS, DemoArguments, run_demo

SMALL = dict(pretrain_digits=100, pretrain_steps=20, saev_digits=40, saev_steps=20, num_pairs=40, dpo_steps=2,
             eval_digits=20)


def test_demo_writes_report_plots_and_summary(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(DemoArguments(output_dir=str(out), **SMALL))
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["known_low_quality_fraction"] == pytest.approx(0.3)
    assert summary["num_low_quality"] == 12 and summary["num_rows"] == 40
    assert set(summary["auroc"]) == set(SCORE_COLUMNS)
    assert all(isinstance(a, float) and 0 <= a <= 1 for a in summary["auroc"].values())
    assert set(summary["dpo"]) == {"full", "saev_cosine", "saev_l0", "saev_cooccur_l0", "random", "clean_only"}
    for name, result in summary["dpo"].items():
        assert 0 <= result["digit_accuracy"] <= 1
        assert result["rows"] == {"full": 40, "clean_only": 28}.get(name, 20)
    assert summary["dpo"]["clean_only"]["low_quality_fraction"] == 0
    for png in ("scores.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "AUROC" in report and "## What this run found" in report and "30%" in report
    assert all(column in report for column in SCORE_COLUMNS.values())
    assert (out / "saev" / "model.safetensors").exists()


def test_demo_arguments_are_checked():
    with pytest.raises(ValueError, match="low_quality_fraction"):
        DemoArguments(low_quality_fraction=1.5)
    with pytest.raises(ValueError, match="1797"):
        DemoArguments(pretrain_digits=1700)
