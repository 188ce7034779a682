"""Training an SAE-V: real tokens only, the paper's schedules, folded input scale, exact resume, data-parallel runs."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from saev_hf import SAEV
from saev_hf.training.buffer import ActivationBuffer
from saev_hf.activations import LayerReader
from saev_hf.cli import main as cli_main
from saev_hf.testing.tiny_models import build_tiny_model
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.arguments import ModelArguments
from saev_hf.training import SAEVTrainer, SAEVTrainingArguments, train_saev

TESTS = Path(__file__).parent
CAPTIONS = (
    "a handwritten digit {}",
    "what digit is this ? it is {}",
    "the image shows a handwritten number . the answer is {}",
    "{}",
)


def digit_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    """`n` real handwritten digits with captions of varied length (so that batches are padded)."""
    pairs = digit_images(n, seed=seed)
    return datasets.Dataset.from_dict(
        {
            "images": [[image] for image, _ in pairs],
            "prompt": [CAPTIONS[i % len(CAPTIONS)].format(DIGIT_NAMES[label]) for i, (_, label) in enumerate(pairs)],
        }
    )


def text_dataset(n: int) -> datasets.Dataset:
    words = "a handwritten digit is a number written by hand and the image shows it".split()
    return datasets.Dataset.from_dict({"prompt": [" ".join(words[: 3 + i % 10]) for i in range(n)]})


def tiny_args(output_dir, **overrides) -> SAEVTrainingArguments:
    """Tiny shapes and a fast schedule for CPU tests; anything can be overridden."""
    values = dict(
        layer=1,
        output_dir=str(output_dir),
        expansion_factor=4,
        max_steps=40,
        train_batch_size_tokens=32,
        buffer_size_tokens=256,
        read_batch_size=4,
        learning_rate=1e-3,
        l1_coefficient=1.0,
        input_scale_estimation_tokens=256,
        logging_steps=10,
        dead_feature_window=15,
        save_steps=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return SAEVTrainingArguments(**values)


def real_tokens(reader: LayerReader, dataset, read_batch_size: int = 4, rows: int | None = None, special=True):
    """Activations of every real token of the first `rows` rows, read in order, in batches like the buffer reads."""
    rows = len(dataset) if rows is None else rows
    parts, counted = [], 0
    for start in range(0, rows, read_batch_size):
        acts = reader.read(dataset[start : min(start + read_batch_size, rows)], first_row=start)
        mask = acts.token_mask if special else acts.text_mask(False) | acts.image_mask
        parts.append(acts.hidden_states[mask].float())
        counted += int(mask.sum())
    tokens = torch.cat(parts)
    assert len(tokens) == counted
    return tokens


def same_multiset(a: torch.Tensor, b: torch.Tensor) -> bool:
    rows_a, counts_a = torch.unique(a, dim=0, return_counts=True)
    rows_b, counts_b = torch.unique(b, dim=0, return_counts=True)
    return rows_a.shape == rows_b.shape and torch.equal(rows_a, rows_b) and torch.equal(counts_a, counts_b)


# ----------------------------------------------------------------------------------------------------------------------
# One real training run on the tiny LLaVA, shared by the tests that inspect it
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_run(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(24)
    args = tiny_args(tmp_path_factory.mktemp("llava_run") / "out", shuffle_dataset=False, max_steps=60)
    trainer = SAEVTrainer(args, llava.model, llava.processor, dataset)
    initial = copy.deepcopy(trainer.sae)
    captured: list[torch.Tensor] = []
    hook = trainer.sae.register_forward_hook(lambda module, args, output: captured.append(output.feature_acts.detach()))
    sae = trainer.train()
    hook.remove()
    initial.config.input_scale = trainer.sae.config.input_scale
    return {"llava": llava, "dataset": dataset, "args": args, "trainer": trainer, "sae": sae, "initial": initial,
            "feature_acts": captured}


def test_training_reduces_the_reconstruction_error_by_more_than_half(llava_run):
    trainer, tokens = llava_run["trainer"], real_tokens(llava_run["trainer"].reader, llava_run["dataset"])
    with torch.no_grad():
        initial_mse = float(llava_run["initial"](tokens).mse_loss)
        trained_mse = float(trainer.sae(tokens).mse_loss)
    assert trained_mse < 0.5 * initial_mse, (initial_mse, trained_mse)
    history = [h for h in trainer.log_history if "mse_loss" in h]
    assert history[-1]["mse_loss"] < 0.5 * history[0]["mse_loss"]
    assert 0 < history[-1]["l0"] < trainer.sae.config.d_sae


def test_input_scale_is_sqrt_d_in_over_the_mean_norm_of_the_first_tokens(llava_run):
    trainer, args = llava_run["trainer"], llava_run["args"]
    first = real_tokens(trainer.reader, llava_run["dataset"])[: args.input_scale_estimation_tokens]
    assert len(first) == args.input_scale_estimation_tokens
    expected = math.sqrt(64) / float(first.double().norm(dim=-1).mean())
    assert trainer.sae.config.input_scale == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(1.0)  # the tiny model's states are far from norm sqrt(d_in)
    state = json.loads((Path(args.output_dir) / "trainer_state.json").read_text())
    assert state["input_scale"] == pytest.approx(expected, rel=1e-9)


def test_saved_checkpoint_reads_raw_hidden_states_like_the_scaled_training_model(llava_run):
    trainer, args = llava_run["trainer"], llava_run["args"]
    reloaded = SAEV.from_pretrained(args.output_dir)
    s = trainer.sae.config.input_scale
    assert reloaded.config.input_scale == 1.0 and s != 1.0
    raw = real_tokens(trainer.reader, llava_run["dataset"], rows=8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(raw).reconstruction, trainer.sae(raw).reconstruction, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded.encode(raw), trainer.sae.encode(raw), rtol=1e-4, atol=1e-5)
        # folded weights: the encoder absorbs s, the decoder and its bias divide by it
        torch.testing.assert_close(reloaded.W_enc, trainer.sae.W_enc * s)
        torch.testing.assert_close(reloaded.W_dec, trainer.sae.W_dec / s)
        torch.testing.assert_close(reloaded.b_dec, trainer.sae.b_dec / s)
        assert trainer.sae.b_dec.abs().max() > 0  # the bias was trained, so folding it is tested
    torch.testing.assert_close(reloaded.W_enc, llava_run["sae"].W_enc)  # train() returns what it saved


def test_saved_config_records_where_the_sae_comes_from(llava_run):
    args = llava_run["args"]
    config = SAEV.from_pretrained(args.output_dir).config
    assert config.hook_layer == 1 and config.d_in == 64 and config.d_sae == 256
    assert config.training_tokens == 60 * 32
    assert config.l1_coefficient == 1.0
    assert (Path(args.output_dir) / "model.safetensors").exists()
    recorded = json.loads((Path(args.output_dir) / "training_args.json").read_text())
    assert recorded["args"]["learning_rate"] == 1e-3 and recorded["num_processes"] == 1


def test_learning_rate_and_l1_coefficient_follow_the_paper_schedules(llava_run):
    trainer, args = llava_run["trainer"], llava_run["args"]
    schedule = trainer.schedule
    # 60 steps: warm-up 5% = 3 steps, decay over the last 20% = 12 steps, L1 warm-up 3 steps
    lengths = (schedule.max_steps, schedule.lr_warmup_steps, schedule.lr_decay_steps, schedule.l1_warmup_steps)
    assert lengths == (60, 3, 12, 3)
    expected_lr = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 30: 1.0, 47: 1.0, 48: 1.0, 49: 11 / 12, 59: 1 / 12}
    for step, factor in expected_lr.items():
        assert schedule.lr_factor(step) == pytest.approx(factor), step
    assert [schedule.l1_coefficient(s, 5.0) for s in (0, 1, 2, 3, 59)] == pytest.approx([5 / 3, 10 / 3, 5, 5, 5])
    # the values really used in training (logged for the last step of each logging interval)
    for record in (h for h in trainer.log_history if "learning_rate" in h):
        step = record["step"] - 1
        assert record["learning_rate"] == pytest.approx(args.learning_rate * schedule.lr_factor(step))
        assert record["l1_coefficient"] == pytest.approx(schedule.l1_coefficient(step, args.l1_coefficient))


def test_feature_sparsity_and_dead_features_match_a_direct_count_over_the_last_window(llava_run):
    trainer, args, sae = llava_run["trainer"], llava_run["args"], llava_run["sae"]
    acts = llava_run["feature_acts"]
    assert len(acts) == 60
    window = torch.cat(acts[60 - args.dead_feature_window :])  # windows end at the last step: steps 45..59
    frequency = (window > 0).double().mean(0)
    torch.testing.assert_close(sae.feature_log_sparsity, torch.log10(frequency + 1e-10).float())
    dead = int((frequency < args.dead_feature_threshold).sum())
    assert trainer.log_history[-1]["dead_features"] == dead
    earlier = torch.cat(acts[60 - 2 * args.dead_feature_window : 60 - args.dead_feature_window])
    logged = [h for h in trainer.log_history if "dead_features" in h and h["step"] == 45]
    assert logged[0]["dead_features"] == int(((earlier > 0).double().mean(0) < args.dead_feature_threshold).sum())
    assert SAEV.from_pretrained(args.output_dir).feature_log_sparsity.isfinite().all()


# ----------------------------------------------------------------------------------------------------------------------
# The activation buffer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_special", [True, False])
def test_buffer_holds_each_real_token_once_and_never_padding(tiny_model_factory, include_special):
    llava = tiny_model_factory("llava")
    reader = LayerReader(llava.model, llava.processor, layer=1)
    dataset = digit_dataset(16)
    buffer = ActivationBuffer(reader, dataset, batch_size_tokens=32, buffer_size_tokens=128, read_batch_size=4,
                              include_special_tokens=include_special, shuffle_dataset=False, seed=0)
    yielded = [next(buffer) for _ in range(5)]
    assert all(batch.shape == (32, 64) for batch in yielded)
    assert buffer.data_pass == 0 and 0 < buffer.rows_read < len(dataset), "stay within one pass for this test"
    direct = real_tokens(reader, dataset, rows=buffer.rows_read, special=include_special)
    # the rows read were padded (varied caption lengths) yet only real positions were counted
    acts = reader.read(dataset[: buffer.rows_read])
    assert acts.token_mask.sum() < acts.token_mask.numel()
    assert buffer.tokens_read == len(direct)
    seen = torch.cat(yielded + [buffer.state_dict()["tokens"]])
    assert len(seen) == len(direct)
    assert same_multiset(seen, direct)  # every token read is handed out or still buffered, exactly once
    assert not torch.equal(torch.cat(yielded), direct[: 5 * 32])  # and the order was shuffled


def test_buffer_starts_a_new_pass_when_the_data_runs_out(tiny_model_factory):
    text = tiny_model_factory("text")
    reader = LayerReader(text.model, text.processor, layer=1)
    dataset = text_dataset(3)
    buffer = ActivationBuffer(reader, dataset, batch_size_tokens=16, buffer_size_tokens=64, read_batch_size=2)
    for _ in range(6):
        next(buffer)
    assert buffer.data_pass >= 1 and buffer.rows_read > len(dataset)


# ----------------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------------


def test_topk_trains_with_k_active_features(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(16)
    args = tiny_args(tmp_path / "topk", activation="topk", k=8, max_steps=40)
    sae = train_saev(args, llava.model, llava.processor, dataset)
    assert sae.config.activation == "topk" and sae.config.k == 8
    reader = LayerReader(llava.model, llava.processor, layer=1)
    tokens = real_tokens(reader, dataset)
    active = (sae.encode(tokens) > 0).sum(-1)
    assert active.max() == 8 and (active == 8).float().mean() > 0.95
    state = json.loads((tmp_path / "topk" / "trainer_state.json").read_text())
    history = [h for h in state["log_history"] if "mse_loss" in h]
    assert history[-1]["mse_loss"] < 0.5 * history[0]["mse_loss"]
    assert history[-1]["l0"] <= 8


def test_text_only_model_trains_a_plain_sae(tiny_text_model, tmp_path):
    dataset = text_dataset(20)
    args = tiny_args(tmp_path / "text")
    # loaded from its folder by ModelArguments, on the CPU: the SAE records where it came from
    trainer = SAEVTrainer(args, ModelArguments(str(tiny_text_model.path), device="cpu"), train_dataset=dataset)
    initial = copy.deepcopy(trainer.sae)
    sae = trainer.train()
    assert trainer.reader.prompt_format.image_column is None  # the default "images" column is not read
    tokens = real_tokens(trainer.reader, dataset)
    initial.config.input_scale = trainer.sae.config.input_scale
    with torch.no_grad():
        assert float(trainer.sae(tokens).mse_loss) < 0.5 * float(initial(tokens).mse_loss)
    assert sae.config.base_model_name_or_path == str(tiny_text_model.path)


def test_streamed_dataset_trains(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(12).to_iterable_dataset(num_shards=2)
    sae = train_saev(tiny_args(tmp_path / "stream", max_steps=10), llava.model, llava.processor, dataset)
    assert sae.config.training_tokens == 10 * 32


def test_total_training_tokens_sets_the_number_of_steps_over_all_processes(tmp_path):
    args = tiny_args(tmp_path, max_steps=None, total_training_tokens=1000)
    assert args.schedule(num_processes=1).max_steps == math.ceil(1000 / 32)
    assert args.schedule(num_processes=2).max_steps == math.ceil(1000 / 64)
    assert tiny_args(tmp_path, max_steps=None).schedule().max_steps == 30000  # the paper's


def test_defaults_are_the_paper_recipe(tmp_path):
    args = SAEVTrainingArguments(layer=16, output_dir=str(tmp_path))
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.max_grad_norm) == (5e-5, 0.9, 0.999, 1.0)
    assert (args.l1_coefficient, args.seed, args.train_batch_size_tokens) == (5.0, 42, 4096)
    assert (args.dead_feature_window, args.dead_feature_threshold, args.activation) == (1000, 1e-4, "relu")
    schedule = args.schedule()
    assert (schedule.max_steps, schedule.lr_warmup_steps, schedule.lr_decay_steps, schedule.l1_warmup_steps) == (
        30000, 1500, 6000, 1500)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(16)
    full = tiny_args(tmp_path / "full", max_steps=40, save_steps=10, save_total_limit=2)
    uninterrupted = train_saev(full, llava.model, llava.processor, dataset)
    checkpoints = sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]  # save_total_limit=2 dropped checkpoint-10
    assert (tmp_path / "full" / "checkpoint-20" / "saev" / "model.safetensors").exists()  # loadable as an SAEV
    SAEV.from_pretrained(tmp_path / "full" / "checkpoint-20" / "saev")

    resumed_args = tiny_args(tmp_path / "resumed", max_steps=40, save_steps=10,
                             resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-20"))
    trainer = SAEVTrainer(resumed_args, llava.model, llava.processor, dataset)
    resumed = trainer.train()
    for name, tensor in uninterrupted.state_dict().items():  # bit for bit (feature_weights are NaN: never computed)
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    full_state = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    assert trainer.log_history == full_state["log_history"]
    assert resumed.config.training_tokens == uninterrupted.config.training_tokens == 40 * 32

    # 'latest' picks the newest complete checkpoint in output_dir and gives the same result again: a newer one cut
    # short while it was written (a killed run: its trainer state, written last, missing) is passed over
    shutil.copytree(tmp_path / "full" / "checkpoint-30", tmp_path / "full" / "checkpoint-35")
    (tmp_path / "full" / "checkpoint-35" / "trainer_state.json").unlink()
    latest = train_saev(tiny_args(tmp_path / "full", max_steps=40, save_steps=10, save_total_limit=2,
                                  resume_from_checkpoint="latest"), llava.model, llava.processor, dataset)
    assert torch.equal(latest.W_dec, uninterrupted.W_dec)

    # a run killed while writing its first checkpoint has nothing to resume: 'latest' starts it over from step 0
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "training_args.json", tmp_path / "cut" / "training_args.json")
    shutil.copytree(tmp_path / "full" / "checkpoint-20", tmp_path / "cut" / "checkpoint-10")
    (tmp_path / "cut" / "checkpoint-10" / "trainer_state.json").unlink()
    restarted = train_saev(tiny_args(tmp_path / "cut", max_steps=40, save_steps=10, save_total_limit=2,
                                     resume_from_checkpoint="latest"), llava.model, llava.processor, dataset)
    assert torch.equal(restarted.W_dec, uninterrupted.W_dec)


def test_resume_without_saved_buffer_continues_from_the_data_position(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(16)
    args = tiny_args(tmp_path / "run", max_steps=20, save_steps=10, save_buffer_in_checkpoint=False)
    train_saev(args, llava.model, llava.processor, dataset)
    with torch.device("cpu"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / "run" / "checkpoint-10" / "data_state_0.safetensors"), "pt") as handle:
            assert "buffer_tokens" not in handle.keys() and int(handle.metadata()["rows_read"]) > 0
    resumed = train_saev(tiny_args(tmp_path / "run", max_steps=20, save_steps=10, save_buffer_in_checkpoint=False,
                                   resume_from_checkpoint="latest"), llava.model, llava.processor, dataset)
    assert resumed.config.training_tokens == 20 * 32


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layer": -1}, "layer=-1 must be a non-negative integer"),
        ({"buffer_size_tokens": 40}, "must be at least twice train_batch_size_tokens=32"),
        ({"max_steps": 10, "total_training_tokens": 100}, "Give either max_steps (10) or total_training_tokens"),
        ({"activation": "topk"}, "activation='topk' needs k"),
        ({"k": 4}, "k=4 is only used with activation='topk'"),
        ({"expansion_factor": 4, "d_sae": 128}, "Give either d_sae (128) or expansion_factor (4)"),
        ({"report_to": "tensorbored"}, "unknown tracker(s) ['tensorbored']"),
        ({"lr_warmup_steps": 30, "lr_decay_steps": 20}, "lr_warmup_steps=30 + lr_decay_steps=20 exceed the 40"),
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be a positive number"),
        ({"input_scale": None, "input_scale_estimation_tokens": 0}, "give input_scale (1.0 disables scaling)"),
    ],
)
def test_invalid_arguments_say_what_to_change(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_args(tmp_path, **overrides)
    assert message in str(error.value)


def test_a_dataset_without_usable_tokens_is_an_error(tiny_text_model, tmp_path):
    empty = datasets.Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match="The training data has no rows"):
        train_saev(tiny_args(tmp_path / "a"), tiny_text_model.model, tiny_text_model.processor, empty)
    only_special = datasets.Dataset.from_dict({"prompt": ["", ""]})  # the chat template adds special tokens only
    with pytest.raises(ValueError, match="gave no usable token in its 2 rows.*include_special_tokens=True"):
        train_saev(tiny_args(tmp_path / "b", include_special_tokens=False), tiny_text_model.model,
                   tiny_text_model.processor, only_special)
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_nan_activations_stop_training_before_they_are_used(tmp_path):
    model, tokenizer = build_tiny_model("text", seed=0)  # a private copy: it gets a NaN-injecting hook
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        if len(calls) == 6:  # a later read, after training has started
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, 1] = float("nan")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return None

    model.model.layers[0].register_forward_hook(poison)
    trainer = SAEVTrainer(tiny_args(tmp_path / "nan", input_scale=1.0, max_steps=200, read_batch_size=2,
                                    buffer_size_tokens=64), model, tokenizer, text_dataset(40))
    before = trainer.sae.W_dec.detach().clone()
    steps_seen = []
    trainer.sae.register_forward_hook(lambda *a: steps_seen.append(1))
    with pytest.raises(ValueError, match=r"produced NaN or inf activations at \d+ of \d+ tokens when reading rows \["):
        trainer.train()
    assert 0 < len(steps_seen) < 200  # it trained, then stopped at the poisoned read
    assert not torch.equal(before, trainer.sae.W_dec)
    assert torch.isfinite(trainer.sae.W_dec).all()  # the NaN never reached a gradient step
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_an_output_dir_holding_a_different_run_is_refused(tiny_text_model, tmp_path):
    dataset = text_dataset(8)
    model, tokenizer = tiny_text_model.model, tiny_text_model.processor
    train_saev(tiny_args(tmp_path / "out", max_steps=5), model, tokenizer, dataset)
    with pytest.raises(ValueError) as error:
        SAEVTrainer(tiny_args(tmp_path / "out", max_steps=5, learning_rate=2e-3), model, tokenizer, dataset)
    message = str(error.value)
    assert "holds a different training run" in message and "learning_rate: 0.001 (saved) vs 0.002 (now)" in message
    assert "overwrite_output_dir=True" in message
    # the same settings, or overwrite_output_dir, are accepted
    SAEVTrainer(tiny_args(tmp_path / "out", max_steps=5, logging_steps=1), model, tokenizer, dataset)
    train_saev(tiny_args(tmp_path / "out", max_steps=5, learning_rate=2e-3, overwrite_output_dir=True), model,
               tokenizer, dataset)
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["args"]["learning_rate"] == 2e-3


def test_resuming_with_different_settings_names_them(tiny_text_model, tmp_path):
    dataset = text_dataset(8)
    model, tokenizer = tiny_text_model.model, tiny_text_model.processor
    train_saev(tiny_args(tmp_path / "out", max_steps=10, save_steps=5), model, tokenizer, dataset)
    changed = tiny_args(tmp_path / "out", max_steps=10, save_steps=5, l1_coefficient=2.0, expansion_factor=8,
                        resume_from_checkpoint="latest")
    with pytest.raises(ValueError) as error:
        SAEVTrainer(changed, model, tokenizer, dataset)
    message = str(error.value)
    assert "checkpoint-5: it was trained with different settings" in message
    assert "expansion_factor: 4 (saved) vs 8 (now)" in message and "l1_coefficient: 1.0 (saved) vs 2.0 (now)" in message
    with pytest.raises(ValueError, match="holds no checkpoint-\\* folder"):
        SAEVTrainer(tiny_args(tmp_path / "fresh", resume_from_checkpoint="latest"), model, tokenizer, dataset)
    with pytest.raises(ValueError, match="is not an SAE-V training checkpoint"):
        SAEVTrainer(tiny_args(tmp_path / "x", resume_from_checkpoint=str(tmp_path)), model, tokenizer, dataset)


def test_missing_model_or_data_is_an_error(tiny_text_model, tmp_path):
    with pytest.raises(ValueError, match="pass processor= too"):
        SAEVTrainer(tiny_args(tmp_path), tiny_text_model.model, None, text_dataset(2))
    with pytest.raises(ValueError, match=r"No base model: pass model= and processor= \(or model=ModelArguments"):
        SAEVTrainer(tiny_args(tmp_path))
    with pytest.raises(ValueError, match=r"No training data: pass train_dataset= \(a dataset, or DataArguments"):
        SAEVTrainer(tiny_args(tmp_path), tiny_text_model.model, tiny_text_model.processor)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        SAEVTrainer(tiny_args(tmp_path), ModelArguments(device="cpu"), train_dataset=text_dataset(2))


# ----------------------------------------------------------------------------------------------------------------------
# The command line and data-parallel training
# ----------------------------------------------------------------------------------------------------------------------


def test_saev_train_command_trains_from_saved_model_and_dataset(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    digit_dataset(8).save_to_disk(str(tmp_path / "data"))
    argv = ["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(tmp_path / "data"),
            "--layer", "1", "--output_dir", str(tmp_path / "out"), "--expansion_factor", "4", "--max_steps", "8",
            "--train_batch_size_tokens", "32", "--buffer_size_tokens", "128", "--read_batch_size", "4",
            "--input_scale_estimation_tokens", "64", "--disable_tqdm"]
    assert cli_main(argv) == 0
    sae = SAEV.from_pretrained(tmp_path / "out")
    assert sae.config.base_model_name_or_path == str(llava.path)
    assert sae.config.dataset_name == str(tmp_path / "data") and sae.config.training_tokens == 8 * 32


@pytest.mark.parametrize("command", ["train", "eval"])
def test_saev_train_and_eval_help_list_the_dataclass_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--prompt_column" in out and "--model_name_or_path" in out
    if command == "train":
        assert "--lr_warmup_steps" in out and "5 percent of the steps" in out and "--resume_from_checkpoint" in out


def test_metrics_are_logged_to_the_report_to_trackers(tiny_text_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = SAEVTrainer(tiny_args(tmp_path / "out", report_to="wandb", run_name="tiny", max_steps=20,
                                    logging_steps=5, dead_feature_window=10),
                          tiny_text_model.model, tiny_text_model.processor, text_dataset(8))
    logged = []
    log = trainer.accelerator.log
    def recording_log(values, step):
        logged.append((step, values))
        log(values, step=step)

    monkeypatch.setattr(trainer.accelerator, "log", recording_log)
    trainer.train()
    assert [type(t).__name__ for t in trainer.accelerator.trackers] == ["WandBTracker"]
    assert [step for step, values in logged if "loss" in values] == [5, 10, 15, 20]
    assert [step for step, values in logged if "dead_features" in values] == [10, 20]
    assert all({"mse_loss", "l0", "explained_variance", "learning_rate", "l1_coefficient", "grad_norm"} <= set(v)
               for _, v in logged if "loss" in v)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the real tracker wrote its run


def test_two_processes_train_like_one_process_on_both_shards(tiny_model_factory, tmp_path):
    """torchrun starts two gloo processes running the user's unchanged code; each reads its own shard."""
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(24)
    dataset.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "ddp"
    options = dict(expansion_factor=4, max_steps=20, train_batch_size_tokens=32, buffer_size_tokens=128,
                   read_batch_size=4, learning_rate=1e-3, l1_coefficient=1.0, input_scale_estimation_tokens=128,
                   logging_steps=5, dead_feature_window=10, save_steps=0, shuffle_dataset=False)
    argv = [f"--{name}={value}" for name, value in options.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "distributed_train_script.py"), "--model_name_or_path", str(llava.path),
               "--dataset_name", str(tmp_path / "data"), "--layer", "1", "--output_dir", str(out), "--disable_tqdm",
               *argv]
    # its own session, so that a hang is killed with every worker (killing torchrun alone would orphan them)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"2-process training did not finish in 300 s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]

    ranks = [json.loads((out / f"rank_{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["sae_digest"] == ranks[1]["sae_digest"]  # the replicas stayed identical
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["training_tokens"] == 20 * 32 * 2
    assert [p["process_index"] for p in state["processes"]] == [0, 1]
    distributed = SAEV.from_pretrained(out)
    assert distributed.config.training_tokens == 20 * 32 * 2

    # Each process read its own half of the data: rebuild both streams here, as the trainer documents them
    # (shard = split_dataset_by_node, shuffle seed = seed + process index).
    reader = LayerReader(llava.model, llava.processor, layer=1)
    shards = [split_dataset_by_node(dataset, rank=r, world_size=2) for r in range(2)]
    assert shards[0]["prompt"] != shards[1]["prompt"]
    streams = [ActivationBuffer(reader, shard, batch_size_tokens=32, buffer_size_tokens=128, read_batch_size=4,
                                shuffle_dataset=False, seed=42 + r) for r, shard in enumerate(shards)]
    # the input scale was estimated over both shards' first 64 tokens
    firsts = [real_tokens(reader, shard)[:64] for shard in shards]
    expected_scale = math.sqrt(64) / float(torch.cat(firsts).double().norm(dim=-1).mean())
    assert state["input_scale"] == pytest.approx(expected_scale, rel=1e-9)
    # gradients were averaged: one process on batches of 64 tokens = rank 0's 32 + rank 1's 32 trains the same SAE
    batches = [torch.cat([next(streams[0]), next(streams[1])]) for _ in range(20)]
    reference_args = tiny_args(tmp_path / "one", train_batch_size_tokens=64, input_scale=state["input_scale"],
                               **{k: v for k, v in options.items() if k not in ("train_batch_size_tokens",)})
    reference = SAEVTrainer(reference_args, llava.model, llava.processor, dataset).train(iter(batches))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):  # equal up to float32 summation order (measured ~1e-6 relative)
        expected = getattr(reference, name)
        scale = float(expected.detach().abs().max())
        torch.testing.assert_close(getattr(distributed, name), expected, rtol=1e-4, atol=1e-5 * scale)
    # ... and not the same as training on one shard only
    single = [torch.cat([b[:32], b[:32]]) for b in batches]
    alone = SAEVTrainer(tiny_args(tmp_path / "alone", train_batch_size_tokens=64, input_scale=state["input_scale"],
                                  **{k: v for k, v in options.items() if k != "train_batch_size_tokens"}),
                        llava.model, llava.processor, dataset).train(iter(single))
    assert (alone.W_enc - distributed.W_enc).abs().max() > 100 * (reference.W_enc - distributed.W_enc).abs().max()


def test_end_distributed_destroys_the_process_group_and_is_a_no_op_without_one():
    import torch.distributed as dist

    from saev_hf import end_distributed

    end_distributed()  # no group: nothing to do, no error
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Planted:
    """A pickle that runs code when unpickled (it would create the file it names)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resuming_never_runs_code_planted_in_a_checkpoint(tiny_model_factory, tmp_path):
    """A checkpoint folder may come from elsewhere: its tensors load through safetensors and accelerate's
    `weights_only` loader, which refuses a pickle that would run code (nothing is executed)."""
    import pickle

    llava = tiny_model_factory("llava")
    dataset = digit_dataset(8)
    train_saev(tiny_args(tmp_path / "run", max_steps=10, save_steps=5), llava.model, llava.processor, dataset)
    checkpoint = tmp_path / "run" / "checkpoint-5"
    planted = tmp_path / "planted-code-ran"
    for victim in sorted(checkpoint.rglob("*.bin")) + sorted(checkpoint.rglob("*.pkl")):
        victim.write_bytes(pickle.dumps({"state": _Planted(planted)}))
    assert list(checkpoint.rglob("*.bin")) or list(checkpoint.rglob("*.pkl"))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        train_saev(tiny_args(tmp_path / "resumed", max_steps=10, save_steps=5, resume_from_checkpoint=str(checkpoint)),
                   llava.model, llava.processor, dataset)
    assert not planted.exists()
