"""benchmarks/instruction_variants.py on a recipe shrunk to seconds: one shared stages 1-2, one stage 3 per variant,
each saved as a loadable grounded LLaVA with the arguments that made it."""

import json
from dataclasses import replace
from pathlib import Path

import torch

from saev_hf.demo.run import load_grounded_llava, load_recipe
from saev_hf.demo import grounded_llava as gl

from benchmark_scripts import load_benchmark

SMALL = dict(imperfect_steps=0, hidden_size=32, num_heads=2, vision_hidden_size=16, batch_size=4, language_steps=2, alignment_steps=2)


def test_each_variant_differs_only_in_stage_three_and_is_saved_with_its_arguments(tmp_path, monkeypatch):
    module = load_benchmark("instruction_variants")
    calls = []
    original = module.aligned_model
    monkeypatch.setattr(module, "aligned_model", lambda *a: calls.append(1) or original(*a))
    results = module.run(module.parse_args(["--variants", "[[0.0, 2], [0.5, 3, 0.7]]", "--output-dir",
                                            str(tmp_path), "--eval-rows", "8", "--recipe", json.dumps(SMALL)]))
    assert len(calls) == 1  # stages 1-2 once, shared
    assert [(r["instruction_absent_fraction"], r["instruction_steps"], r["instruction_hallucination_fraction"])
            for r in results] == [(0.0, 2, 0.0), (0.5, 3, 0.7)]
    assert [Path(r["folder"]).name for r in results] == ["abs0.0_s2", "abs0.5_s3_hal0.7"]
    for result in results:
        recipe = load_recipe(result["folder"])
        assert recipe == replace(gl.GroundedLlavaArguments(**SMALL),
                                 instruction_absent_fraction=result["instruction_absent_fraction"],
                                 instruction_steps=result["instruction_steps"],
                                 instruction_hallucination_fraction=result["instruction_hallucination_fraction"])
        model, processor = load_grounded_llava(result["folder"])
        assert model.config.text_config.hidden_size == 32 and result["rows"] == 8
    written = json.loads((tmp_path / "instruction_variants.json").read_text())
    assert written["variants"] == json.loads(json.dumps(results))


def test_the_default_variant_is_the_recipes_own_model(tmp_path):
    module = load_benchmark("instruction_variants")
    recipe = {**SMALL, "instruction_steps": 3}
    args = gl.GroundedLlavaArguments(**recipe)
    [result] = module.run(module.parse_args([
        "--variants", f"[[{args.instruction_absent_fraction}, 3]]", "--output-dir", str(tmp_path),
        "--eval-rows", "8", "--recipe", json.dumps(recipe)]))
    variant, _ = load_grounded_llava(result["folder"])
    trained, _, _ = gl.train_grounded_llava(args, eval_rows=0, progress=False)
    for (name, a), b in zip(trained.state_dict().items(), variant.state_dict().values()):
        assert torch.equal(a, b), name  # the stages are shared code and consume no torch randomness
