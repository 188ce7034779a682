"""Image patches: token -> patch layouts checked against the real models, patch scores (Algorithms 4-7), masks, and
the patch filter as a cached datasets.map function."""

import copy

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from saev_hf.activations import LayerReader, Modality
from saev_hf.patches import (PATCH_SCORES, PatchFilter, PatchFilterArguments, PatchLocator, keep_mask, mask_patches, token_patch_scores)
from saev_hf.data import RowError
from saev_hf.testing.digit_data import digit_images
from saev_hf.weighting import WeightingArguments, compute_feature_weights
from test_scoring import DELTA, data_driven_sae

SIZES = [(32, 32), (48, 32), (32, 64)]  # square, wide, tall: centre crops, anyres tiles and Qwen's grids differ


def _image_embeddings(reader, image):
    """The language model's input at the image positions (after the vision tower, projector and any packing)."""
    got = []

    def grab(module, args, kwargs):
        got.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = reader.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    inputs = reader.prepare({"images": [[image]], "prompt": ["what digit is this ?"]})
    try:
        with torch.no_grad():
            reader.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    modality = reader.modality(inputs["input_ids"], inputs["attention_mask"])
    return got[0][0][modality[0] == Modality.IMAGE], inputs


def _check_layout_by_occlusion(model, processor, paints=((0, 200, 255), (255, 0, 0))):
    """Paint each cell of each view of the layout in turn: the image token that changes most, among the view's
    tokens, must be that cell's. This runs the real processor (resize, crop, tiles) and the model's own packing."""
    reader = LayerReader(model, processor, layer=0)
    locator = PatchLocator(model, processor)
    image = digit_images(1, seed=3)[0][0]
    for size in SIZES:
        picture = image.resize(size)
        reference, inputs = _image_embeddings(reader, picture)
        (grid,) = locator.grids(inputs, example=0, image_sizes=[size])
        assert grid.num_tokens == len(reference)
        for v, view in enumerate(grid.views):
            tokens = view.tokens.reshape(-1)
            for cell, box in enumerate(view.cell_boxes(*size)):
                painted = picture.copy()
                painted.paste(paints[cell % len(paints)], box)
                change = (_image_embeddings(reader, painted)[0] - reference).norm(dim=-1)
                most = int(change[tokens].argmax())
                assert most == cell, (f"{type(model).__name__} {size} view {v}: painting cell {cell} changed token of "
                                      f"cell {most} most")


@pytest.mark.parametrize("arch", ["llava", "llava_next", "qwen2_vl", "idefics3", "paligemma"])
def test_layout_puts_every_token_on_its_patch(tiny_model_factory, arch):
    tiny = tiny_model_factory(arch)
    _check_layout_by_occlusion(tiny.model, tiny.processor)


class _LocalVQEncoder(torch.nn.Module):
    """A stand-in for Chameleon's VQ encoder whose latent at a cell depends on that cell's pixels only (the random
    tiny encoder's GroupNorm and attention spread a local change over every code, hiding where tokens come from)."""

    def __init__(self, factor, channels):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(factor)
        self.mix = torch.nn.Conv2d(3, channels, 1)

    def forward(self, pixel_values):
        return self.mix(self.pool(pixel_values))


def test_chameleon_layout_through_its_quantizer():
    from saev_hf.testing.tiny_models import build_tiny_model

    model, processor = build_tiny_model("chameleon")
    vq = model.model.vqmodel
    factor = processor.image_processor.crop_size["height"] // int(processor.image_seq_length**0.5)
    torch.manual_seed(0)
    vq.encoder = _LocalVQEncoder(factor, vq.quant_conv.in_channels)

    def latent(colour):
        pixels = processor.image_processor(Image.new("RGB", (32, 32), colour), return_tensors="pt")["pixel_values"]
        return vq.quant_conv(vq.encoder(pixels))[0, :, 0, 0]

    with torch.no_grad():  # codes for red and for greys: a grey digit cell painted red always changes its code
        codebook = vq.quantize.embedding.weight
        codebook.copy_(latent((255, 255, 255)) + 100.0)
        for index, colour in enumerate([(255, 0, 0), *((v, v, v) for v in range(0, 256, 32)), (255, 255, 255)]):
            codebook[index] = latent(colour)
    _check_layout_by_occlusion(model.eval(), processor, paints=((255, 0, 0),))


