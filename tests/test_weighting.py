"""Cross-modal feature weights (Algorithm 1, stages 1-2) against a plain all-in-memory reference."""

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality
from saev_hf.weighting.cosine import CosineAccumulator
from saev_hf.weighting.top_k import FeatureTopK, ModalityTopK
from saev_hf.weighting import WeightingArguments, compute_feature_weights
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images


def reference_weights(hidden, is_image, counted_z, top_k=30, per_modality=5, center=None, pool="pooled"):
    """The method page's definition (or, with pool="per_modality", each modality's own top positions), computed the
    obvious way with every hidden state in memory."""
    d_sae = counted_z.shape[1]
    weights = torch.full((d_sae,), math.nan)
    h = hidden if center is None else hidden - center
    for f in range(d_sae):
        firing = (counted_z[:, f] > 0).nonzero().flatten()
        ranked = firing[counted_z[firing, f].argsort(descending=True)].tolist()
        top = ranked[:top_k] if pool == "pooled" else ranked
        text = [i for i in top if not is_image[i]]
        image = [i for i in top if is_image[i]]
        if len(text) >= per_modality and len(image) >= per_modality:
            t = F.normalize(h[text[:per_modality]], dim=-1)
            v = F.normalize(h[image[:per_modality]], dim=-1)
            weights[f] = (t @ v.T).mean()
    return weights


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    llava = tiny_model_factory("llava")
    reader = LayerReader(llava.model, llava.processor, layer=1)
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=192, hook_layer=1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    data = digit_images(14, seed=3)
    ds = datasets.Dataset.from_dict({
        "images": [image for image, _ in data],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(data)],
    })
    return sae, reader, ds


def all_states(reader, ds, special_as_text=True):
    acts = reader.read(ds[:])
    counted = (acts.modality == Modality.TEXT) | (acts.modality == Modality.IMAGE)
    if special_as_text:
        counted |= acts.modality == Modality.SPECIAL
    return acts.hidden_states[counted], acts.modality[counted] == Modality.IMAGE


@pytest.mark.parametrize("special_as_text, mean_center, pool", [(True, False, "pooled"), (False, False, "pooled"),
                                                              (True, True, "pooled"), (True, False, "per_modality")])
def test_weights_equal_the_reference_computation(setup, special_as_text, mean_center, pool):
    sae, reader, ds = setup
    args = WeightingArguments(num_examples=None, batch_size=3, token_chunk=50, special_as_text=special_as_text,
                              mean_center=mean_center, top_k_pool=pool)
    weights = compute_feature_weights(sae, reader, ds, args, store=False)
    hidden, is_image = all_states(reader, ds, special_as_text)
    center = hidden.double().mean(0).float() if mean_center else None
    expected = reference_weights(hidden, is_image, sae.encode(hidden), center=center, pool=pool)
    assert torch.equal(torch.isnan(weights), torch.isnan(expected))
    assert (~torch.isnan(expected)).sum() > 10, "the fixture must produce weighted features for the test to mean anything"
    torch.testing.assert_close(weights, expected, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_weights_do_not_depend_on_batch_size_and_are_stored_in_the_sae(setup, tmp_path):
    sae, reader, ds = setup
    sae = SAEV(sae.config)
    sae.load_state_dict(setup[0].state_dict())
    by_one = compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=None, batch_size=1), store=False)
    by_five = compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=None, batch_size=5))
    torch.testing.assert_close(by_one, by_five, equal_nan=True, atol=1e-6, rtol=1e-6)
    info = sae.config.feature_weights_info
    assert info["num_examples"] == 14 and info["top_k"] == 30 and info["per_modality"] == 5
    assert info["num_weighted_features"] == int((~torch.isnan(by_five)).sum())
    sae.save_pretrained(tmp_path)
    reloaded = SAEV.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.feature_weights, by_five, equal_nan=True)
    assert reloaded.config.feature_weights_info == info


