"""Evaluating an SAE-V: metrics equal their textbook formulas; CE-loss-recovered is 1 for a perfect SAE, 0 for zeros."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from torch import nn

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality
from saev_hf.cli import main as cli_main
from saev_hf.evaluation.metrics import _replace_output
from saev_hf.evaluation import evaluate_saev, format_metrics_table
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

D_IN = 64


def digit_rows(n: int) -> list[dict]:
    captions = ("a handwritten digit {}", "what digit is this ? it is {}", "{}")
    return [{"images": [image], "prompt": captions[i % 3].format(DIGIT_NAMES[label])}
            for i, (image, label) in enumerate(digit_images(n, seed=3))]


def text_rows(n: int) -> list[dict]:
    words = "the image shows a handwritten number and the answer is seven".split()
    return [{"prompt": " ".join(words[: 4 + i % 7])} for i in range(n)]


def identity_sae(layer: int = 1) -> SAEV:
    """z = [relu(x), relu(-x)], x_hat = relu(x) - relu(-x) = x exactly: a perfect reconstruction."""
    sae = SAEV(SAEVConfig(d_in=D_IN, d_sae=2 * D_IN, hook_layer=layer))
    eye = torch.eye(D_IN)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(layer: int = 1) -> SAEV:
    sae = identity_sae(layer)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_sae(layer: int = 1, seed: int = 0) -> SAEV:
    torch.manual_seed(seed)
    sae = SAEV(SAEVConfig(d_in=D_IN, expansion_factor=4, hook_layer=layer, input_scale=3.0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    return sae


def test_a_perfect_reconstruction_recovers_all_the_loss_and_zeros_recover_none(tiny_model_factory):
    llava = tiny_model_factory("llava")
    rows = digit_rows(6)
    perfect = evaluate_saev(identity_sae(), llava.model, llava.processor, rows, batch_size=4)
    for split in ("all", "text", "image"):
        m = perfect[split]
        assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-6)
        assert m["ce_zero"] != pytest.approx(m["ce_clean"], abs=1e-4)  # zero-ablation really changes the output
        assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert m["mse"] == pytest.approx(0.0, abs=1e-10) and m["explained_variance"] == pytest.approx(1.0)
    zeros = evaluate_saev(zero_sae(), llava.model, llava.processor, rows, batch_size=4)
    for split in ("all", "text", "image"):
        assert zeros[split]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
        assert zeros[split]["ce_sae"] == pytest.approx(zeros[split]["ce_zero"], abs=1e-6)


def test_clean_cross_entropy_equals_the_models_own_loss(tiny_model_factory):
    llava = tiny_model_factory("llava")
    rows = digit_rows(4)
    metrics = evaluate_saev(random_sae(), llava.model, llava.processor, rows, batch_size=4)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    inputs = reader.prepare(rows)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = llava.model(**inputs, labels=labels).loss
    assert metrics["all"]["ce_clean"] == pytest.approx(float(loss), rel=1e-5)
    # CE is split by the predicted token: every real position but the first of each row is predicted once
    modality = reader.modality(inputs["input_ids"], inputs["attention_mask"])[:, 1:]
    assert metrics["all"]["ce_tokens"] == int((modality != Modality.PAD).sum())
    assert metrics["image"]["ce_tokens"] == int((modality == Modality.IMAGE).sum()) == 4 * 16
    assert metrics["text"]["ce_tokens"] + metrics["image"]["ce_tokens"] == metrics["all"]["ce_tokens"]


def test_sparsity_and_reconstruction_metrics_equal_direct_computations(tiny_model_factory):
    llava = tiny_model_factory("llava")
    rows = digit_rows(7)
    sae = random_sae()
    metrics = evaluate_saev(sae, llava.model, llava.processor, rows, batch_size=3, dense_threshold=0.3,
                            compute_ce_loss=False)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    xs, modalities = [], []
    for start in range(0, 7, 3):  # any batching gives the same states; read in the same batches to compare exactly
        acts = reader.read(rows[start : start + 3])
        xs.append(acts.hidden_states[acts.token_mask])
        modalities.append(acts.modality[acts.token_mask])
    x, modality = torch.cat(xs).double(), torch.cat(modalities)
    with torch.no_grad():
        z = sae.encode(x.float())
        x_hat = sae.decode(z).double()
    for split, mask in (("all", modality != Modality.PAD), ("image", modality == Modality.IMAGE),
                        ("text", modality != Modality.IMAGE)):
        xs_, xh = x[mask], x_hat[mask]
        m = metrics[split]
        assert m["tokens"] == int(mask.sum()) > 0
        assert m["l0"] == pytest.approx(float((z[mask] > 0).sum(-1).double().mean()))
        assert m["mse"] == pytest.approx(float((xs_ - xh).pow(2).sum(-1).mean()), rel=1e-6)
        ev = 1 - (xs_ - xh).pow(2).sum() / (xs_ - xs_.mean(0)).pow(2).sum()
        assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-6)
        assert m["l2_ratio"] == pytest.approx(float((xh.norm(dim=-1) / xs_.norm(dim=-1)).mean()), rel=1e-6)
        split_frequency = (z[mask] > 0).double().mean(0)
        log_frequency = split_frequency[split_frequency > 0].log10()
        expected = [int(((log_frequency >= low) & (log_frequency < low + 1)).sum()) for low in range(-8, 0)]
        expected[-1] += int((log_frequency == 0).sum())  # a feature firing on every token sits in the last bin
        density = m["feature_density"]
        assert density["counts"] == expected and density["dead"] == int((split_frequency == 0).sum())
        assert "ce_sae" not in m
    frequency = (z > 0).double().mean(0)
    assert metrics["dead_features"] == int((frequency == 0).sum())
    assert metrics["dense_features"] == int((frequency > 0.3).sum()) > 0
    assert metrics["num_examples"] == 7 and metrics["d_sae"] == 4 * D_IN


def test_an_sae_v_transfers_to_the_text_only_model(tiny_model_factory, tiny_text_model, tmp_path):
    llava = tiny_model_factory("llava")
    # train a small SAE-V on the tiny LLaVA, then evaluate it on the text-only Llama of the same width
    from saev_hf.training import SAEVTrainingArguments, train_saev

    rows = digit_rows(16)
    data = datasets.Dataset.from_list(rows)
    args = SAEVTrainingArguments(layer=1, output_dir=str(tmp_path / "saev"), expansion_factor=4, max_steps=60,
                                 train_batch_size_tokens=32, buffer_size_tokens=256, read_batch_size=4,
                                 learning_rate=1e-3, l1_coefficient=0.5, input_scale_estimation_tokens=256,
                                 disable_tqdm=True)
    sae = train_saev(args, llava.model, llava.processor, data)
    on_text = evaluate_saev(sae, tiny_text_model.model, tiny_text_model.processor, text_rows(6), batch_size=3)
    assert on_text["image"]["tokens"] == 0 and on_text["image"]["l0"] is None and on_text["image"]["ce_sae"] is None
    assert on_text["text"]["tokens"] == on_text["all"]["tokens"] > 0
    assert on_text["text"]["ce_tokens"] > 0 and on_text["text"]["ce_loss_recovered"] is not None
    on_mllm = evaluate_saev(sae, llava.model, llava.processor, rows[:6], batch_size=3)
    assert on_mllm["all"]["explained_variance"] > 0.5  # trained on this distribution
    table = format_metrics_table(on_text)
    assert "| tokens | " in table and "| CE loss recovered |" in table
    assert table.splitlines()[2].endswith("| 0 |")  # no image token in text data
    assert "| L0 |" in table and table.splitlines()[3].endswith("| - |")


def test_the_replacing_hook_keeps_the_layer_output_form():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return x + 1, "cache"

    class TensorLayer(nn.Module):
        def forward(self, x):
            return x + 1

    replacement = torch.full((2, 3), 7.0)
    for layer, check in ((TupleLayer(), lambda out: out[1] == "cache" and torch.equal(out[0], replacement)),
                         (TensorLayer(), lambda out: torch.equal(out, replacement))):
        captured = []
        handle = layer.register_forward_hook(_replace_output(replacement, captured))
        out = layer(torch.zeros(2, 3))
        handle.remove()
        assert check(out) and torch.equal(captured[0], torch.ones(2, 3))  # it saw the real output first
        captured.clear()
        handle = layer.register_forward_hook(_replace_output(None, captured))
        out = layer(torch.zeros(2, 3))
        handle.remove()
        assert torch.equal(out[0] if isinstance(out, tuple) else out, torch.ones(2, 3))  # None changes nothing


def test_bad_evaluation_inputs_say_what_to_do(tiny_model_factory, tiny_text_model):
    llava = tiny_model_factory("llava")
    with pytest.raises(ValueError, match="reads d_in=32 but LlavaForConditionalGeneration has hidden size 64"):
        evaluate_saev(SAEV(SAEVConfig(d_in=32, d_sae=64, hook_layer=1)), llava.model, llava.processor, digit_rows(1))
    with pytest.raises(ValueError, match="records no hook_layer: pass layer="):
        evaluate_saev(SAEV(SAEVConfig(d_in=D_IN, d_sae=64)), llava.model, llava.processor, digit_rows(1))
    with pytest.raises(ValueError, match="trained on layer 2 but this reader reads layer 1"):
        evaluate_saev(identity_sae(layer=2), llava.model, llava.processor, digit_rows(1), layer=1)
    with pytest.raises(ValueError, match="The evaluation data gave no token"):
        evaluate_saev(identity_sae(), tiny_text_model.model, tiny_text_model.processor, [])


def test_saev_eval_command_prints_the_table_and_writes_json(tiny_model_factory, tmp_path, capsys):
    llava = tiny_model_factory("llava")
    identity_sae().save_pretrained(tmp_path / "sae")
    datasets.Dataset.from_list(digit_rows(5)).save_to_disk(str(tmp_path / "data"))
    argv = ["eval", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(llava.path),
            "--dataset_name", str(tmp_path / "data"), "--num_examples", "4", "--batch_size", "2",
            "--output_dir", str(tmp_path / "eval")]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "| CE loss recovered | 1 | 1 | 1 |" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_examples"] == 4 and metrics["model"] == str(llava.path)
    assert metrics["image"]["tokens"] == 4 * 16
    assert "| KL score | 1 | 1 | 1 |" in out and "| L2 ratio | 1 | 1 | 1 |" in out
    from PIL import Image

    assert Image.open(tmp_path / "eval" / "feature_density.png").size[0] > 400  # SAEBench's density plot


def metrics_with(**per_split):
    """An evaluate_saev-shaped result whose splits take the given values (e.g. ce_loss_recovered=(4.441, 0.5, -2))."""
    metrics = {"model": "m", "layer": 1, "num_examples": 2, "d_sae": 8, "dead_features": 0, "dense_features": 0,
               "dense_threshold": 0.1}
    for i, split in enumerate(("all", "text", "image")):
        metrics[split] = {"tokens": 10, "l0": 3.0, "mse": 0.5, "explained_variance": 0.9, "ce_tokens": 9,
                          "ce_clean": 2.0, "ce_sae": 2.1, "ce_zero": 3.0, "ce_loss_recovered": 0.9}
        metrics[split].update({key: values[i] for key, values in per_split.items()})
    return metrics


def test_the_table_explains_ce_loss_recovered_outside_zero_to_one():
    from saev_hf.evaluation import format_metrics_table

    table = format_metrics_table(metrics_with(ce_loss_recovered=(4.441, 0.5, -2.0)))
    assert "CE loss recovered above 1 (all 4.441): with the SAE's reconstruction the model predicts" in table
    assert "CE with SAE < CE clean" in table
    assert "CE loss recovered below 0 (image -2): the SAE's reconstruction is worse than zero-ablating" in table
    assert "Explained variance below 0" not in table
    plain = format_metrics_table(metrics_with(ce_loss_recovered=(1.0, 0.0, None)))
    assert "above 1" not in plain and "below 0" not in plain
    negative = format_metrics_table(metrics_with(explained_variance=(0.5, -0.25, 0.5)))
    assert "Explained variance below 0 (text -0.25): the reconstruction is further from the hidden states" in negative


def test_the_table_refuses_metrics_that_are_not_an_evaluation_naming_the_missing_keys():
    from saev_hf.evaluation import check_metrics, format_metrics_table

    with pytest.raises(ValueError, match=r"lack model, layer, .*dense_threshold, all, text, image: .*--output_dir DIR` \(DIR/metrics\.json\)"):
        format_metrics_table({})
    broken = metrics_with()
    del broken["text"]["l0"], broken["d_sae"]
    with pytest.raises(ValueError, match=r"The metrics lack d_sae, text\.l0:"):
        check_metrics(broken)
    check_metrics(metrics_with())  # a complete one passes


def test_kl_divergence_with_the_sae_spliced_in_equals_a_direct_computation(tiny_model_factory):
    import torch.nn.functional as F

    from saev_hf.evaluation.metrics import _logits

    llava = tiny_model_factory("llava")
    rows = digit_rows(4)
    sae = random_sae()
    metrics = evaluate_saev(sae, llava.model, llava.processor, rows, batch_size=4)
    reader = LayerReader(llava.model, llava.processor, layer=1)
    inputs = reader.prepare(rows)
    layer = reader.layers[1]
    with torch.no_grad():
        clean, hidden = _logits(llava.model, layer, dict(inputs), None)
        spliced, _ = _logits(llava.model, layer, dict(inputs), sae.decode(sae.encode(hidden)))
        zeroed, _ = _logits(llava.model, layer, dict(inputs), torch.zeros_like(hidden))
    modality = reader.modality(inputs["input_ids"], inputs["attention_mask"])[:, 1:]
    p = torch.softmax(clean[:, :-1].double(), -1)
    for split, mask in (("all", modality != Modality.PAD), ("text", (modality != Modality.PAD) & (
            modality != Modality.IMAGE))):
        kls = {}
        for kind, logits in (("sae", spliced), ("zero", zeroed)):
            q = torch.log_softmax(logits[:, :-1].double(), -1)
            kl = (p * (p.log() - q)).sum(-1)
            kls[kind] = float(kl[mask].mean())
            assert metrics[split][f"kl_{kind}"] == pytest.approx(kls[kind], rel=1e-4)
        assert metrics[split]["kl_score"] == pytest.approx(1 - kls["sae"] / kls["zero"], rel=1e-4)
    perfect = evaluate_saev(identity_sae(), llava.model, llava.processor, rows, batch_size=4)
    assert perfect["all"]["kl_sae"] == pytest.approx(0.0, abs=1e-6) and perfect["all"]["kl_score"] == pytest.approx(1.0)
    assert perfect["all"]["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
