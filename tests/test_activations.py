"""Reading layer L of any MLLM: hidden states equal a full forward's, masks are exact, batching changes nothing."""

import io

import pytest
import torch
from torch import nn

from saev_hf import SAEV, SAEVConfig
from saev_hf.activations import LayerReader, Modality, find_decoder_layers
from saev_hf.data import PromptFormat, RowError
from saev_hf.testing.tiny_models import TINY_IMAGE_POSITIONS
from saev_hf.testing.digit_data import digit_images

IMAGES = [image for image, _ in digit_images(4, seed=1)]
PROMPTS = ["what digit is this", "a handwritten digit", "what is the digit in the picture", "describe it"]


def rows(n=3):
    return {"images": [IMAGES[i] for i in range(n)], "prompt": PROMPTS[:n]}


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_captured_states_equal_full_forward_hidden_states(tiny_mllm, layer):
    reader = LayerReader(tiny_mllm.model, tiny_mllm.processor, layer=layer)
    inputs = reader.prepare(rows())
    acts = reader.read_inputs(inputs)
    with torch.no_grad():
        full = tiny_mllm.model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    assert acts.hidden_states.shape == full.shape
    captured = acts.hidden_states
    if layer == len(reader.layers) - 1:
        # transformers reports the last layer after the final norm; the reader keeps the residual stream itself
        owner = next(m for m in tiny_mllm.model.modules() if getattr(m, "layers", None) is reader.layers)
        with torch.no_grad():
            captured = owner.norm(captured)
    torch.testing.assert_close(captured[acts.token_mask], full[acts.token_mask], rtol=0, atol=0)


def test_forward_stops_after_layer_l(tiny_mllm):
    reader = LayerReader(tiny_mllm.model, tiny_mllm.processor, layer=1)
    ran = []
    handles = [layer.register_forward_hook(lambda *a, i=i: ran.append(i)) for i, layer in enumerate(reader.layers)]
    head = tiny_mllm.model.get_output_embeddings().register_forward_hook(lambda *a: ran.append("lm_head"))
    try:
        reader.read(rows(1))
    finally:
        for handle in handles + [head]:
            handle.remove()
    assert ran == [0, 1]


def test_image_mask_counts_exactly_the_image_positions(tiny_mllm):
    reader = LayerReader(tiny_mllm.model, tiny_mllm.processor, layer=1)
    acts = reader.read(rows())
    per_image = TINY_IMAGE_POSITIONS[tiny_mllm.arch]
    assert acts.image_mask.sum(dim=1).tolist() == [per_image] * 3
    inserted = acts.input_ids == reader.image_token_id
    assert torch.equal(acts.image_mask, inserted & acts.token_mask)
    # special/template tokens are their own class, never image, never padding
    bos = tiny_mllm.tokenizer.bos_token_id
    assert (acts.modality[acts.input_ids == bos] == Modality.SPECIAL).all()
    user = tiny_mllm.tokenizer.convert_tokens_to_ids("<|user|>")
    assert (acts.modality[acts.input_ids == user] == Modality.SPECIAL).all()
    assert (acts.text_mask(include_special=False) & (acts.modality == Modality.SPECIAL)).sum() == 0
    assert acts.text_mask(include_special=False).sum(dim=1).min() >= 3  # the prompt's words


def test_padding_is_never_counted(tiny_llava_reader):
    reader = tiny_llava_reader
    acts = reader.read(rows(3))
    lengths = acts.token_mask.sum(dim=1)
    assert lengths.min() < acts.hidden_states.shape[1], "the batch must be padded for this test to mean anything"
    pad = acts.modality == Modality.PAD
    assert torch.equal(pad, ~acts.token_mask)
    assert not (acts.image_mask & pad).any() and not (acts.text_mask() & pad).any()


def test_batch_of_one_and_batch_of_n_give_the_same_states(tiny_mllm):
    reader = LayerReader(tiny_mllm.model, tiny_mllm.processor, layer=2)
    batch = reader.read(rows(3))
    for i in range(3):
        single = reader.read({k: [v[i]] for k, v in rows(3).items()})
        h_batch, m_batch = batch.example(i)
        h_single, m_single = single.example(0)
        assert torch.equal(m_batch, m_single)
        torch.testing.assert_close(h_batch, h_single, rtol=1e-5, atol=1e-5)