def test_sample_size_picks_a_seeded_subset(setup):
    sae, reader, ds = setup
    a = compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=6, seed=1), store=False)
    b = compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=6, seed=1), store=False)
    whole = compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=None), store=False)
    torch.testing.assert_close(a, b, equal_nan=True)
    assert not torch.equal(torch.isnan(a), torch.isnan(whole)) or not torch.allclose(a, whole, equal_nan=True)


def test_the_rules_for_single_modal_and_mixed_features():
    """Synthetic stream: feature 0 image-only, 1 text-only, 2 with 4 image + 26 text, 3 with 5 + 5 in its top 10."""
    d_sae, d_in, n = 4, 3, 60
    torch.manual_seed(0)
    is_image = torch.arange(n) % 2 == 0
    z = torch.zeros(n, d_sae)
    z[is_image, 0] = torch.rand(int(is_image.sum())) + 0.1
    z[~is_image, 1] = torch.rand(int((~is_image).sum())) + 0.1
    image_rows, text_rows = is_image.nonzero().flatten(), (~is_image).nonzero().flatten()
    z[image_rows[:4], 2] = 5.0 + torch.arange(4.0)
    z[text_rows, 2] = torch.rand(len(text_rows)) + 1
    z[image_rows[:5], 3] = 2 + torch.rand(5)
    z[text_rows[:5], 3] = 2 + torch.rand(5)
    hidden = torch.randn(n, d_in)
    positions = torch.arange(n)
    top = FeatureTopK(d_sae, top_k=10)
    for chunk in range(0, n, 7):  # stream in uneven chunks
        top.update(z[chunk : chunk + 7], positions[chunk : chunk + 7], is_image[chunk : chunk + 7])
    text_count, image_count, weighted, chosen = top.selection(per_modality=5)
    assert text_count.tolist() == [0, 10, 6, 5] and image_count.tolist() == [10, 0, 4, 5]
    assert weighted.tolist() == [False, False, False, True]
    acc = CosineAccumulator(weighted, chosen, per_modality=5, d_in=d_in)
    acc.update(hidden, positions)
    weights = acc.weights(d_sae)
    assert torch.isnan(weights[:3]).all()
    expected = (F.normalize(hidden[text_rows[:5]], dim=-1) @ F.normalize(hidden[image_rows[:5]], dim=-1).T).mean()
    torch.testing.assert_close(weights[3], expected)
    # per modality, feature 2's 26 text positions no longer crowd out its image ones, but it fires on only 4 images
    per_modality = ModalityTopK(d_sae, per_modality=5)
    for chunk in range(0, n, 7):
        per_modality.update(z[chunk : chunk + 7], positions[chunk : chunk + 7], is_image[chunk : chunk + 7])
    text_count, image_count, weighted, chosen = per_modality.selection(per_modality=5)
    assert text_count.tolist() == [0, 5, 5, 5] and image_count.tolist() == [5, 0, 4, 5]
    assert weighted.tolist() == [False, False, False, True]
    acc = CosineAccumulator(weighted, chosen, per_modality=5, d_in=d_in)
    acc.update(hidden, positions)
    torch.testing.assert_close(acc.weights(d_sae)[3], expected)


def test_top_k_memory_does_not_grow_with_the_stream():
    top = FeatureTopK(d_sae=64, top_k=30)
    sizes = []
    for step in range(5):
        top.update(torch.rand(100, 64), torch.arange(step * 100, step * 100 + 100), torch.rand(100) > 0.5)
        sizes.append(sum(t.numel() for t in (top.values, top.positions, top.is_image)))
    assert len(set(sizes)) == 1 and sizes[0] == 3 * 30 * 64
    assert (top.values.min(0).values >= 0.9).all(), "the top 30 of 500 uniform values are all large"