def test_layout_errors(tiny_model_factory):
    text = tiny_model_factory("text")
    with pytest.raises(NotImplementedError, match="No patch layout for model type 'llama'.*Supported: .*llava"):
        PatchLocator(text.model, text.processor)
    llava_next = tiny_model_factory("llava_next")
    reader = LayerReader(llava_next.model, llava_next.processor, layer=0)
    image = digit_images(1)[0][0].resize((48, 32))
    inputs = reader.prepare({"images": [[image]], "prompt": ["what digit is this ?"]})
    locator = PatchLocator(llava_next.model, llava_next.processor)
    with pytest.raises(ValueError, match="gives 36 image tokens .* but example 0 has 44"):
        locator.grids(inputs, example=0, image_sizes=[(32, 32)])  # the wrong size for this image


def test_values_average_the_base_and_high_resolution_tokens(tiny_model_factory):
    tiny = tiny_model_factory("llava_next")
    grid = PatchLocator(tiny.model, tiny.processor).image_grid((48, 32))
    base, high = grid.views
    assert base.shape == (4, 4) and high.shape == (4, 6)
    values = torch.zeros(grid.num_tokens)
    values[base.tokens.reshape(-1)] = torch.arange(16, dtype=torch.float)
    values[high.tokens.reshape(-1)] = 100 + torch.arange(24, dtype=torch.float)
    got = grid.values(values)
    # reference: a high-res cell (r, c) of the 4x6 grid has its centre in base cell (r, floor((c + 0.5) * 4 / 6))
    for r in range(4):
        for c in range(4):
            inside = [100 + r * 6 + cc for cc in range(6) if int((cc + 0.5) * 4 / 6) == c]
            expected = (r * 4 + c + np.mean(inside)) / 2
            assert got[r, c].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="one value per image token"):
        grid.values(torch.zeros(5))


