"""Inputs are read as given or refused with the row named, never silently changed (issue 13, item 5)."""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from saev_hf.activations import LayerReader
from saev_hf.data import load_dataset_split
from saev_hf.data import RowError, load_image, to_rgb
from saev_hf.data.prompts import build_messages
from saev_hf.testing.digit_data import digit_images


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped():
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    image = load_image(png(Image.fromarray(ramp)), row=0)
    assert Image.open(io.BytesIO(png(Image.fromarray(ramp)))).mode == "I;16"
    got = np.asarray(image)
    assert image.mode == "RGB" and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert len(np.unique(got)) == 256  # the whole range, not {0, 255}


def test_32_bit_and_float_images_are_scaled_or_refused_with_the_row():
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 65535, dtype=np.int32))))[0, 0, 0] == 255
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))))[0, 0, 0] == 128
    with pytest.raises(RowError, match=r"Row 4: the image could not be read \(ValueError: a float image \(mode F\) "
                                       r"with values in \[0, 3\]"):
        load_image(Image.fromarray(np.array([[0, 3]], dtype=np.float32)), row=4)
    with pytest.raises(RowError, match=r"Row 2: .*32-bit integer image \(mode I\) with values in \[-1, 0\]"):
        load_image(Image.fromarray(np.array([[-1, 0]], dtype=np.int32)), row=2)


def test_every_8_bit_pil_mode_becomes_the_same_rgb_as_pil_gives():
    base = digit_images(1)[0][0]
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "HSV"):
        image = base.convert(mode)
        assert np.array_equal(np.asarray(load_image(image, 0)), np.asarray(image.convert("RGB"))), mode


def test_a_message_part_without_type_keeps_its_text():
    prompt = [{"role": "user", "content": [{"text": "what digit is this?"}]}]
    messages = build_messages(prompt, None, num_images=1, row=3)
    assert messages == [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "what digit is this?"}]}]


def test_the_text_of_an_untyped_part_reaches_the_model(tiny_model_factory):
    llava = tiny_model_factory("llava")
    reader = LayerReader(llava.model, llava.processor, layer=1)
    image = digit_images(1)[0][0]
    typed = reader.prepare({"images": [[image]], "prompt": [[{"role": "user", "content": [
        {"type": "text", "text": "what digit is this?"}]}]]})
    untyped = reader.prepare({"images": [[image]], "prompt": [[{"role": "user", "content": [
        {"text": "what digit is this?"}]}]]})
    assert torch.equal(typed["input_ids"], untyped["input_ids"])


@pytest.mark.parametrize("prompt,message", [
    ([{"role": "user", "content": [{"value": "hi"}]}], r"Row 7: a message part \{'value': 'hi'\} has no 'type' and no "
                                                       r"'text'"),
    ([{"role": "user"}], r"Row 7: the 'user' message \{'role': 'user'\} has no 'content'"),
    ([{"role": "user", "content": 5}], r"Row 7: a message's content must be text or a list of parts .* got int \(5\)"),
])
def test_malformed_messages_are_row_errors(prompt, message):
    with pytest.raises(RowError, match=message):
        build_messages(prompt, None, num_images=1, row=7)


def test_a_split_asked_of_a_single_dataset_folder_is_refused_not_ignored(tmp_path):
    datasets.Dataset.from_dict({"x": [1, 2, 3]}).save_to_disk(tmp_path / "plain")
    assert len(load_dataset_split(str(tmp_path / "plain"))) == 3  # the default reads it whole
    with pytest.raises(ValueError, match=r"holds a single Dataset \(no split name, 3 rows\), not a DatasetDict, so "
                                         r"split 'test' cannot be chosen from it"):
        load_dataset_split(str(tmp_path / "plain"), split="test")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2, 3]}),
                          "test": datasets.Dataset.from_dict({"x": [4]})}).save_to_disk(tmp_path / "dict")
    assert load_dataset_split(str(tmp_path / "dict"), split="test")["x"] == [4]


