"""Tests of the digit pretraining in `saev_hf.testing.tiny_pretraining`: a tiny MLLM that has really learned image-text data.

The SAE vs SAE-V benchmark and `saev demo` rely on `pretrain_tiny_model` turning a random tiny LLaVA into a model that
names handwritten digits it has never seen; these tests hold it to that, offline and in about half a minute.
"""

from __future__ import annotations

import doctest

import pytest
import torch

from saev_hf.testing import tiny_pretraining
from saev_hf.testing.tiny_processing import build_tiny_tokenizer
from saev_hf.testing.tiny_models import build_tiny_model
from saev_hf.testing.digit_data import (DIGIT_CAPTIONS, DIGIT_NAMES, digit_caption_examples, digit_images, digit_text_examples)
from saev_hf.testing.tiny_pretraining import digit_accuracy, load_text_model_weights, pretrain_tiny_model


@pytest.fixture(scope="module")
def digits():
    """700 real digits: 600 to train on, 100 held out."""
    pairs = digit_images(700, seed=0)
    return pairs[:600], pairs[600:]


def test_pretraining_teaches_llava_to_name_held_out_digits(digits):
    train, held_out = digits
    model, processor = build_tiny_model("llava", seed=0)

    summary = pretrain_tiny_model(model, processor, digit_caption_examples(train, seed=0), steps=300, seed=0,
                                  eval_digits=held_out)

    assert summary["final_loss"] < 0.2 * summary["initial_loss"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["digit_accuracy_before"] < 0.25  # a random model is at chance (10%)
    assert summary["digit_accuracy_after"] >= 0.5
    assert not model.training


def test_pretraining_is_deterministic_and_trains_a_text_model():
    rows = digit_text_examples(64, seed=0)

    def run(seed: int):
        model, tokenizer = build_tiny_model("text", seed=0)
        summary = pretrain_tiny_model(model, tokenizer, rows, steps=6, batch_size=8, seed=seed)
        return summary, model.state_dict()

    (first, weights), (again, weights_again), (_, other_seed) = run(1), run(1), run(2)
    assert first["final_loss"] == again["final_loss"] < first["initial_loss"]
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert not all(torch.equal(weights[name], other_seed[name]) for name in weights)


def test_vision_encoder_stays_frozen_unless_asked(digits):
    train, _ = digits
    rows = digit_caption_examples(train[:16])
    for train_vision_tower in (False, True):
        model, processor = build_tiny_model("llava", seed=0)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        pretrain_tiny_model(model, processor, rows, steps=2, batch_size=8, train_vision_tower=train_vision_tower)
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        vision = {name for name in before if ".vision_tower." in name}
        assert bool(changed & vision) is train_vision_tower
        assert any(".multi_modal_projector." in name for name in changed)
        assert all(p.requires_grad for p in model.parameters())  # the freeze is undone afterwards


def test_loss_is_on_the_assistant_tokens_only(digits):
    train, _ = digits
    model, processor = build_tiny_model("llava", seed=0)
    rows = digit_caption_examples(train[:3], seed=0)
    inputs, labels = tiny_pretraining.response_inputs(model, processor, rows)
    for row, row_labels in zip(rows, labels):
        learned = processor.tokenizer.convert_ids_to_tokens(row_labels[row_labels != -100])
        assert learned == row["response"].split() + ["<|end|>"]


def test_examples_use_only_words_the_tiny_tokenizer_knows(digits):
    train, _ = digits
    tokenizer = build_tiny_tokenizer("llava")
    rows = digit_caption_examples(train, seed=0) + digit_text_examples(500, seed=0)
    for row in rows:
        assert tokenizer.unk_token not in tokenizer.tokenize(f"{row['prompt']} {row['response']}"), row
    captions = digit_caption_examples(train, seed=0)
    assert all(DIGIT_NAMES[row["digit"]] in row["response"].split() or str(row["digit"]) in row["response"].split()
               for row in captions)
    templates = {row["response"].replace(DIGIT_NAMES[row["digit"]], "{name}") for row in captions}
    assert templates >= set(DIGIT_CAPTIONS[:-1])  # every caption naming the digit by its word is used


def test_text_model_weights_make_llava_compute_the_same_text_logits():
    text_model, tokenizer = build_tiny_model("text", seed=3)
    model, processor = build_tiny_model("llava", seed=0)
    load_text_model_weights(model, text_model)
    input_ids = tokenizer(["what number is 7 ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = text_model(input_ids=input_ids).logits
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits[..., : expected.shape[-1]], expected)


def test_text_model_weights_refuse_a_different_language_model():
    text_model, _ = build_tiny_model("text", seed=0)
    model, _ = build_tiny_model("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="Cannot copy LlamaForCausalLM"):
        load_text_model_weights(model, text_model)


def test_digit_accuracy_asks_a_text_model_in_words():
    model, tokenizer = build_tiny_model("text", seed=0)
    accuracy = digit_accuracy(model, tokenizer, [(None, digit) for digit in range(10)])
    assert accuracy in {i / 10 for i in range(11)}
    with pytest.raises(ValueError, match="at least one"):
        digit_accuracy(model, tokenizer, [])


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(pretrain_tiny_model, "pretrain_tiny_model", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
