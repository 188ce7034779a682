"""benchmarks/conditional_dpo_probe.py on a few steps: corrupted images make the chosen answer wrong, and training
changes the policy, never the model it started from."""


import numpy as np

from saev_hf.demo.scenes import DigitScans, preference_rows

from benchmark_scripts import load_benchmark


def _module():
    return load_benchmark("conditional_dpo_probe")


def test_a_corrupted_image_makes_the_chosen_answer_wrong():
    module = _module()
    scans = DigitScans()
    rng = np.random.default_rng(0)
    rows = [r for r in preference_rows(scans, 60, "train", rng, low_quality_fraction=0.0) if r["concept"]]
    assert any(r["present"] for r in rows) and any(not r["present"] for r in rows)
    for row in rows:
        assert module.corrupted_image(row, scans, rng).size == (24, 24)
    # a present object's corrupted scene lacks it; an absent one's holds it (checked through the scene generator)
    present = next(r for r in rows if r["present"])
    state = np.random.default_rng(5)
    expected = module.random_scene(np.random.default_rng(5), scans, "train", avoid={present["concept"]})
    assert present["concept"] not in expected.concepts
    assert np.array_equal(np.asarray(module.corrupted_image(present, scans, state)), np.asarray(expected.image(scans)))


def test_the_probe_trains_a_copy_and_reports_accuracy_before_and_after():
    module = _module()
    record = module.run(module.parse_args(["--steps", "2", "--batch-size", "2", "--num-pairs", "10",
                                           "--eval-rows", "8", "--anchor", "1.0", "--learning-rate", "1e-3"]))
    assert record["train_rows"] == 6 and record["base"]["rows"] == record["after"]["rows"] == 8
    assert record["max_parameter_change"] > 0  # the policy trained; the model it copied is what "base" measured
