"""The baselines beside SAE-V (`saev_hf.scoring.baselines`): each against a hand computation on tiny models, sharing
SAE-V's forward without changing SAE-V's scores, cached and refused like SAE-V's, from Python and `saev score`."""

import datasets
import pytest
import torch
import torch.nn.functional as F
from test_scoring import make_rows, weighted_setup

from saev_hf.cli import main
from saev_hf.data import PromptFormat, RowError
from saev_hf.demo.grounded_llava import _image_features
from saev_hf.scoring import SAEVScorer, ScorerArguments
from saev_hf.scoring.baselines import BASELINES
from saev_hf.testing.tiny_models import build_tiny_clip

ALL = ["cosine", "l0", "cooccur_l0", *BASELINES]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("baselines")
    sae, ds, _ = weighted_setup(llava, root, make_rows(8))
    clip_model, clip_processor = build_tiny_clip(seed=1, max_text_tokens=8)
    clip_model.save_pretrained(root / "clip")
    clip_processor.save_pretrained(root / "clip")
    return llava, sae, ds, root, clip_model, clip_processor


def scorer(setup, scores, sae=True, **kwargs):
    llava, saev, _, root, clip_model, clip_processor = setup
    args = ScorerArguments(scores=scores, clip_model_name_or_path=str(root / "clip"), **kwargs)
    return SAEVScorer(saev if sae else None, llava.model, llava.processor, args=args, clip_model=clip_model,
                      clip_processor=clip_processor)