def test_padding_side_of_the_processor_does_not_matter(tiny_mllm):
    reader = LayerReader(tiny_mllm.model, tiny_mllm.processor, layer=2)
    tokenizer = tiny_mllm.tokenizer
    original = tokenizer.padding_side
    right = reader.read(rows(3))
    try:
        tokenizer.padding_side = "left"
        left = reader.read(rows(3))
    finally:
        tokenizer.padding_side = original
    assert torch.equal(left.modality, right.modality)
    torch.testing.assert_close(left.hidden_states, right.hidden_states, rtol=0, atol=0)


def test_text_only_model_reads_the_same_way(tiny_text_model):
    reader = LayerReader(tiny_text_model.model, tiny_text_model.processor, layer=1)
    assert reader.image_token_id is None and reader.prompt_format.image_column is None
    inputs = reader.prepare({"prompt": PROMPTS[:2]})
    acts = reader.read_inputs(inputs)
    with torch.no_grad():
        full = tiny_text_model.model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(acts.hidden_states[acts.token_mask], full[acts.token_mask], rtol=0, atol=0)
    assert not acts.image_mask.any()
    single = reader.read({"prompt": PROMPTS[1:2]})
    torch.testing.assert_close(acts.example(1)[0], single.example(0)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llava_reader(tiny_model_factory):
    llava = tiny_model_factory("llava")
    return LayerReader(llava.model, llava.processor, layer=1)


def test_image_values_in_every_form_give_the_same_states(tiny_llava_reader, tmp_path):
    image = IMAGES[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path / "digit.png"
    image.save(path)
    forms = [image, [image], buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, str(path), {"bytes": None, "path": str(path)}]
    reference = tiny_llava_reader.read({"images": [image], "prompt": ["what digit is this"]}).hidden_states
    for form in forms:
        states = tiny_llava_reader.read({"images": [form], "prompt": ["what digit is this"]}).hidden_states
        torch.testing.assert_close(states, reference, rtol=0, atol=0)


def test_datasets_image_column_and_list_of_rows_are_accepted(tiny_llava_reader):
    import datasets

    ds = datasets.Dataset.from_dict({"images": [[IMAGES[0]], [IMAGES[1]]], "prompt": PROMPTS[:2]})
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    from_dataset = tiny_llava_reader.read(ds[:2])
    from_rows = tiny_llava_reader.read([{"images": [IMAGES[0]], "prompt": PROMPTS[0]}, {"images": IMAGES[1], "prompt": PROMPTS[1]}])
    torch.testing.assert_close(from_dataset.hidden_states, from_rows.hidden_states, rtol=0, atol=0)


def test_several_images_per_example(tiny_llava_reader):
    acts = tiny_llava_reader.read({"images": [[IMAGES[0], IMAGES[1]], [IMAGES[2]]], "prompt": PROMPTS[:2]})
    assert acts.image_mask.sum(dim=1).tolist() == [32, 16]


def test_trl_preference_layout_conversational_and_with_response(tiny_llava_reader, tiny_model_factory):
    tokenizer = tiny_model_factory("llava").tokenizer
    conversational = {
        "images": [[IMAGES[0]]],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this"}]}]],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "a handwritten digit zero"}]}]],
        "rejected": [[{"role": "assistant", "content": "nine"}]],
    }
    prompt_only = tiny_llava_reader.read(conversational)
    plain = tiny_llava_reader.read({"images": [IMAGES[0]], "prompt": ["what digit is this"]})
    torch.testing.assert_close(prompt_only.hidden_states, plain.hidden_states, rtol=0, atol=0)

    reader = LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1,
                         prompt_format=PromptFormat(response_column="chosen"))
    with_response = reader.read(conversational)
    text = tokenizer.decode(with_response.input_ids[0])
    assert "zero" in text and "<|assistant|>" in text
    n = prompt_only.token_mask.sum()
    assert with_response.token_mask.sum() > n
    # the response is appended after the prompt: the prompt's positions keep their states
    torch.testing.assert_close(with_response.hidden_states[0, : n - 1], prompt_only.hidden_states[0, : n - 1])

    question_answer = LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1,
                                  prompt_format=PromptFormat(image_column="picture", prompt_column="question",
                                                             response_column="answer"))
    acts = question_answer.read({"picture": [IMAGES[0]], "question": ["what digit is this"], "answer": ["zero"]})
    assert "zero" in tokenizer.decode(acts.input_ids[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error, naming the row where there is one
# ---------------------------------------------------------------------------------------------------------------


def test_layer_out_of_range(tiny_llava_reader):
    with pytest.raises(ValueError, match=r"layer=4 does not exist: LlavaForConditionalGeneration has 4 decoder layers, numbered 0 to 3"):
        LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=4)
    with pytest.raises(ValueError, match=r"layer=-1 does not exist"):
        LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=-1)


