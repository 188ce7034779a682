"""Properties over generated inputs (Hypothesis), not cases listed one by one: every generated row gives a result or
a `RowError` naming that row, whatever else is in its batch; a row's scores do not depend on the rows batched with it
or on the batch size; the DPO conversion and the dataset layouts either convert a row or name it. Failing examples
Hypothesis finds and shrinks are kept below as regular tests."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from saev_hf import SAEV, SAEVConfig
from saev_hf.data import RowError, to_trl_layout
from saev_hf.data.prompts import conversational_example
from saev_hf.scoring import SAEVScorer, ScorerArguments

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WORDS = ["what", "digit", "is", "this", "a", "cat", "red", "one", "two", "?"]


@st.composite
def images(draw):
    """An image in any mode PIL has, of any size from 1 pixel, as a PIL image, PNG bytes or a datasets.Image dict."""
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if mode == "F":
        image = Image.fromarray(rng.random((height, width)).astype(np.float32))
    elif mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65535, (height, width)).astype(np.uint16 if mode == "I;16" else
                                                                                   np.int32))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3)).astype(np.uint8), "RGB").convert(mode)
    form = draw(st.sampled_from(["pil", "bytes", "dict"]))
    if form == "pil":
        return image
    buffer = io.BytesIO()
    (image if mode not in ("CMYK", "F", "I") else image.convert("RGB")).save(buffer, format="PNG")
    return buffer.getvalue() if form == "bytes" else {"bytes": buffer.getvalue(), "path": None}


@st.composite
def rows(draw, valid: bool = False):
    """A preference row as users' data has them: images a list (maybe empty) or one image; a prompt plain,
    conversational, empty or missing; a chosen answer; with `valid`, only rows that can be scored."""
    image_list = draw(st.lists(images(), min_size=1 if valid else 0, max_size=2))
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1 if valid else 0, max_size=8))
    text = " ".join(words)
    kind = draw(st.sampled_from(["plain", "conversation"] if valid else ["plain", "conversation", "none", "number"]))
    prompt = {"plain": text, "conversation": [{"role": "user", "content": [{"type": "text", "text": text}]}],
              "none": None, "number": 3}[kind]
    return {"images": image_list, "prompt": prompt, "chosen": " ".join(draw(st.lists(st.sampled_from(WORDS),
                                                                                     min_size=1, max_size=4)))}


@pytest.fixture(scope="module")
def scorer(tiny_model_factory):
    llava = tiny_model_factory("llava")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return SAEVScorer(sae, llava.model, llava.processor,
                      args=ScorerArguments(scores=["l0", "cooccur_l0", "length", "answer_log_likelihood"],
                                           on_error="null"))


def as_batch(batch_rows: list[dict]) -> dict[str, list]:
    return {name: [row[name] for row in batch_rows] for name in batch_rows[0]}


@PROPERTY_SETTINGS
@given(batch=st.lists(rows(), min_size=1, max_size=4))
def test_every_row_gets_scores_or_a_reason_that_names_it(scorer, batch):
    out = scorer(as_batch(batch), list(range(10, 10 + len(batch))))
    for i, reason in enumerate(out["saev_error"]):
        values = [out[name][i] for name in ("saev_l0", "saev_cooccur_l0", "length", "answer_log_likelihood")]
        if reason is None:
            assert all(value is not None and np.isfinite(value) for value in values), (i, values)
        else:
            assert reason.startswith(f"Row {10 + i}") or f"Row {10 + i}:" in reason, reason
            assert all(value is None for value in values)


@PROPERTY_SETTINGS
@given(batch=st.lists(rows(valid=True), min_size=2, max_size=4), size=st.integers(1, 3))
def test_a_rows_scores_do_not_depend_on_its_batch(scorer, batch, size):
    together = scorer(as_batch(batch), list(range(len(batch))))
    for start in range(0, len(batch), size):
        part = batch[start : start + size]
        alone = scorer(as_batch(part), list(range(start, start + len(part))))
        for name in ("saev_l0", "saev_cooccur_l0", "length", "answer_log_likelihood", "saev_error"):
            expected = together[name][start : start + len(part)]
            if name == "saev_error" or expected[0] is None:
                assert alone[name] == expected
            else:
                assert alone[name] == pytest.approx(expected, rel=1e-4, abs=1e-5), name


@PROPERTY_SETTINGS
@given(row=rows())
def test_the_dpo_conversion_converts_a_row_or_names_it(row):
    responses = {"chosen": row["chosen"], "rejected": row["chosen"] + " no"}
    try:
        prompt, converted = conversational_example(row["prompt"], responses, len(row["images"]), "<image>", 7)
    except RowError as error:
        assert str(error).startswith("Row 7")
        return
    assert set(converted) == {"chosen", "rejected"}
    if isinstance(prompt, list):  # conversational: one placeholder per image, a user turn first
        placed = sum(part.get("type") == "image" for message in prompt for part in message["content"])
        assert placed == len(row["images"]) and prompt[0]["role"] == "user"


@PROPERTY_SETTINGS
@given(overall=st.lists(st.one_of(st.integers(-2, 4), st.none()), min_size=1, max_size=8))
def test_align_anything_keeps_the_rows_with_a_preference_and_counts_or_names_the_others(overall):
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Value("string"),
                                  "response_1": datasets.Value("string"), "response_2": datasets.Value("string"),
                                  "overall_response": datasets.Value("int64")})
    source = datasets.Dataset.from_dict({"question": ["q"] * len(overall), "image": ["a.png"] * len(overall),
                                         "response_1": [f"one {i}" for i in range(len(overall))],
                                         "response_2": [f"two {i}" for i in range(len(overall))],
                                         "overall_response": overall}, features=features)
    kept = to_trl_layout(source, "align_anything", missing_preference="drop")
    expected = [i for i, value in enumerate(overall) if value in (1, 2)]
    assert kept["chosen"] == [f"{'one' if overall[i] == 1 else 'two'} {i}" for i in expected]
    bad = next((i for i, value in enumerate(overall) if value not in (1, 2)), None)
    if bad is None:
        assert len(to_trl_layout(source, "align_anything")) == len(overall)
    else:
        with pytest.raises(RowError, match=f"Row {bad}: overall_response="):
            to_trl_layout(source, "align_anything")


@pytest.fixture(scope="module")
def weighting_setup(tiny_model_factory):
    from test_scoring import data_driven_sae, make_rows

    from saev_hf.activations import LayerReader

    llava = tiny_model_factory("llava")
    rows_ = datasets.Dataset.from_dict(make_rows(12))
    reader = LayerReader(llava.model, llava.processor, layer=1)
    sae = data_driven_sae(reader, rows_)
    from saev_hf.weighting import WeightingArguments, compute_feature_weights

    reference = compute_feature_weights(sae, reader, rows_, WeightingArguments(num_examples=None), store=False)
    return llava, reader, sae, rows_, reference


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch_size=st.integers(1, 12), order=st.permutations(list(range(12))))
def test_feature_weights_do_not_depend_on_batch_size_or_on_the_order_of_the_rows(weighting_setup, batch_size, order):
    from saev_hf.weighting import WeightingArguments, compute_feature_weights

    _, reader, sae, rows_, reference = weighting_setup
    weights = compute_feature_weights(sae, reader, rows_.select(order),
                                      WeightingArguments(num_examples=None, batch_size=batch_size), store=False)
    torch.testing.assert_close(weights, reference, equal_nan=True, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(read_batch_size=st.integers(1, 6), shard_size_tokens=st.integers(60, 400), count=st.integers(1, 12))
def test_the_cache_holds_every_rows_tokens_as_the_reader_reads_them(weighting_setup, tmp_path_factory,
                                                                    read_batch_size, shard_size_tokens, count):
    from saev_hf.cache import ActivationCache, CacheArguments, cache_activations

    llava, reader, _, rows_, _ = weighting_setup
    part = rows_.select(range(count))
    folder = tmp_path_factory.mktemp("cache")
    try:
        cache = ActivationCache(cache_activations(
            CacheArguments(output_dir=str(folder), layer=1, read_batch_size=read_batch_size,
                           shard_size_tokens=shard_size_tokens, disable_tqdm=True),
            model=llava.model, processor=llava.processor, dataset=part))
    except ValueError as error:  # a row longer than a shard: refused, naming the size to use
        assert "Raise shard_size_tokens to at least" in str(error)
        return
    assert cache.num_rows == count and all(entry["num_tokens"] <= shard_size_tokens for entry in cache.shards)
    for row, cached in zip(range(count), cache.rows(list(range(count)))):
        acts = reader.read(part[row : row + 1], first_row=row)
        hidden, modality = acts.example(0)
        kept = acts.scored_mask(True)[0][: len(hidden)]
        torch.testing.assert_close(cached["activations"], hidden[kept].float(), rtol=1e-5, atol=1e-5)