def template(processor, messages, generation):
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def user(prompt, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def response_log_probs(model, processor, messages, images):
    """The log-probability of each token after the prompt (rendered alone with the generation prompt), one row, no
    padding: computed here from the processed lengths of the two texts."""
    # the template writes <s> itself: the processor must not add another
    whole = processor(text=[template(processor, messages, False)], images=images, return_tensors="pt",
                      add_special_tokens=False)
    start = processor(text=[template(processor, messages[:-1], True)], images=images, return_tensors="pt",
                      add_special_tokens=False)["input_ids"].shape[1]
    logits = model(**whole, use_cache=False).logits[0].float()
    ids = whole["input_ids"][0]
    return torch.log_softmax(logits[start - 1 : -1], -1).gather(1, ids[start:, None])[:, 0]


@torch.no_grad()
def test_every_baseline_matches_a_hand_computation(setup):
    llava, _, ds, _, clip_model, clip_processor = setup
    model, processor = llava.model, llava.processor
    scores = scorer(setup, list(BASELINES)).score_rows(ds[:4])
    for i in range(4):
        row = ds[i]
        messages = [user(row["prompt"]), assistant(row["chosen"])]
        conditional = response_log_probs(model, processor, messages, [row["images"]])
        assert scores["answer_log_likelihood"][i] == pytest.approx(float(conditional.sum()), abs=1e-4)
        alone = response_log_probs(model, processor, [user("", images=0), assistant(row["chosen"])], None)
        ifd = float(conditional.mean()) / float(alone.mean())  # mean losses: -mean log-probabilities, sign cancels
        assert scores["ifd"][i] == pytest.approx(ifd, rel=1e-4)

        prompt_ids = processor(text=[template(processor, messages[:1], True)], images=[row["images"]],
                               return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        assert scores["length"][i] == int((prompt_ids != model.config.image_token_id).sum())

        text = clip_processor.tokenizer([row["prompt"]], return_tensors="pt")["input_ids"][:, :8]  # cut at 8 tokens
        pixels = clip_processor.image_processor(row["images"], return_tensors="pt")["pixel_values"]
        out = clip_model(input_ids=text, pixel_values=pixels)
        cosine = float(out.logits_per_image[0, 0] / clip_model.logit_scale.exp())
        assert scores["clip_score"][i] == pytest.approx(cosine, abs=1e-5)
        # the model's own image-text similarity: each prompt word's best cosine over the projected image features
        image = F.normalize(_image_features(model, processor, row["images"])[0].float(), dim=-1)
        ids = processor.tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        words = F.normalize(model.get_input_embeddings()(ids).float(), dim=-1)
        similarity = float((words @ image.T).max(dim=1).values.mean())
        assert scores["image_text_similarity"][i] == pytest.approx(similarity, abs=1e-5)


def test_the_prompt_text_is_cut_to_the_clip_models_longest_text(setup):
    long_prompt = "what digit is this " * 20
    rows = {**setup[2][:2], "prompt": [long_prompt, long_prompt + "and more words after the cut"]}
    clip = scorer(setup, ["clip_score"], sae=False).score_rows(rows)["clip_score"]
    assert clip[0] == pytest.approx(clip[1], abs=1e-6) or setup[2][0]["images"] != setup[2][1]["images"]
    same_image = {**rows, "images": [rows["images"][0]] * 2}
    clip = scorer(setup, ["clip_score"], sae=False).score_rows(same_image)["clip_score"]
    assert clip[0] == pytest.approx(clip[1], abs=1e-6)  # everything after the cut is not read


def test_baselines_share_the_forward_and_leave_saev_scores_unchanged(setup):
    _, _, ds, _, _, _ = setup
    alone = scorer(setup, ["cosine", "l0", "cooccur_l0"]).score_rows(ds[:6])
    together = scorer(setup, ALL).score_rows(ds[:6])
    for name in alone:
        assert together[name] == pytest.approx(alone[name], abs=1e-6)
    # and with a max_length that cuts the text (SAE-V reads the prompt as cut; the response scores read it whole)
    cut = PromptFormat(max_length=20)
    llava, sae = setup[0], setup[1]
    alone = SAEVScorer(sae, llava.model, llava.processor, prompt_format=cut,
                       args=ScorerArguments(scores=["l0", "cooccur_l0"])).score_rows(ds[:6])
    together = SAEVScorer(sae, llava.model, llava.processor, prompt_format=cut,
                          args=ScorerArguments(scores=["l0", "cooccur_l0", "answer_log_likelihood"])).score_rows(ds[:6])
    assert together["saev_l0"] == pytest.approx(alone["saev_l0"], abs=1e-6)
    assert together["saev_cooccur_l0"] == alone["saev_cooccur_l0"]


def test_one_forward_of_the_mllm_serves_saev_and_the_model_based_baselines(setup, monkeypatch):
    llava, _, ds, _, _, _ = setup
    calls = []
    original = type(llava.model).forward
    monkeypatch.setattr(type(llava.model), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    scorer(setup, ["cosine", "l0", "cooccur_l0", "length", "answer_log_likelihood", "image_text_similarity"]
           ).score_rows(ds[:4])
    assert len(calls) == 1  # one forward for the batch, whatever scores are asked
    calls.clear()
    scorer(setup, ["cosine", "ifd"]).score_rows(ds[:4])
    assert len(calls) == 2  # plus IFD's answer alone


def test_scores_do_not_depend_on_the_batch(setup):
    _, _, ds, _, _, _ = setup
    together = scorer(setup, ALL).score_rows(ds[:6])
    one_by_one = [scorer(setup, ALL).score_rows(ds[i : i + 1], i) for i in range(6)]
    for name, values in together.items():
        assert values == pytest.approx([row[name][0] for row in one_by_one], rel=1e-4, abs=1e-5)


def test_baselines_alone_need_no_saev_and_saev_scores_do(setup):
    llava = setup[0]
    with pytest.raises(ValueError, match="was given no SAE-V, but the scores it computes need one"):
        SAEVScorer(None, llava.model, llava.processor, args=ScorerArguments(scores=["l0", "length"]))
    assert list(scorer(setup, ["length", "ifd"], sae=False).score_rows(setup[2][:2])) == ["length", "ifd"]
    with pytest.raises(ValueError, match="clip_score needs a CLIP or SigLIP checkpoint"):
        ScorerArguments(scores=["clip_score"])
    with pytest.raises(ValueError, match="must be a non-empty subset of"):
        ScorerArguments(scores=["perplexity"])


def test_bad_rows_are_named_or_nulled_like_saev_scores(setup):
    _, _, ds, _, _, _ = setup
    rows = ds[:3]
    without_response = {**rows, "chosen": [rows["chosen"][0], None, rows["chosen"][2]]}
    with pytest.raises(RowError, match=r"Row 1 has no response in column 'chosen'"):
        scorer(setup, ["answer_log_likelihood"], sae=False).score_rows(without_response)
    with pytest.raises(KeyError, match="Pass baseline_response_column"):
        scorer(setup, ["ifd"], sae=False).score_rows({k: v for k, v in rows.items() if k != "chosen"})
    nulled = scorer(setup, ["answer_log_likelihood", "length"], sae=False, on_error="null")(
        without_response, [0, 1, 2])
    assert nulled["answer_log_likelihood"][1] is None and nulled["length"][1] is None
    assert "Row 1 has no response" in nulled["saev_error"][1] and nulled["saev_error"][0] is None
    assert nulled["length"][0] is not None


def test_a_map_with_baselines_is_cached_and_a_changed_clip_model_is_not_served_stale(setup, monkeypatch):
    _, _, ds, _, clip_model, _ = setup
    first = ds.map(scorer(setup, ["l0", "clip_score", "length"]), batched=True, batch_size=3)
    calls = []
    original = SAEVScorer._score_batch
    monkeypatch.setattr(SAEVScorer, "_score_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = ds.map(scorer(setup, ["l0", "clip_score", "length"]), batched=True, batch_size=3)
    assert calls == [] and second["clip_score"] == first["clip_score"]
    fingerprint = scorer(setup, ["clip_score"]).fingerprint
    with torch.no_grad():
        clip_model.visual_projection.weight.mul_(-1)
    try:
        assert scorer(setup, ["clip_score"]).fingerprint != fingerprint
        flipped = ds.map(scorer(setup, ["l0", "clip_score", "length"]), batched=True, batch_size=3)
        assert flipped["clip_score"] == pytest.approx([-value for value in first["clip_score"]], abs=1e-5)
    finally:
        with torch.no_grad():
            clip_model.visual_projection.weight.mul_(-1)


def test_saev_score_computes_baselines_from_the_command_line_and_filter_keeps_by_any(setup, tmp_path):
    llava, _, ds, root, _, _ = setup
    common = ["--model_name_or_path", str(llava.path), "--dataset_name", str(root / "data"), "--device", "cpu",
              "--batch_size", "3"]
    assert main(["score", *common, "--scores", "length", "answer_log_likelihood", "ifd", "image_text_similarity",
                 "clip_score", "--clip_model_name_or_path", str(root / "clip"), "--output_dir",
                 str(tmp_path / "scored")]) == 0
    scored = datasets.load_from_disk(str(tmp_path / "scored"))
    assert set(BASELINES) <= set(scored.column_names) and len(scored) == len(ds)
    expected = scorer(setup, list(BASELINES), sae=False).score_rows(ds[:])
    for name in BASELINES:
        assert scored[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5)
    assert main(["filter", "--dataset_name", str(tmp_path / "scored"), "--output_dir", str(tmp_path / "kept"),
                 "--column", "ifd", "--fraction", "0.5"]) == 0
    kept = datasets.load_from_disk(str(tmp_path / "kept"))
    assert sorted(kept["ifd"]) == sorted(scored["ifd"])[4:]
    with pytest.raises(ValueError, match="are baselines alone, which need no SAE-V"):
        main(["score", *common, "--scores", "length", "--sae_name_or_path", str(root / "sae"),
              "--output_dir", str(tmp_path / "other")])
