"""benchmarks/imperfect_instruction.py on a recipe shrunk to seconds: stage 4 variants from one stage-3 model, each
measured for what it knows about absence, and a stage-4 model refused as the base."""

import json

import pytest
import torch

from saev_hf.demo.run import load_grounded_llava, load_recipe
from saev_hf.demo import grounded_llava as gl

from benchmark_scripts import load_benchmark

SMALL = dict(hidden_size=32, num_heads=2, vision_hidden_size=16, batch_size=4, language_steps=2, alignment_steps=2,
             instruction_steps=2)


def _module():
    return load_benchmark("imperfect_instruction")


def test_stage_four_variants_from_one_stage_three_model_are_measured_and_saved(tmp_path):
    module = _module()
    record = module.run(module.parse_args([
        "--variants", "[[1.0, 3, 1.0, 1e-3]]", "--recipe", json.dumps(SMALL), "--eval-rows", "24",
        "--output-dir", str(tmp_path / "out"), "--save-dir", str(tmp_path / "models")]))
    base, variant = record["models"]
    assert base["recipe"]["imperfect_steps"] == 0 and variant["recipe"]["imperfect_steps"] == 3
    assert variant["recipe"]["imperfect_hallucination_fraction"] == 1.0
    for result in (base, variant):
        assert result["rows"] == 24 and set(result["absence"]) <= {"which", "colour", "where", "exists"}
        for kind in result["absence"].values():
            assert kind["accuracy"] <= kind["best_shift_accuracy"] <= 1
    [folder] = (tmp_path / "models").iterdir()
    assert load_recipe(folder).imperfect_steps == 3
    saved, processor = load_grounded_llava(folder)
    trained, _, _ = gl.train_grounded_llava(gl.GroundedLlavaArguments(
        **{**SMALL, "imperfect_steps": 3, "imperfect_absent_fraction": 1.0, "imperfect_hallucination_fraction": 1.0,
           "imperfect_learning_rate": 1e-3}), eval_rows=0, progress=False)
    for (name, a), b in zip(trained.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name  # the variant is the recipe's own model with those stage-4 arguments
    table = (tmp_path / "out" / "imperfect_instruction.md").read_text()
    assert "stage 4: 3 steps, 100% absent, 100% hallucinated" in table and table.count("points |") == 2

    with pytest.raises(ValueError, match="trained with stage 4"):
        module.run(module.parse_args(["--base-dir", str(folder), "--variants", "[]",
                                      "--output-dir", str(tmp_path / "again")]))