def test_score_command_refuses_a_split_of_a_single_dataset_folder(tiny_model_factory, tmp_path):
    from saev_hf.cli import main

    llava = tiny_model_factory("llava")
    datasets.Dataset.from_dict({"images": [[digit_images(1)[0][0]]], "prompt": ["hi"]}).save_to_disk(tmp_path / "d")
    from saev_hf import SAEV, SAEVConfig

    SAEV(SAEVConfig(d_in=64, d_sae=32, hook_layer=1)).save_pretrained(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"split 'test' cannot be chosen"):
        main(["score", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(llava.path),
              "--dataset_name", str(tmp_path / "d"), "--dataset_split", "test", "--output_dir", str(tmp_path / "o"),
              "--scores", "l0"])


def _transparent_images():
    """A red logo on a transparent background in every mode that carries transparency."""
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((220, 30, 30, 255), (4, 4, 12, 12))
    rgba.paste((30, 30, 220, 128), (0, 0, 4, 4))  # half transparent
    la = rgba.convert("LA")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 220, 30, 30] + [0] * 762)
    palette.paste(1, (4, 4, 12, 12))
    palette.info["transparency"] = 0  # palette index 0 is transparent
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, format="PNG", transparency=(10, 200, 10))
    trns = Image.open(io.BytesIO(buffer.getvalue()))  # an RGB PNG whose tRNS chunk makes one colour transparent
    return {"RGBA": rgba, "LA": la, "PA": rgba.convert("PA"), "P+transparency": palette, "RGB+tRNS": trns}


@pytest.mark.parametrize("name", ["RGBA", "LA", "PA", "P+transparency", "RGB+tRNS"])
def test_transparent_images_are_composited_onto_white_as_transformers_does(name):
    from transformers.image_transforms import convert_to_rgb

    image = _transparent_images()[name]
    ours = np.asarray(to_rgb(image))
    assert ours.shape == (16, 16, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(convert_to_rgb(image, return_numpy=True)))
    if name != "P+transparency":
        assert (ours[15, 15] == 255).all()  # a fully transparent corner is white, not black
    assert (np.asarray(load_image(image, 0)) == ours).all()  # the one path every reader takes


def test_the_processor_sees_the_same_pixels_from_a_transparent_image_as_from_the_library():
    from saev_hf.testing.tiny_models import build_tiny_model

    _, processor = build_tiny_model("llava")
    image = _transparent_images()["RGBA"]
    direct = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    through_library = processor.image_processor(load_image(image, 0), return_tensors="pt")["pixel_values"]
    assert processor.image_processor.do_convert_rgb
    assert torch.equal(direct, through_library)
    assert direct.mean() > 0.5  # white background after normalisation, where dropping alpha gives black (< 0)


def test_a_template_that_writes_the_bos_gets_one_bos_and_one_that_does_not_gets_the_tokenizers():
    """As transformers' processors: a text that already opens with <s> is tokenized without adding special tokens."""
    from saev_hf.testing.tiny_models import build_tiny_model
    from saev_hf.data import PromptFormat
    from saev_hf.data.prompts import prepare_inputs

    _, processor = build_tiny_model("llava", seed=0)
    bos = processor.tokenizer.bos_token_id
    image, _ = digit_images(1)[0]
    rows = [{"images": [image], "prompt": "what digit is this ?"}]
    fmt = PromptFormat(image_column="images")
    assert processor.chat_template.startswith("{{- bos_token -}}")
    with_template_bos = prepare_inputs(processor, rows, fmt)["input_ids"][0].tolist()
    processor.chat_template = processor.chat_template.replace("{{- bos_token -}}", "")
    with_tokenizer_bos = prepare_inputs(processor, rows, fmt)["input_ids"][0].tolist()
    assert with_template_bos == with_tokenizer_bos  # the same tokens either way
    assert with_template_bos[0] == bos and with_template_bos.count(bos) == 1  # never two

    token = processor.image_token
    mixed = [{"images": [image], "prompt": f"<s><|user|>{token}a<|end|><|assistant|>"},
             {"images": [image], "prompt": f"<|user|>{token}a<|end|><|assistant|>"}]
    with pytest.raises(RowError, match="Row 8's prompt does not open with the BOS token '<s>' and row 7's does"):
        prepare_inputs(processor, mixed, fmt, first_row=7)
