"""benchmarks/filtering_experiment.py (the paper's data-filtering experiment in miniature) on tiny settings: it runs
end to end, and its records hold what its tables claim."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark

# 40 pretraining steps: with 10 the tiny model gives every row the same SAE-V scores, which filter_by_score refuses
TINY = ["--seeds", "0", "--fractions", "0.5", "1.0", "--pretrain-digits", "60", "--pretrain-steps", "40",
        "--saev-digits", "30", "--saev-steps", "10", "--num-pairs", "20", "--dpo-steps", "2", "--eval-digits", "10"]


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("filtering_experiment")


@pytest.fixture(scope="module")
def experiment(benchmark, tmp_path_factory):
    output = tmp_path_factory.mktemp("filtering_experiment")
    record, seed_runs = benchmark.run_experiment(benchmark.parse_args([*TINY, "--output-dir", str(output)]))
    return output, record, seed_runs


def test_writes_markdown_json_and_plot(experiment):
    output, record, _ = experiment
    assert json.loads((output / "filtering_experiment.json").read_text()) == json.loads(json.dumps(record))
    assert (output / "filtering_experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (output / "filtering_experiment.md").read_text()
    assert record["headline"] in markdown and "## What this shows" in markdown
    assert "| SAE-V co-occurring L0 | " in markdown and "keep 50%" in markdown and "keep 100%" in markdown


def test_every_method_has_every_fraction_and_aurocs_are_probabilities(benchmark, experiment):
    _, record, _ = experiment
    summary = record["summary"]
    for table in ("accuracy", "relative_to_full", "low_quality_kept"):
        assert set(summary[table]) == set(benchmark.METHODS)
        assert all(set(by_fraction) == {"0.5", "1.0"} for by_fraction in summary[table].values())
    assert set(summary["auroc"]) == set(benchmark.AUROC_SCORES)
    assert all(0 <= stat["mean"] <= 1 and len(stat["values"]) == 1 for stat in summary["auroc"].values())
    assert all(0 <= stat["mean"] <= 1 for by_fraction in summary["accuracy"].values() for stat in by_fraction.values())
    assert set(record["paper_check"]) == set(benchmark.METHODS)


def test_full_data_is_one_shared_run(benchmark, experiment):
    _, record, _ = experiment
    runs = record["seeds"][0]["runs"]
    full = [runs[method]["1.0"] for method in benchmark.METHODS]
    assert all(run == full[0] for run in full) and full[0]["rows"] == 20
    assert all(record["summary"]["relative_to_full"][m]["1.0"]["mean"] == 1.0 for m in benchmark.METHODS)


def test_subsets_have_the_requested_size_and_the_oracle_keeps_clean_rows(benchmark, experiment):
    _, record, seed_runs = experiment
    seed = record["seeds"][0]
    assert seed["num_rows"] == 20 and seed["num_low_quality"] == 10  # --low-quality-fraction 0.5 by default
    assert all(seed["runs"][method]["0.5"]["rows"] == 10 for method in benchmark.METHODS)
    assert seed["runs"]["oracle"]["0.5"]["low_quality_fraction"] == 0.0
    assert seed["runs"]["random"]["1.0"]["low_quality_fraction"] == 0.5
    scored = seed_runs[0].scored
    assert scored["oracle"] == [0.0 if low else 1.0 for low in scored["low_quality"]]
    assert seed["auroc"]["random"] == pytest.approx(_auroc(scored["random_score"], scored["low_quality"]))


def _auroc(scores, low):
    """Probability that a clean row outscores a low-quality one (ties count half), by counting pairs."""
    clean = [s for s, is_low in zip(scores, low) if not is_low]
    bad = [s for s, is_low in zip(scores, low) if is_low]
    wins = sum((c > b) + 0.5 * (c == b) for c in clean for b in bad)
    return wins / (len(clean) * len(bad))


def test_log_likelihood_baseline_matches_an_independent_computation(experiment):
    _, _, seed_runs = experiment
    run = seed_runs[0]
    model, processor, scored = run.model, run.processor, run.scored
    for index in (0, 7, 13):
        row = scored[index]
        answer = row["chosen"][0]["content"][0]["text"]
        question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]}]
        conversation = [*question, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full_text = processor.apply_chat_template(conversation, tokenize=False)
        prompt_text = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        assert full_text.startswith(processor.tokenizer.bos_token)  # the template writes it: add no other
        inputs = processor(images=[row["images"][0]], text=[full_text], return_tensors="pt", add_special_tokens=False)
        start = processor(images=[row["images"][0]], text=[prompt_text], return_tensors="pt",
                          add_special_tokens=False)["input_ids"].shape[1]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(**inputs).logits[0, :-1].double(), dim=-1)
        targets = inputs["input_ids"][0, 1:]
        expected = log_probs[start - 1 :].gather(1, targets[start - 1 :, None]).sum()
        assert row["chosen_log_likelihood"] == pytest.approx(float(expected), abs=1e-4)


def test_pretrained_answer_column_agrees_with_digit_accuracy(experiment):
    from saev_hf.testing.digit_data import DIGIT_NAMES
    from saev_hf.testing.tiny_pretraining import digit_accuracy

    _, record, seed_runs = experiment
    run = seed_runs[0]
    for index in range(6):
        row = run.scored[index]
        claimed = DIGIT_NAMES.index(row["chosen"][0]["content"][0]["text"].split()[-2])
        named = digit_accuracy(run.model, run.processor, [(row["images"][0], claimed)]) == 1.0
        assert row["pretrained_names_chosen"] == named
    kept = record["seeds"][0]["runs"]["random"]["1.0"]["pretrained_names_chosen_fraction"]
    assert kept == pytest.approx(sum(run.scored["pretrained_names_chosen"]) / 20)


def test_the_digit_captioning_settings_are_checked():
    digit_captioning = load_benchmark("digit_captioning")
    with pytest.raises(ValueError, match="low_quality_fraction"):
        digit_captioning.DigitCaptioningArguments(low_quality_fraction=1.5)
    with pytest.raises(ValueError, match="1797"):
        digit_captioning.DigitCaptioningArguments(pretrain_digits=1700)
