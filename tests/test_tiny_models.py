"""Tests of `saev_hf.testing.tiny_models`: the offline tiny MLLMs every other test (and ``saev demo``) relies on."""

from __future__ import annotations

import operator

import pytest
import torch
from PIL import Image

from saev_hf.testing.tiny_processing import build_tiny_tokenizer, register_tiny_processors
from saev_hf.testing.tiny_processing import TINY_ARCHITECTURES
from saev_hf.testing.tiny_models import TINY_IMAGE_POSITIONS, TINY_IMAGE_SIZE, build_tiny_model, save_tiny_model
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

# where each architecture keeps its decoder layers (the residual stream an SAE-V reads)
DECODER_LAYERS = {
    "llava": "model.language_model.layers",
    "llava_next": "model.language_model.layers",
    "chameleon": "model.layers",
    "qwen2_vl": "model.language_model.layers",
    "idefics3": "model.text_model.layers",
    "paligemma": "model.language_model.layers",
    "text": "model.layers",
}

# what the chat template writes for one image
IMAGE_PLACEHOLDER = {
    "llava": "<image>",
    "llava_next": "<image>",
    "chameleon": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "paligemma": "<image>",
}


def conversation(answer: str, question: str = "What digit is this?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def image_token_id(model) -> int:
    config = model.config
    if config.model_type == "chameleon":
        return config.vocabulary_map["<image>"]
    return getattr(config, "image_token_id", None) or config.image_token_index


def expected_image_positions(arch: str, config) -> int:
    """Image-feature positions for one 32x32 image, recomputed from the model config (not from the processor)."""
    size = TINY_IMAGE_SIZE
    vision = getattr(config, "vision_config", None)
    if arch == "llava":  # CLIP patches; "default" strategy drops the CLS position
        return (size // vision.patch_size) ** 2
    if arch == "llava_next":  # base grid + one full-resolution tile (32x32 pinpoint) + one newline per tile row
        grid = size // vision.patch_size
        assert [size, size] in config.image_grid_pinpoints
        return grid * grid + grid * grid + grid
    if arch == "chameleon":  # one VQ code per 2 ** (number of downsamplings) pixels
        downsampling = 2 ** (len(config.vq_config.channel_multiplier) - 1)
        return (size // downsampling) ** 2
    if arch == "qwen2_vl":  # patches merged spatial_merge_size x spatial_merge_size
        return (size // vision.patch_size) ** 2 // vision.spatial_merge_size**2
    if arch == "idefics3":  # 2x2 tiles of the image upscaled to 64x64, plus the global image
        return 5 * (size // vision.patch_size) ** 2 // config.scale_factor**2
    if arch == "paligemma":  # SigLIP patches
        return (size // vision.patch_size) ** 2
    raise AssertionError(arch)


@pytest.fixture(scope="module")
def digits():
    return digit_images(4, seed=0)


def mllm_inputs(processor, digits, n: int = 1):
    """Processor outputs for ``n`` chats with one digit each (different lengths, so a batch needs padding)."""
    texts = [
        processor.apply_chat_template(conversation(f"a handwritten digit {DIGIT_NAMES[label]}" + " ." * i))
        for i, (_, label) in enumerate(digits[:n])
    ]
    images = [image for image, _ in digits[:n]]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Every multimodal architecture
# ---------------------------------------------------------------------------------------------------------------------
def test_forward_returns_every_layer(tiny_mllm, digits):
    inputs = mllm_inputs(tiny_mllm.processor, digits)
    out = forward(tiny_mllm.model, inputs)
    text_config = tiny_mllm.model.config.get_text_config()
    seq_len = inputs["input_ids"].shape[1]
    assert text_config.num_hidden_layers == 4
    assert len(out.hidden_states) == text_config.num_hidden_layers + 1
    for hidden in out.hidden_states:
        assert hidden.shape == (1, seq_len, text_config.hidden_size)
        assert torch.isfinite(hidden).all()
    assert out.logits.shape == (1, seq_len, len(tiny_mllm.tokenizer))


def test_vocab_matches_tokenizer(tiny_mllm):
    model, tokenizer = tiny_mllm.model, tiny_mllm.tokenizer
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    assert image_token_id(model) == tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    assert tokenizer.image_token in tokenizer.all_special_tokens


def test_image_positions_match_model(tiny_mllm, digits):
    arch = tiny_mllm.arch
    inputs = mllm_inputs(tiny_mllm.processor, digits)
    expected = expected_image_positions(arch, tiny_mllm.model.config)
    assert expected == TINY_IMAGE_POSITIONS[arch] > 1
    n_tokens = int((inputs["input_ids"] == image_token_id(tiny_mllm.model)).sum())
    assert n_tokens == expected

    # count the image-feature vectors the model actually scatters into those positions (fresh model: we patch it)
    model, _ = build_tiny_model(arch)
    original = model.model.get_image_features
    features = []

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        features.append(out.pooler_output)
        return out

    model.model.get_image_features = recording
    forward(model, inputs)  # also raises if image tokens and features disagreed
    (pooled,) = features
    pooled = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    assert sum(p.numel() // p.shape[-1] for p in pooled) == n_tokens


def test_batch_with_padding_matches_single(tiny_mllm, digits):
    single = mllm_inputs(tiny_mllm.processor, digits, n=1)
    batch = mllm_inputs(tiny_mllm.processor, digits, n=2)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and not mask.all(), "the two chats should need padding"
    # each example has its own image's positions
    per_example = (batch["input_ids"] == image_token_id(tiny_mllm.model)).sum(dim=1)
    assert per_example.tolist() == [TINY_IMAGE_POSITIONS[tiny_mllm.arch]] * 2

    out_single = forward(tiny_mllm.model, single)
    out_batch = forward(tiny_mllm.model, batch)
    n = single["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], single["input_ids"][0])  # right padding
    for h_single, h_batch in zip(out_single.hidden_states, out_batch.hidden_states):
        torch.testing.assert_close(h_batch[0, :n], h_single[0], atol=1e-4, rtol=1e-4)


def test_hook_on_decoder_layer_sees_hidden_state(tiny_mllm, digits):
    layers = operator.attrgetter(DECODER_LAYERS[tiny_mllm.arch])(tiny_mllm.model)
    assert len(layers) == 4
    inputs = mllm_inputs(tiny_mllm.processor, digits)
    layer = 1
    seen = []
    handle = layers[layer].register_forward_hook(
        lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        out = forward(tiny_mllm.model, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], out.hidden_states[layer + 1])


def test_save_and_reload_gives_identical_logits(tiny_mllm, digits):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_mllm.path)
    processor = AutoProcessor.from_pretrained(tiny_mllm.path)
    assert type(model) is type(tiny_mllm.model)
    assert type(processor) is type(tiny_mllm.processor)
    assert len(processor.tokenizer) == len(tiny_mllm.tokenizer)
    original = tiny_mllm.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name

    reloaded = mllm_inputs(processor, digits, n=2)
    inputs = mllm_inputs(tiny_mllm.processor, digits, n=2)
    assert reloaded.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(reloaded[key], inputs[key]), key
    model.eval()
    torch.testing.assert_close(forward(model, reloaded).logits, forward(tiny_mllm.model, inputs).logits)


def test_chat_template(tiny_mllm):
    processor, tokenizer = tiny_mllm.processor, tiny_mllm.tokenizer
    chat = [{"role": "system", "content": "be brief"}, *conversation("seven")]
    rendered = processor.apply_chat_template(chat)
    placeholder = IMAGE_PLACEHOLDER[tiny_mllm.arch]
    assert rendered.count(placeholder) == 1
    if tiny_mllm.arch == "paligemma":
        assert rendered.startswith(placeholder)  # PaliGemma's layout: images, then <s>, then the text
        body = rendered.replace(placeholder, "")
    else:  # the template writes the BOS itself, as Llama's and Gemma's do (TRL adds no special tokens)
        assert rendered.startswith(tokenizer.bos_token) and rendered.count(tokenizer.bos_token) == 1
        body = rendered[len(tokenizer.bos_token):]
    assert body.startswith("<|system|>be brief<|end|><|user|>")
    assert "What digit is this?<|end|><|assistant|>seven<|end|>" in body
    assert rendered.endswith("<|end|>")

    prompt = processor.apply_chat_template(chat[:2], add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")
    assert prompt.count("<|assistant|>") == 1

    # role markers and end of turn are single special tokens
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert marker in tokenizer.all_special_tokens
        assert tokenizer.convert_tokens_to_ids(marker) in ids
    assert tokenizer.eos_token == "<|end|>"
    with pytest.raises(Exception, match="Unsupported role"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chameleon_placeholders_become_vq_tokens(tiny_model_factory, digits):
    tiny = tiny_model_factory("chameleon")
    model, tokenizer = tiny.model, tiny.tokenizer
    inputs = mllm_inputs(tiny.processor, digits)
    ids = inputs["input_ids"][0].tolist()
    placeholder = model.config.vocabulary_map["<image>"]
    start = ids.index(tokenizer.convert_tokens_to_ids("<racm3:break>"))
    end = ids.index(tokenizer.convert_tokens_to_ids("<eoss>"))
    assert ids[start + 1 : end] == [placeholder] * TINY_IMAGE_POSITIONS["chameleon"]
    assert ids[-1] == tokenizer.sep_token_id  # Chameleon's processor closes chats with its separator
    # the VQ codes map to IMGIMG tokens, all inside the vocabulary, one per placeholder
    vq_ids = model.get_image_tokens(inputs["pixel_values"])
    assert vq_ids.shape == (1, TINY_IMAGE_POSITIONS["chameleon"])
    image_vocab = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_vocab() if t.startswith("IMGIMG")}
    assert len(image_vocab) == model.config.vq_config.num_embeddings
    assert set(vq_ids.flatten().tolist()) <= image_vocab
    assert max(image_vocab) < model.config.vocab_size


def test_llava_next_tiles_a_wide_image(tiny_model_factory, digits):
    tiny = tiny_model_factory("llava_next")
    wide = Image.new("RGB", (2 * TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), (200, 30, 30))
    text = tiny.processor.apply_chat_template(conversation("red"))
    inputs = tiny.processor(images=[wide, digits[0][0]], text=[text, text], padding=True, return_tensors="pt")
    counts = (inputs["input_ids"] == image_token_id(tiny.model)).sum(dim=1).tolist()
    # 16 base + two 4x4 tiles side by side (4x8) + 4 newlines, vs 36 for the square image
    assert counts == [16 + 32 + 4, TINY_IMAGE_POSITIONS["llava_next"]]
    assert inputs["pixel_values"].shape[1] == 3  # base + 2 tiles (the square image is padded to 3)
    out = forward(tiny.model, inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_paligemma_processor_layout(tiny_model_factory, digits):
    tiny = tiny_model_factory("paligemma")
    tokenizer = tiny.tokenizer
    assert "<loc0000>" in tokenizer.get_vocab() and "<seg127>" in tokenizer.get_vocab()
    inputs = mllm_inputs(tiny.processor, digits)
    ids = inputs["input_ids"][0].tolist()
    n = TINY_IMAGE_POSITIONS["paligemma"]
    assert ids[:n] == [image_token_id(tiny.model)] * n
    assert ids[n] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Text-only model
# ---------------------------------------------------------------------------------------------------------------------
def test_text_model_runs_and_reloads(tiny_text_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tiny_text_model.processor
    prompt = tokenizer.apply_chat_template(conversation("seven"), tokenize=False)
    assert prompt == "<s><|user|>What digit is this?<|end|><|assistant|>seven<|end|>"  # images are dropped
    inputs = tokenizer([prompt, "a handwritten digit"], return_tensors="pt", padding=True)
    out = forward(tiny_text_model.model, inputs)
    config = tiny_text_model.model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1 == 5
    assert out.hidden_states[-1].shape == (2, inputs["input_ids"].shape[1], config.hidden_size)
    assert config.vocab_size == len(tokenizer)

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model.path).eval()
    reloaded = AutoTokenizer.from_pretrained(tiny_text_model.path)
    assert reloaded.apply_chat_template(conversation("seven"), tokenize=False) == prompt
    again = reloaded([prompt, "a handwritten digit"], return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(forward(model, again).logits, out.logits)


def test_tokenizer_basics():
    tokenizer = build_tiny_tokenizer("llava")
    ids = tokenizer("What DIGIT is this? Zebra")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", "what", "digit", "is", "this", "?", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # special tokens are never split, and word ids are shared by every architecture
    assert tokenizer("<|user|><image>")["input_ids"][1:] == [
        tokenizer.convert_tokens_to_ids("<|user|>"),
        tokenizer.image_token_id,
    ]
    text_tokenizer = build_tiny_tokenizer("text")
    for word in DIGIT_NAMES:
        assert tokenizer.convert_tokens_to_ids(word) == text_tokenizer.convert_tokens_to_ids(word) != 3
    assert tokenizer.decode(ids) == "<s> what digit is this ? <unk>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "what digit is this ?"


# ---------------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_build_is_deterministic(arch):
    first, _ = build_tiny_model(arch, seed=3)
    second, _ = build_tiny_model(arch, seed=3)
    other, _ = build_tiny_model(arch, seed=4)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not first.training


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("text", seed=0)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("function", ["build_tiny_model", "build_tiny_tokenizer", "save_tiny_model"])
def test_unknown_arch_names_the_valid_ones(function, tmp_path):
    calls = {
        "build_tiny_model": build_tiny_model,
        "build_tiny_tokenizer": build_tiny_tokenizer,
        "save_tiny_model": lambda arch: save_tiny_model(arch, tmp_path / "never"),
    }
    with pytest.raises(ValueError) as error:
        calls[function]("gpt5")
    assert not (tmp_path / "never").exists()
    assert "gpt5" in str(error.value)
    for arch in TINY_ARCHITECTURES:
        assert arch in str(error.value)


FRESH_PROCESS = """
import sys, torch
from saev_hf.testing.tiny_processing import register_tiny_processors
from saev_hf.testing.tiny_models import build_tiny_model
register_tiny_processors()
from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1])
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
built, _ = build_tiny_model("qwen2_vl", seed=0)
same = all(torch.equal(t, built.state_dict()[k]) for k, t in model.state_dict().items())
print(type(processor).__name__, type(model).__name__, same)
"""


def test_save_tiny_model_reloads_in_fresh_process(tmp_path):
    """A saved Qwen2-VL (custom processor class) reloads in a new process after `register_tiny_processors`, and a
    build there with the same seed has the same weights."""
    import subprocess
    import sys

    path = save_tiny_model("qwen2_vl", tmp_path / "qwen")
    assert (path / "config.json").is_file() and (path / "processor_config.json").is_file()
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["TinyQwen2VLProcessor", "Qwen2VLForConditionalGeneration", "True"]
    register_tiny_processors()  # idempotent


UNREGISTERED_PROCESS = """
import sys
from saev_hf.activations import load_model_and_processor
try:
    load_model_and_processor(sys.argv[1])
except ValueError as error:
    print("refused:", error)
from saev_hf.testing.tiny_processing import register_tiny_processors
register_tiny_processors()
model, processor = load_model_and_processor(sys.argv[1])
print(type(processor).__name__)
"""


def test_loading_registers_no_tiny_processor(tmp_path):
    """The library's loader registers nothing: in a fresh process a saved tiny Qwen2-VL folder, whose processor class
    transformers does not know, is refused with a clear error (not silently read with a bare tokenizer) until the demo
    code registers its processors."""
    import subprocess
    import sys

    path = save_tiny_model("qwen2_vl", tmp_path / "qwen")
    result = subprocess.run(
        [sys.executable, "-c", UNREGISTERED_PROCESS, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    refused, loaded = result.stdout.strip().splitlines()[-2:]
    assert refused.startswith("refused:") and "register_tiny_processors()" in refused
    assert loaded == "TinyQwen2VLProcessor"


def test_digit_images():
    pairs = digit_images(6, seed=1)
    assert len(pairs) == 6
    for image, label in pairs:
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB" and image.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        assert isinstance(label, int) and 0 <= label <= 9
        assert len(set(image.getdata())) > 1  # not blank
    again = digit_images(6, seed=1)
    assert [label for _, label in again] == [label for _, label in pairs]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(again, pairs))
    assert [a.tobytes() for a, _ in digit_images(6, seed=2)] != [a.tobytes() for a, _ in pairs]
    assert digit_images(0) == []
    with pytest.raises(ValueError):
        digit_images(10_000)