def test_invalid_weighting_arguments():
    with pytest.raises(ValueError, match=r"per_modality=20 needs at least 40 positions among the top 30"):
        WeightingArguments(per_modality=20)
    with pytest.raises(ValueError, match=r"top_k=0 must be a positive integer"):
        WeightingArguments(top_k=0)
    with pytest.raises(ValueError, match=r"num_examples=0 must be positive"):
        WeightingArguments(num_examples=0)
    with pytest.raises(ValueError, match=r"top_k_pool='both' must be 'pooled'"):
        WeightingArguments(top_k_pool="both")


def test_weighting_checks_the_sae_fits_the_model(setup):
    _, reader, ds = setup
    with pytest.raises(ValueError, match=r"reads d_in=32 but LlavaForConditionalGeneration has hidden size 64"):
        compute_feature_weights(SAEV(SAEVConfig(d_in=32, d_sae=64, hook_layer=1)), reader, ds)


def reference_top_k(values, positions, top_k):
    """Each feature's top_k firing (value, position) pairs, by value then earlier position: sorted the obvious way."""
    return [sorted((-float(values[i, f]), int(positions[i])) for i in range(len(values)) if values[i, f] > 0)[:top_k]
            for f in range(values.shape[1])]


def kept(top):
    return [[(-v, p) for v, p in zip(top.values[:, f].tolist(), top.positions[:, f].tolist()) if v > 0]
            for f in range(top.values.shape[1])]


def test_ties_are_broken_by_earlier_position_whatever_the_chunking():
    # four distinct values over 400 tokens: a bfloat16-like stream where nearly every top-K is decided by ties
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (400, 24), generator=generator).float() / 2
    positions = torch.randperm(100_000, generator=generator)[:400]
    is_image = torch.rand(400, generator=generator) > 0.5
    expected = reference_top_k(values, positions, top_k=7)
    states = []
    for chunk, order in ((400, None), (1, None), (7, None), (64, None), (33, torch.randperm(400, generator=generator)),
                         (128, torch.arange(399, -1, -1))):
        top = FeatureTopK(d_sae=24, top_k=7)
        index = torch.arange(400) if order is None else order
        for start in range(0, 400, chunk):
            part = index[start : start + chunk]
            top.update(values[part], positions[part], is_image[part])
        assert kept(top) == expected, f"chunks of {chunk}"
        states.append((top.values, top.positions, top.is_image))
    for state in states[1:]:  # the whole state, modality and empty slots included, not only the firing positions
        assert all(torch.equal(a, b) for a, b in zip(state, states[0]))


def test_ties_straddling_the_kth_place_keep_the_earliest_positions():
    # one chunk, every value equal, positions given latest first: topk alone may keep any 5 of the 50
    top = FeatureTopK(d_sae=3, top_k=5)
    values = torch.ones(50, 3)
    values[10, 1] = 2.0  # above the tie: always kept, first
    values[:, 2] = 0.0  # silent: nothing kept
    top.update(values, torch.arange(500, 0, -10), torch.zeros(50, dtype=torch.bool))
    assert top.positions[:, 0].tolist() == [10, 20, 30, 40, 50]
    assert top.positions[:, 1].tolist() == [400, 10, 20, 30, 40]
    assert top.positions[:, 2].tolist() == [-1] * 5 and top.values[:, 2].tolist() == [0.0] * 5


def test_model_cosine_score_is_the_mean_weight_of_the_weighted_features(setup, capsys):
    from saev_hf.weighting import model_cosine_score

    sae, reader, ds = setup
    copy = SAEV(sae.config)
    copy.load_state_dict(sae.state_dict())
    weights = compute_feature_weights(copy, reader, ds, WeightingArguments(num_examples=None, threshold_quantile=0.5))
    weighted = weights[~torch.isnan(weights)]
    assert len(weighted) > 10
    assert model_cosine_score(weights) == pytest.approx(float(weighted.double().mean()), abs=1e-12)
    assert copy.config.feature_weights_info["mean_cosine_score"] == pytest.approx(model_cosine_score(weights))
    assert model_cosine_score(torch.tensor([math.nan, 0.2, math.nan, 0.4])) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="No feature has a cross-modal weight"):
        model_cosine_score(torch.full((4,), math.nan))