def test_model_whose_decoder_layers_cannot_be_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SAEVConfig(d_in=8, d_sae=8)  # any config; num_hidden_layers is missing
            self.blocks_a = nn.ModuleList([nn.Linear(2, 2)])
            self.blocks_b = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"tried \['model.language_model.layers', .*Pass `layers=`"):
        find_decoder_layers(Odd())
    assert find_decoder_layers(Odd(), layers="blocks_b") is not None


def test_layers_can_be_passed_by_path(tiny_llava_reader):
    reader = LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1, layers="model.language_model.layers")
    assert reader.layers is tiny_llava_reader.layers
    with pytest.raises(ValueError, match=r"tried \['model.vision_tower'\]"):
        LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1, layers="model.vision_tower")


def test_row_without_an_image(tiny_llava_reader):
    with pytest.raises(RowError, match=r"Row 11 has no image in column 'images'"):
        tiny_llava_reader.read({"images": [IMAGES[0], []], "prompt": PROMPTS[:2]}, first_row=10)
    with pytest.raises(RowError, match=r"Row 0 has no image"):
        tiny_llava_reader.read({"images": [None], "prompt": PROMPTS[:1]})


def test_unreadable_image(tiny_llava_reader, tmp_path):
    with pytest.raises(RowError, match=r"Row 1: the image could not be read \(UnidentifiedImageError"):
        tiny_llava_reader.read({"images": [IMAGES[0], b"not an image"], "prompt": PROMPTS[:2]})
    with pytest.raises(RowError, match=r"Row 0: the image could not be read \(FileNotFoundError"):
        tiny_llava_reader.read({"images": [str(tmp_path / "missing.png")], "prompt": PROMPTS[:1]})


def test_missing_column_names_the_columns_and_the_option(tiny_llava_reader):
    with pytest.raises(KeyError, match=r"Column 'images' not found; the data has columns \['image', 'prompt'\]. Pass image_column="):
        tiny_llava_reader.read({"image": [IMAGES[0]], "prompt": PROMPTS[:1]})


def test_truncation_that_would_cut_image_tokens(tiny_llava_reader):
    reader = LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1,
                         prompt_format=PromptFormat(max_length=10))
    with pytest.raises(RowError, match=r"Row 0: max_length=10 would cut its image tokens \(they run to position 17"):
        reader.read(rows(1))
    # a limit that only cuts text keeps every image token and cuts the end
    full = tiny_llava_reader.read(rows(1))
    kept = LayerReader(tiny_llava_reader.model, tiny_llava_reader.processor, layer=1,
                       prompt_format=PromptFormat(max_length=20)).read(rows(1))
    assert kept.hidden_states.shape[1] == 20 and kept.image_mask.sum() == 16
    # a causal model: the first 20 positions are the same computation; only the matmul shapes differ, which lets
    # the BLAS kernels round differently (measured 1.5e-8), so equal to float32 precision, not bit for bit
    torch.testing.assert_close(kept.hidden_states, full.hidden_states[:, :20], rtol=1e-5, atol=1e-6)


def test_model_hidden_size_that_does_not_match_the_sae(tiny_llava_reader):
    with pytest.raises(ValueError, match=r"The SAE-V reads d_in=32 but LlavaForConditionalGeneration has hidden size 64"):
        tiny_llava_reader.check_sae(SAEV(SAEVConfig(d_in=32, d_sae=64, hook_layer=1)))
    with pytest.raises(ValueError, match=r"trained on layer 3 but this reader reads layer 1"):
        tiny_llava_reader.check_sae(SAEV(SAEVConfig(d_in=64, d_sae=64, hook_layer=3)))
    tiny_llava_reader.check_sae(SAEV(SAEVConfig(d_in=64, d_sae=64, hook_layer=1)))


def test_plain_prompt_that_already_holds_the_image_token_is_used_as_is(tiny_llava_reader, tiny_model_factory):
    tokenizer = tiny_model_factory("llava").tokenizer
    formatted = "<|user|><image>what digit is this<|end|><|assistant|>"
    acts = tiny_llava_reader.read({"images": [IMAGES[0]], "prompt": [formatted]})
    assert acts.image_mask.sum() == 16
    assert tokenizer.decode(acts.input_ids[0][acts.token_mask[0]]).count("<|user|>") == 1
