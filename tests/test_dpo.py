"""The DPO / SFT recipe on a filtered dataset (saev_hf.dpo), on the tiny LLaVA on a CPU."""

import json
import subprocess
import sys

import pytest
import torch

from saev_hf.tiny_models import DIGIT_NAMES, build_tiny_model, digit_images


def turn(role, content):
    return [{"role": role, "content": content}]


def preference_rows(n, seed=0):
    import datasets

    rows = []
    for i, (image, label) in enumerate(digit_images(n, seed=seed)):
        rows.append({
            "images": [image],
            "prompt": turn("user", [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]),
            "chosen": turn("assistant", [{"type": "text", "text": f"a handwritten digit {DIGIT_NAMES[label]} ."}]),
            "rejected": turn("assistant", [{"type": "text",
                                            "text": f"a handwritten digit {DIGIT_NAMES[(label + 3) % 10]} ."}]),
            "saev_cosine_score": float(i),
            "label": 1,  # TRL would read a `label` column as KTO data: the recipe must drop it
        })
    return datasets.Dataset.from_list(rows)


def small_config(tmp_path, **overrides):
    from saev_hf.dpo import paper_dpo_config

    settings = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                    warmup_steps=0, max_length=128, logging_steps=1, save_strategy="no", seed=0,
                    lr_scheduler_type="constant", disable_tqdm=True)
    settings.update(overrides)
    return paper_dpo_config(str(tmp_path / "dpo"), **settings)


def test_import_saev_hf_does_not_import_trl():
    code = "import sys, saev_hf, saev_hf.cli; print('trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_paper_config_values(tmp_path):
    from trl import DPOConfig, SFTConfig

    from saev_hf.dpo import paper_dpo_config, paper_sft_config

    for config in (paper_dpo_config(str(tmp_path)), paper_sft_config(str(tmp_path))):
        assert isinstance(config, (DPOConfig, SFTConfig))
        assert config.max_length == 4096
        assert config.per_device_train_batch_size == 8
        assert config.gradient_accumulation_steps == 4
        assert str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)) == "cosine"
        assert config.learning_rate == 1e-6
        assert config.warmup_steps == 10
        assert config.num_train_epochs == 3
        if torch.cuda.is_available():
            assert config.bf16 is True
        else:  # the CPU fallback
            assert config.use_cpu is True and config.bf16 is False
    assert paper_dpo_config(str(tmp_path), learning_rate=1e-4).learning_rate == 1e-4


def test_dpo_on_filtered_rows_changes_weights_and_learns(tmp_path):
    from saev_hf import FilterArguments, filter_by_score
    from saev_hf.dpo import train_dpo

    model, processor = build_tiny_model("llava", seed=0)
    kept = filter_by_score(preference_rows(16), FilterArguments(column="saev_cosine_score", fraction=0.5))
    assert len(kept) == 8
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = train_dpo(model, processor, kept, small_config(tmp_path))
    assert trainer.state.global_step == 6
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any("language_model" in name for name in changed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    first, last = logs[0], logs[-1]
    margin = next(k for k in first if k.endswith("margins"))
    assert last["loss"] < first["loss"] or last[margin] > first[margin], json.dumps(logs)


def test_lora_wraps_only_language_model_projections(tmp_path):
    from peft import PeftModel

    from saev_hf.dpo import LANGUAGE_MODEL_PROJECTIONS, language_model_target_modules, train_dpo

    model, processor = build_tiny_model("llava", seed=0)
    targets = language_model_target_modules(model)
    assert targets and all("language_model" in t and t.rsplit(".", 1)[-1] in LANGUAGE_MODEL_PROJECTIONS
                           for t in targets)
    assert len(targets) == 7 * model.config.text_config.num_hidden_layers
    trainer = train_dpo(model, processor, preference_rows(8), small_config(tmp_path, max_steps=2), lora=True)
    assert isinstance(trainer.model, PeftModel)
    wrapped = [name for name, module in trainer.model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all("language_model" in name for name in wrapped)
    assert not any("vision" in name or "projector" in name for name in wrapped)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_sft_path_runs_a_couple_of_steps(tmp_path):
    from saev_hf.dpo import paper_sft_config, train_sft

    model, processor = build_tiny_model("llava", seed=0)
    before = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = paper_sft_config(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0, max_length=128,
                              save_strategy="no", disable_tqdm=True)
    trainer = train_sft(model, processor, preference_rows(8), config)
    assert trainer.state.global_step == 2
    assert not torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, before)


def test_dpo_rejects_rows_without_preferences(tmp_path):
    import datasets

    from saev_hf.dpo import train_dpo

    model, processor = build_tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match="chosen"):
        train_dpo(model, processor, datasets.Dataset.from_list([{"prompt": "hi"}]), small_config(tmp_path))


def test_saev_dpo_command_trains_and_saves(tmp_path):
    from saev_hf.cli import main
    from saev_hf.tiny_models import save_tiny_model

    model_dir = save_tiny_model("llava", tmp_path / "tiny-llava")
    preference_rows(8).save_to_disk(str(tmp_path / "kept"))
    out = tmp_path / "out"
    assert main(["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "kept"),
                 "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--gradient_accumulation_steps", "1", "--max_length", "128", "--save_strategy", "no",
                 "--lora"]) == 0
    assert (out / "adapter_config.json").exists()
