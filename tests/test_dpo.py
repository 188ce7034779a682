"""The DPO / SFT recipe on a filtered dataset (saev_hf.alignment.dpo), on the tiny LLaVA on a CPU."""

import json
import subprocess
import sys

import pytest
import torch

from saev_hf.testing.tiny_models import build_tiny_model
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images


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
    from saev_hf.alignment.dpo import paper_dpo_config

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

    from saev_hf.alignment.dpo import paper_dpo_config, paper_sft_config

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
    from saev_hf.alignment.dpo import train_dpo

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

    from saev_hf.alignment.dpo import LANGUAGE_MODEL_PROJECTIONS, language_model_target_modules, train_dpo

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
    from saev_hf.alignment.dpo import paper_sft_config, train_sft

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

    from saev_hf.alignment.dpo import train_dpo

    model, processor = build_tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match="chosen"):
        train_dpo(model, processor, datasets.Dataset.from_list([{"prompt": "hi"}]), small_config(tmp_path))


def test_saev_dpo_command_trains_and_saves(tmp_path):
    from saev_hf.cli import main
    from saev_hf.testing.tiny_models import save_tiny_model

    model_dir = save_tiny_model("llava", tmp_path / "tiny-llava")
    preference_rows(8).save_to_disk(str(tmp_path / "kept"))
    out = tmp_path / "out"
    assert main(["dpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "kept"),
                 "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--gradient_accumulation_steps", "1", "--max_length", "128", "--save_strategy", "no",
                 "--lora"]) == 0
    assert (out / "adapter_config.json").exists()


# --- every prompt layout the scorer reads trains as it is (issue 17) -------------------------------------------------


def readme_rows(n, seed=0):
    """The README's example data: plain-text prompts beside an `images` column, plain-text answers."""
    import datasets

    return datasets.Dataset.from_dict({
        "images": [[image] for image, label in digit_images(n, seed=seed)],
        "prompt": ["What digit is this?"] * n,
        "chosen": ["A handwritten digit."] * n,
        "rejected": ["A photo of a cat."] * n,
    })


def scorer_text(processor, row):
    """The prompt text the scorer (prompts.prepare_inputs) gives the model for a row."""
    from saev_hf.data.prompts import build_messages, format_text
    from saev_hf.data.images import row_images

    if isinstance(row["prompt"], str) and processor.image_token in row["prompt"]:
        return row["prompt"]
    images = row_images(row["images"], 0, "images")
    return format_text(processor, build_messages(row["prompt"], None, len(images), 0), processor.image_token, False)


def trl_text(processor, example):
    """The prompt text TRL's vision collators build from a converted example (their own two calls)."""
    from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

    example = dict(example)
    if not is_conversational(example):
        return example["prompt"]
    example["prompt"] = prepare_multimodal_messages(example["prompt"], images=example["images"])
    example["chosen"] = prepare_multimodal_messages(example["chosen"])
    example["rejected"] = prepare_multimodal_messages(example["rejected"])
    return apply_chat_template(example, processor)["prompt"]


def test_trl_dataset_gives_trl_the_prompt_the_scorer_read_in_every_layout():
    import datasets

    from saev_hf.alignment.dpo import trl_dataset

    _, processor = build_tiny_model("llava", seed=0)
    image, _ = digit_images(1)[0]
    formatted = f"USER: {processor.image_token}\nwhat digit is this ? ASSISTANT:"
    layouts = {
        "plain text beside images": {"prompt": "what digit is this ?", "chosen": "a digit .", "rejected": "a cat ."},
        "conversational, string content": {"prompt": [{"role": "user", "content": "what digit is this ?"}],
                                           "chosen": "a digit .", "rejected": "a cat ."},
        "conversational, image placed": {
            "prompt": turn("user", [{"type": "text", "text": "what"}, {"type": "image"},
                                    {"type": "text", "text": "digit is this ?"}]),
            "chosen": turn("assistant", "a digit ."), "rejected": turn("assistant", "a cat .")},
        "TRL's plain format with image tokens": {"prompt": formatted, "chosen": " a digit .", "rejected": " a cat ."},
    }
    for name, row in layouts.items():
        row = {"images": [image], **row, "saev_cosine_score": 1.0}
        converted = trl_dataset(datasets.Dataset.from_list([row]), processor)
        assert converted.column_names == ["images", "prompt", "chosen", "rejected"], name
        example = converted[0]
        assert trl_text(processor, example) == scorer_text(processor, row), name
        assert trl_text(processor, example).count(processor.image_token) == 1, name
        if isinstance(row["prompt"], str) and processor.image_token in row["prompt"]:
            assert example["prompt"] == formatted and example["chosen"] == " a digit ."
        else:  # both responses became assistant turns, as TRL needs when the prompt is conversational
            for response in ("chosen", "rejected"):
                assert [m["role"] for m in example[response]] == ["assistant"], name


def test_trl_dataset_makes_a_single_image_or_path_a_list_of_images(tmp_path):
    import datasets
    from PIL import Image

    from saev_hf.alignment.dpo import trl_dataset

    _, processor = build_tiny_model("llava", seed=0)
    image, _ = digit_images(1)[0]
    image.save(tmp_path / "digit.png")
    for value in (image, str(tmp_path / "digit.png")):
        ds = datasets.Dataset.from_list([{"images": value, "prompt": "what ?", "chosen": "a", "rejected": "b"}])
        (converted,) = trl_dataset(ds, processor)
        assert len(converted["images"]) == 1 and isinstance(converted["images"][0], Image.Image)
        assert converted["images"][0].size == image.size