def test_token_scores_follow_the_method_page():
    z = torch.tensor([[0.0, 0.5, 2.0, 0.0], [1.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    cooccurring = torch.tensor([False, True, True, False])
    weights = torch.tensor([float("nan"), 0.25, -0.5, 0.75])
    scores = token_patch_scores(z, cooccurring, weights)
    assert scores["l0"].tolist() == [2, 2, 0]
    assert scores["l1"].tolist() == [2.5, 4.0, 0.0]
    assert scores["cooccur_l0"].tolist() == [2, 0, 0]
    assert scores["cosine"].tolist() == [0.25 - 0.5, 0.75, 0.0]  # feature 0 has no weight and adds nothing


def test_keep_mask_uses_the_percentile_rule():
    values = np.arange(16, dtype=float)
    for fraction, kept in [(0.25, 4), (0.5, 8), (0.75, 12), (1.0, 16)]:
        mask = keep_mask(values, fraction)
        assert mask.sum() == kept and mask[-kept:].all()
    assert keep_mask(np.ones(16), 0.25).all()  # ties at the threshold are all kept, as the paper's >= does
    exact = [keep_mask(np.ones(16), 0.25, exact=True, seed=s) for s in range(3)]  # exactly 4, ties broken at random
    assert all(m.sum() == 4 for m in exact) and not all((m == exact[0]).all() for m in exact)
    tied = np.array([5.0, 3, 3, 3, 1, 0])
    assert keep_mask(tied, 0.5).tolist() == [True, True, True, True, False, False]
    assert all(keep_mask(tied, 0.5, exact=True, seed=s)[0] and keep_mask(tied, 0.5, exact=True, seed=s).sum() == 3
               and not keep_mask(tied, 0.5, exact=True, seed=s)[4:].any() for s in range(5))
    with pytest.raises(ValueError, match="keep_fraction=0"):
        keep_mask(values, 0)
    with pytest.raises(ValueError, match="NaN"):
        keep_mask(np.array([1.0, float("nan")]), 0.5)


def test_mask_patches_blacks_out_exactly_the_dropped_cells(tiny_model_factory):
    tiny = tiny_model_factory("llava")
    grid = PatchLocator(tiny.model, tiny.processor).image_grid((48, 32))  # centre crop: columns 8..40 are seen
    image = Image.new("RGB", (48, 32), (200, 180, 160))
    values = np.arange(16, dtype=float).reshape(4, 4)
    masked = np.asarray(mask_patches(image, grid, values, keep_fraction=0.25))
    assert (masked[:, :8] == (200, 180, 160)).all()  # outside the centre crop: untouched
    assert (masked[:, 40:] == (200, 180, 160)).all()
    for index, (left, top, right, bottom) in enumerate(grid.cell_boxes(48, 32)):
        cell = masked[top:bottom, left:right]
        assert (cell == (200, 180, 160)).all() if index >= 12 else (cell == 0).all(), index


@pytest.fixture(scope="module")
def patch_setup(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("patches")
    data = digit_images(6, seed=11)
    rows = {"images": [[image] for image, _ in data], "prompt": ["what digit is this ?"] * len(data)}
    datasets.Dataset.from_dict(rows).save_to_disk(root / "data")
    ds = datasets.load_from_disk(str(root / "data"))
    reader = LayerReader(llava.model, llava.processor, layer=1)
    sae = data_driven_sae(reader, ds, d_sae=96)
    compute_feature_weights(sae, reader, ds, WeightingArguments(num_examples=None))
    return llava, sae, ds, reader


def test_patch_scores_equal_a_direct_computation(patch_setup):
    llava, sae, ds, reader = patch_setup
    scorer = PatchFilter(sae, llava.model, llava.processor)
    got = scorer.score_patches(ds[:3])
    for i in range(3):
        acts = reader.read(ds[i : i + 1])
        hidden, modality = acts.example(0)
        z = sae.encode(hidden)
        image = modality == Modality.IMAGE
        text = ~image
        cooccur = (z[text] > DELTA).any(0) & (z[image] > DELTA).any(0)
        zi = z[image].detach()
        w = sae.feature_weights
        (item,) = got[i]
        assert set(item.scores) == set(PATCH_SCORES)
        for k in range(16):  # the tiny LLaVA: 16 image tokens, row by row on a 4x4 grid
            r, c = divmod(k, 4)
            active = zi[k] > 0
            assert item.scores["l0"][r, c] == int((zi[k] != 0).sum())
            assert item.scores["l1"][r, c].item() == pytest.approx(float(zi[k].abs().sum()), rel=1e-5)
            assert item.scores["cooccur_l0"][r, c] == int((active & cooccur).sum())
            expected = sum(float(w[f]) for f in (active & ~w.isnan()).nonzero().flatten())
            assert item.scores["cosine"][r, c].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert any(len(set(item.scores["cosine"].reshape(-1).tolist())) > 1 for (item,) in got)  # not all alike


def test_patch_filter_map_masks_images_and_is_cached(patch_setup):
    llava, sae, ds, _ = patch_setup
    args = PatchFilterArguments(score="cosine", keep_fraction=0.25)
    calls = []

    class Counting(PatchFilter):
        def score_rows(self, rows, first_row=0):
            calls.append(first_row)
            return super().score_rows(rows, first_row)

    masked = ds.map(Counting(sae, llava.model, llava.processor, args=args), batched=True, batch_size=4)
    assert masked.column_names == ["images", "prompt", "saev_patch_scores"]
    for row, original in zip(masked, ds):
        grid_values = np.array(row["saev_patch_scores"][0])
        kept = keep_mask(grid_values, 0.25).reshape(-1)
        pixels = np.asarray(row["images"][0])
        source = np.asarray(original["images"][0].convert("RGB"))
        for index in range(16):
            r, c = divmod(index, 4)
            cell, before = pixels[8 * r : 8 * r + 8, 8 * c : 8 * c + 8], source[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
            assert (cell == before).all() if kept[index] else (cell == 0).all()
        assert 4 <= kept.sum() < 16
    assert calls
    calls.clear()
    again = ds.map(Counting(sae, llava.model, llava.processor, args=args), batched=True, batch_size=4)
    assert calls == [] and again["saev_patch_scores"] == masked["saev_patch_scores"]  # served from the cache
    other = ds.map(PatchFilter(sae, llava.model, llava.processor, args=PatchFilterArguments(score="l1")),
                   batched=True, batch_size=4)
    assert other["saev_patch_scores"] != masked["saev_patch_scores"]  # a different score is a different map


def test_random_baseline_does_not_depend_on_batching(patch_setup):
    llava, sae, ds, _ = patch_setup
    args = PatchFilterArguments(score="random", keep_fraction=0.5, seed=3, fill="1,2,3")
    one = PatchFilter(sae, llava.model, llava.processor, args=args).score_rows(ds[:4])
    two = PatchFilter(sae, llava.model, llava.processor, args=args).score_rows(ds[2:4])
    assert [np.asarray(im[0]).tolist() for im in one["images"][2:]] == [np.asarray(im[0]).tolist() for im in two["images"]]
    filled = [(np.asarray(im[0]).reshape(4, 8, 4, 8, 3) == (1, 2, 3)).all(axis=(1, 3, 4)).sum() for im in one["images"]]
    assert filled == [8, 8, 8, 8]
    reseeded = PatchFilter(sae, llava.model, llava.processor,
                           args=PatchFilterArguments(score="random", keep_fraction=0.5, seed=4)).score_rows(ds[:4])
    assert reseeded["saev_patch_scores"] != one["saev_patch_scores"]


def test_patch_filter_errors(patch_setup):
    llava, sae, ds, _ = patch_setup
    with pytest.raises(ValueError, match="score='area' must be one of"):
        PatchFilterArguments(score="area")
    with pytest.raises(ValueError, match="fill='black' must be three integers"):
        PatchFilterArguments(fill="black")
    unweighted = copy.deepcopy(sae)
    unweighted.config.feature_weights_info = None
    with pytest.raises(ValueError, match="cross-modal feature weights"):
        PatchFilter(unweighted, llava.model, llava.processor, args=PatchFilterArguments(score="cosine"))
    PatchFilter(unweighted, llava.model, llava.processor, args=PatchFilterArguments(score="l0"))  # needs no weights
    with pytest.raises(KeyError, match=r"Column 'images' not found; the data has columns \['prompt'\]. Pass image_column="):
        PatchFilter(sae, llava.model, llava.processor).score_rows({"prompt": ["what digit is this ?"]})
    broken = datasets.Dataset.from_dict({"images": [[{"bytes": b"not an image", "path": None}]],
                                         "prompt": ["what digit is this ?"]})
    with pytest.raises(RowError, match="Row 0"):
        PatchFilter(sae, llava.model, llava.processor).score_rows(broken[:])
    nulls = PatchFilter(sae, llava.model, llava.processor, args=PatchFilterArguments(on_error="null"))(broken[:])
    assert nulls["images"] == [None] and "Row 0" in nulls["saev_error"][0]


def test_patches_command_end_to_end(patch_setup, tmp_path, capsys):
    from saev_hf.cli import main

    llava, sae, ds, _ = patch_setup
    sae.save_pretrained(tmp_path / "sae")
    ds.save_to_disk(tmp_path / "data")
    out = tmp_path / "masked"
    assert main(["patches", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(llava.path),
                 "--dataset_name", str(tmp_path / "data"), "--output_dir", str(out), "--score", "l1",
                 "--keep_fraction", "0.75", "--device", "cpu"]) == 0
    assert "kept the top 75% of patches by l1" in capsys.readouterr().out
    masked = datasets.load_from_disk(str(out))
    direct = PatchFilter(sae, llava.model, llava.processor,
                         args=PatchFilterArguments(score="l1", keep_fraction=0.75)).score_rows(ds[:])
    assert len(masked) == len(ds)
    for row, image in zip(masked, direct["images"]):
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(image[0]))
    with Image.open(out / "preview.png") as preview:
        assert preview.size[0] > 400 and preview.size[1] > 200
    with pytest.raises(SystemExit):
        main(["patches", "--sae_name_or_path", "x", "--model_name_or_path", "y", "--dataset_name", "z",
              "--output_dir", str(out), "--score", "area"])
    assert "score='area' must be one of" in capsys.readouterr().err


def test_patch_filter_on_every_architecture(tiny_mllm):
    """Score and mask with each tiny MLLM, on a wide image: the returned grid is the layout's, and exactly the cells
    below the threshold are filled."""
    from saev_hf import SAEV, SAEVConfig
    from saev_hf.activations.reader import text_config

    torch.manual_seed(0)
    hidden = text_config(tiny_mllm.model).hidden_size
    sae = SAEV(SAEVConfig(d_in=hidden, d_sae=64, hook_layer=1, cooccurrence_threshold=DELTA))
    image = digit_images(1, seed=2)[0][0].resize((48, 32))
    args = PatchFilterArguments(score="l1", keep_fraction=0.5, fill="1,2,3")
    out = PatchFilter(sae, tiny_mllm.model, tiny_mllm.processor, args=args).score_rows(
        {"images": [[image]], "prompt": ["what digit is this ?"]})
    grid = PatchLocator(tiny_mllm.model, tiny_mllm.processor).image_grid((48, 32))
    values = np.array(out["saev_patch_scores"][0][0])
    assert values.shape == grid.shape
    kept = keep_mask(values, 0.5).reshape(-1)
    pixels = np.asarray(out["images"][0][0])
    for index, (left, top, right, bottom) in enumerate(grid.cell_boxes(48, 32)):
        filled = (pixels[top:bottom, left:right] == (1, 2, 3)).all()
        assert filled != kept[index], (tiny_mllm.arch, index)


def test_patch_filter_pickles_to_its_identity_and_restores_as_a_patch_filter(patch_setup, tmp_path):
    import pickle

    from saev_hf.scoring import map_function as scoring

    llava, sae, ds, _ = patch_setup
    sae.save_pretrained(tmp_path / "sae")
    args = PatchFilterArguments(score="l1", keep_fraction=0.5)
    patch_filter = PatchFilter(str(tmp_path / "sae"), str(llava.path), args=args)
    payload = pickle.dumps(patch_filter)
    assert len(payload) < 20_000  # digests, not weights
    scoring._LIVE.clear()  # as in a fresh worker process: rebuilt from the paths
    restored = pickle.loads(payload)
    assert type(restored) is PatchFilter and restored.fingerprint == patch_filter.fingerprint
    assert restored.fingerprint != PatchFilter(str(tmp_path / "sae"), str(llava.path), args=PatchFilterArguments(
        score="l0", keep_fraction=0.5)).fingerprint
    out = restored.score_rows(ds[:2])
    assert out["saev_patch_scores"] == patch_filter.score_rows(ds[:2])["saev_patch_scores"]


def test_patch_filter_null_mode_survives_a_bad_row_in_a_later_batch(patch_setup):
    import io

    llava, sae, ds, _ = patch_setup
    rows = ds[:] | {"images": []}
    for images in ds[:]["images"]:
        buffer = io.BytesIO()
        images[0].save(buffer, format="PNG")
        rows["images"].append([{"bytes": buffer.getvalue(), "path": None}])
    rows["images"][4] = [{"bytes": rows["images"][4][0]["bytes"][:40], "path": None}]
    features = datasets.Features({"images": datasets.Sequence(datasets.Image(decode=False)),
                                  "prompt": datasets.Value("string")})
    broken = datasets.Dataset.from_dict(rows, features=features)
    patch_filter = PatchFilter(sae, llava.model, llava.processor, args=PatchFilterArguments(on_error="null"))
    out = broken.map(patch_filter, batched=True, batch_size=2, with_indices=True)
    assert out["saev_error"][4].startswith("Row 4: the image could not be read")
    assert out["saev_patch_scores"][4] is None and out["images"][4] is None
    assert [out["saev_error"][i] for i in (0, 1, 2, 3, 5)] == [None] * 5
    assert all(out["saev_patch_scores"][i] for i in (0, 1, 2, 3, 5))