def test_trl_dataset_refuses_rows_it_cannot_convert_naming_row_and_fix():
    import datasets

    from saev_hf.alignment.dpo import trl_dataset
    from saev_hf.data import RowError

    _, processor = build_tiny_model("llava", seed=0)
    image, _ = digit_images(1)[0]
    good = {"images": [image], "prompt": "what ?", "chosen": "a", "rejected": "b"}
    one, two = ([{"type": "image"}] * n + [{"type": "text", "text": "what ?"}] for n in (1, 2))
    rows = [{**good, "prompt": turn("user", one)}, {**good, "prompt": turn("user", two)}]
    with pytest.raises(RowError, match=r"Row 1: the prompt has 2 image placeholders but the row has 1 images"):
        trl_dataset(datasets.Dataset.from_list(rows), processor)
    mixed = {**good, "prompt": "USER: <image> what ?", "chosen": turn("assistant", "a")}
    with pytest.raises(RowError, match=r"Row 0: the prompt is plain text but 'chosen' is list"):
        trl_dataset(datasets.Dataset.from_list([mixed]), processor)
    with pytest.raises(ValueError, match=r"missing \['rejected'\].*rename_column"):
        trl_dataset(datasets.Dataset.from_list([{"images": [image], "prompt": "x", "chosen": "a"}]), processor)


def test_readme_chain_score_filter_dpo_then_score_again(tmp_path):
    """The README's data, unchanged, through ds.map(scorer) -> filter_by_score -> train_dpo -> the scorer again."""
    from saev_hf import SAEV, SAEVConfig, SAEVScorer, LayerReader, compute_feature_weights, filter_by_score
    from saev_hf.alignment.dpo import train_dpo

    model, processor = build_tiny_model("llava", seed=0)
    ds = readme_rows(16)
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, expansion_factor=4, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    compute_feature_weights(sae, LayerReader(model, processor, layer=1), ds)
    scored = ds.map(SAEVScorer(sae, model, processor), batched=True, batch_size=8)
    assert any(score != 0 for score in scored["saev_cosine_score"])
    kept = filter_by_score(scored, column="saev_cosine_score", fraction=0.5)
    assert len(kept) == 8 and isinstance(kept[0]["prompt"], str)  # plain prompts, straight from the scorer's input

    trainer = train_dpo(model, processor, kept, small_config(tmp_path, max_steps=3))
    assert trainer.state.global_step == 3

    rescored = kept.map(SAEVScorer(sae, model, processor), batched=True, batch_size=8)
    before, after = torch.tensor(kept["saev_l0"]), torch.tensor(rescored["saev_l0"])
    assert torch.isfinite(after).all() and not torch.equal(before, after)  # the trained model reads differently


def test_sft_trains_on_the_readme_plain_prompts(tmp_path):
    from saev_hf.alignment.dpo import paper_sft_config, train_sft

    model, processor = build_tiny_model("llava", seed=0)
    before = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = paper_sft_config(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0, max_length=128,
                              save_strategy="no", disable_tqdm=True, report_to="none")
    trainer = train_sft(model, processor, readme_rows(8), config)
    assert trainer.state.global_step == 2
    assert not torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, before)


def test_trl_trains_on_exactly_the_tokens_the_reader_gives_the_model():
    """TRL tokenizes the rendered template without special tokens; the reader follows transformers' processors. Both
    must give the model the same sequence, BOS included (a BOS lost in DPO trains the model on text it never reads)."""
    import copy

    import datasets
    from trl import DPOTrainer

    from saev_hf.testing.tiny_pretraining import response_inputs
    from saev_hf.alignment.dpo import _preference_rows, check_bos_for_trl, paper_dpo_config

    model, processor = build_tiny_model("llava", seed=0)
    assert check_bos_for_trl(processor)
    rows = [{"images": [image], "prompt": "what digit is this ?", "chosen": DIGIT_NAMES[label], "rejected": "cat"}
            for image, label in digit_images(3)]
    config = paper_dpo_config("unused", max_steps=1, per_device_train_batch_size=3, max_length=64, report_to="none",
                              save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                         train_dataset=_preference_rows(datasets.Dataset.from_list(rows), processor),
                         processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    trained = sorted(tuple(i for i, m in zip(ids.tolist(), mask.tolist()) if m)
                     for ids, mask in zip(batch["input_ids"], batch["attention_mask"]))
    read = sorted(tuple(response_inputs(model, processor, [{"images": r["images"], "prompt": r["prompt"],
                                                             "response": r[key]}])[0]["input_ids"][0].tolist())
                  for r in rows for key in ("chosen", "rejected"))
    assert trained == read
    assert all(sequence.count(processor.tokenizer.bos_token_id) == 1 and sequence[0] == processor.tokenizer.bos_token_id
               for sequence in trained)


def test_a_template_that_leaves_the_bos_to_the_tokenizer_is_flagged_before_trl_drops_it():
    from saev_hf.alignment.dpo import check_bos_for_trl

    _, processor = build_tiny_model("llava", seed=0)
    without = processor.chat_template.replace("{{- bos_token -}}", "")
    assert without != processor.chat_template
    processor.chat_template = processor.tokenizer.chat_template = without
    with pytest.warns(UserWarning, match="without the BOS token '<s>'.*bos_token"):
        assert not check_bos_for_trl(processor)
