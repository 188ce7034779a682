"""Feature labels that are scored: detection metrics against hand computations, held-out rows that never meet the
explanation rows, evidence that marks exactly the tokens and patches where a feature fires, the OpenAI-compatible
client against a server on 127.0.0.1, the local transformers explainer, `saev label`, labels.json and the errors."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
import torch
from PIL import Image

from saev_hf.activations import LayerReader, Modality
from saev_hf.cli import main
from saev_hf.interpret.labels import (
    DETECTION_KEYS,
    IMAGE_PLACEHOLDER,
    DetectionExamples,
    EvidenceExample,
    ExplainerArguments,
    FeatureEvidence,
    FeatureLabel,
    LabelArguments,
    OpenAIChatExplainer,
    TransformersExplainer,
    clean_label,
    collect_examples,
    detection_metrics,
    example_text,
    explanation_parts,
    label_features,
    parse_yes,
    read_labels,
    score_label,
    split_rows,
    write_labels,
)
from saev_hf.interpret.rows import RowRevisitor
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.testing.tiny_saes import data_driven_sae

NUM_ROWS = 24
D_SAE = 32
FEATURES = [1, 4, 10, 12, 13]  # with half-row biases: text only, image only, both, both, image only
SILENT = 2  # a feature that fires on no row


# --- fixtures: a tiny LLaVA, digit rows, an SAE-V whose features fire on half of the rows -----------------------------


@pytest.fixture(scope="module")
def labelled(tiny_model_factory):
    """`(tiny llava, dataset, reader, sae, brute)`: the SAE-V's features fire on 12 of the 24 rows each (a bias
    halfway between the 12th and 13th largest row maxima), except those whose rows tie; `brute[row]` holds every
    token's activations `z` (tokens, d_sae), the row's `modality` and its maxima, all read at once."""
    tiny = tiny_model_factory("llava")
    data = digit_images(NUM_ROWS, seed=5)
    ds = datasets.Dataset.from_dict({
        "images": [[image] for image, _ in data],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(data)],
    })
    reader = LayerReader(tiny.model, tiny.processor, layer=1)
    sae = data_driven_sae(reader, ds, d_sae=D_SAE)
    acts = reader.read(ds[:])
    with torch.no_grad():
        examples = [acts.example(i) for i in range(len(acts))]
        row_max = torch.stack([(sae.pre_activations(h) - sae.b_enc).max(0).values for h, _ in examples])
        ordered = row_max.sort(0, descending=True).values
        sae.b_enc.copy_(-(ordered[NUM_ROWS // 2 - 1] + ordered[NUM_ROWS // 2]) / 2)
        brute = [{"z": sae.encode(h), "modality": m} for h, m in examples]
    for record in brute:
        record["max"] = record["z"].max(0).values
    return tiny, ds, reader, sae, brute


def row_maxima(brute, feature):
    return [float(record["max"][feature]) for record in brute]


# --- detection metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("predictions, expected", [
    ([1, 1, 1, 1, 0, 0, 0, 0], dict(accuracy=1.0, precision=1.0, recall=1.0, f1=1.0)),  # a perfect judge
    ([1] * 8, dict(accuracy=0.5, precision=0.5, recall=1.0, f1=2 / 3)),  # always yes
    ([0] * 8, dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0)),  # always no (delphi: 0 with no positive)
    ([0, 0, 0, 0, 1, 1, 1, 1], dict(accuracy=0.0, precision=0.0, recall=0.0, f1=0.0)),  # always wrong
    ([1, 1, 1, 0, 1, 0, 0, 0], dict(accuracy=0.75, precision=0.75, recall=0.75, f1=0.75)),
    ([1, 1, 0, 0, 1, 0, 0, 0], dict(accuracy=(0.5 + 0.75) / 2, precision=2 / 3, recall=0.5, f1=4 / 7)),
])
def test_detection_metrics_match_a_hand_computation(predictions, expected):
    activating = [True] * 4 + [False] * 4
    metrics = detection_metrics([bool(p) for p in predictions], activating)
    assert list(metrics) == list(DETECTION_KEYS)
    assert metrics["num_activating"] == 4 and metrics["num_non_activating"] == 4
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_accuracy_is_balanced_when_the_counts_differ_as_delphi_computes_it():
    # 3 activating (2 found), 1 non-activating (rejected): plain accuracy 3/4, balanced (2/3 + 1) / 2
    metrics = detection_metrics([True, True, False, False], [True, True, True, False])
    assert metrics["accuracy"] == pytest.approx(5 / 6) and metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 predictions for 4 examples"):
        detection_metrics([True] * 3, [True] * 4)


class ScriptedJudge:
    """Says yes to the rows in `yes`; records what it saw."""

    def __init__(self, yes):
        self.yes, self.seen = set(yes), []

    def judge(self, label, example):
        self.seen.append((label, example))
        return example.row in self.yes


def unmarked(row, activation):
    return EvidenceExample(row, activation, f"row {row}", [], marked=False)


@pytest.mark.parametrize("yes, expected", [
    ({0, 1, 2, 3}, dict(accuracy=1.0, precision=1.0, recall=1.0, f1=1.0)),
    (set(range(20)), dict(accuracy=0.5, precision=0.5, recall=1.0, f1=2 / 3)),
    (set(), dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0)),
    ({0, 1, 10}, dict(accuracy=0.625, precision=2 / 3, recall=0.5, f1=4 / 7)),
])
def test_a_scripted_judge_gets_the_score_computed_by_hand(yes, expected):
    examples = DetectionExamples([unmarked(r, 1.0) for r in range(4)], [unmarked(r, 0.0) for r in range(10, 14)])
    judge = ScriptedJudge(yes)
    score = score_label(judge, "the digit three", examples, seed=3)
    for key, value in expected.items():
        assert score[key] == pytest.approx(value), key
    assert (score["num_activating"], score["num_non_activating"]) == (4, 4)
    assert sorted(e.row for _, e in judge.seen) == [0, 1, 2, 3, 10, 11, 12, 13]  # each example judged once
    assert {label for label, _ in judge.seen} == {"the digit three"}
    assert score_label(judge, "x", DetectionExamples([], [unmarked(10, 0.0)])) is None  # nothing activates: no score


# --- which rows explain and which score -----------------------------------------------------------------------------


def test_the_row_split_is_seeded_disjoint_and_complete():
    explanation, held_out = split_rows(24, 0.5, seed=0)
    assert len(explanation) == 12 and not set(explanation) & set(held_out)
    assert sorted(explanation + held_out) == list(range(24))
    assert split_rows(24, 0.5, seed=0) == (explanation, held_out)
    assert split_rows(24, 0.5, seed=1) != (explanation, held_out)
    assert [len(part) for part in split_rows(3, 0.99, seed=0)] == [2, 1]  # both parts keep a row


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_examples_never_overlap_the_explanation_rows(labelled, seed):
    _, ds, reader, sae, brute = labelled
    args = LabelArguments(num_rows=None, top_n=3, num_detection=4, seed=seed, batch_size=5)
    collected = collect_examples(sae, reader, ds, FEATURES + [SILENT], args)
    explanation, held_out = split_rows(NUM_ROWS, args.explanation_fraction, seed)
    for f in FEATURES:
        maxima = row_maxima(brute, f)
        found = collected[f]
        shown = [e.row for e in found.evidence.examples]
        activating = [e.row for e in found.detection.activating]
        silent = [e.row for e in found.detection.non_activating]
        assert set(shown) <= set(explanation) and set(activating + silent) <= set(held_out)
        expected_top = sorted((r for r in explanation if maxima[r] > 0), key=lambda r: (-maxima[r], r))[:3]
        assert shown == expected_top
        assert activating == sorted((r for r in held_out if maxima[r] > 0), key=lambda r: (-maxima[r], r))[:4]
        assert all(maxima[r] == 0 for r in silent) and len(silent) == len(activating) == 4
        assert all(e.marked for e in found.evidence.examples)
        assert not any(e.marked for e in found.detection.activating + found.detection.non_activating)
        for e in found.evidence.examples + found.detection.activating:
            assert e.activation == pytest.approx(maxima[e.row], abs=1e-5)
    assert collected[SILENT].evidence.examples == [] and collected[SILENT].detection.activating == []
    again = collect_examples(sae, reader, ds, FEATURES, args)  # seeded: the same examples
    assert [e.row for e in again[4].detection.non_activating] == [e.row for e in collected[4].detection.non_activating]


# --- evidence: marked tokens and patches ----------------------------------------------------------------------------


def marked_cores(text):
    return re.findall(r"<<(.*?)>>", text)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_evidence_marks_exactly_the_tokens_where_the_feature_fires(labelled, fraction):
    tiny, ds, reader, sae, brute = labelled
    args = LabelArguments(num_rows=None, top_n=4, num_detection=3, mark_fraction=fraction, batch_size=6)
    collected = collect_examples(sae, reader, ds, FEATURES, args)
    revisitor = RowRevisitor(reader, ds, 8)
    views = {row: view for row, _, _, view in revisitor.revisit(list(range(NUM_ROWS)), "views")}
    marks = 0
    for f in FEATURES:
        for example in collected[f].evidence.examples:
            z, modality, tokens = brute[example.row]["z"][:, f], brute[example.row]["modality"], \
                views[example.row].tokens
            threshold = fraction * float(z.max())
            expected = [token for token, value, m in zip(tokens, z.tolist(), modality.tolist())
                        if m != Modality.IMAGE and value > 0 and value >= threshold]
            assert marked_cores(example.text) == expected, (f, example.row, example.text)
            marks += len(expected)
            unmarked_text = example_text(tiny.tokenizer, views[example.row], None, None, 128)
            assert example.text.replace("<<", "").replace(">>", "") == unmarked_text  # marks added, nothing else
        for example in collected[f].detection.activating + collected[f].detection.non_activating:
            assert "<<" not in example.text and ">>" not in example.text  # the judge sees no marks
            assert len(example.images) == 1 and example.images[0].size == (32, 32)  # the row's own image
    assert marks > 0  # some feature fires on text tokens


def test_image_tokens_show_as_one_placeholder_and_long_texts_as_a_window(labelled):
    _, ds, reader, sae, brute = labelled
    args = LabelArguments(num_rows=None, top_n=2, num_detection=2, max_context_tokens=4)
    found = collect_examples(sae, reader, ds, [1], args)[1]
    example = found.evidence.examples[0]
    z, modality = brute[example.row]["z"][:, 1], brute[example.row]["modality"]
    text_values = z[modality != Modality.IMAGE]
    assert example.text.startswith("... ") or example.text.endswith(" ...")
    assert len([w for w in example.text.replace("...", "").split() if w != IMAGE_PLACEHOLDER]) <= 4
    assert float(text_values.max()) > 0 and marked_cores(example.text)  # the window holds the strongest token
    full = collect_examples(sae, reader, ds, [1], LabelArguments(num_rows=None, top_n=2, num_detection=2))[1]
    assert full.evidence.examples[0].text.count(IMAGE_PLACEHOLDER) == 1  # 16 image tokens, one placeholder
    assert "<image>" not in full.evidence.examples[0].text  # never the model's own image token


def expected_patches(reader, ds, brute, row, feature):
    """The brute-force patch activations of `feature` on `row`'s image, with its grid and original image."""
    (_, _, _, view), = RowRevisitor(reader, ds, 1).revisit([row], "view")
    record = brute[row]
    values = view.grids[0].values(record["z"][:, feature][record["modality"] == Modality.IMAGE])
    return view.grids[0], values, view.images[0].convert("RGB")


def test_crops_cut_the_image_to_the_patch_where_the_feature_fires_most(labelled):
    _, ds, reader, sae, brute = labelled
    args = LabelArguments(num_rows=None, top_n=4, num_detection=0, image_evidence="crop", max_patches=1,
                          crop_context=0)
    collected = collect_examples(sae, reader, ds, FEATURES, args)
    crops = 0
    for f in FEATURES:
        for example in collected[f].evidence.examples:
            grid, values, image = expected_patches(reader, ds, brute, example.row, f)
            if float(values.max()) <= 0:
                assert example.images == []  # no patch fires: no image evidence
                continue
            box = grid.cell_boxes(*image.size)[int(values.reshape(-1).argmax())]
            (crop,) = example.images
            assert crop.size == (box[2] - box[0], box[3] - box[1])
            assert crop.tobytes() == image.crop(box).tobytes()
            crops += 1
    assert crops > 0
    wider = collect_examples(sae, reader, ds, [13], LabelArguments(
        num_rows=None, top_n=1, num_detection=0, image_evidence="crop", max_patches=1, crop_context=1))[13]
    assert wider.evidence.examples[0].images[0].size[0] > crop.size[0]  # a patch of context around it


@pytest.mark.parametrize("mode", ["mask", "highlight"])
def test_masks_and_highlights_keep_the_firing_patches_and_dim_the_others(labelled, mode):
    _, ds, reader, sae, brute = labelled
    args = LabelArguments(num_rows=None, top_n=3, num_detection=0, image_evidence=mode)
    collected = collect_examples(sae, reader, ds, [4, 13], args)
    checked = 0
    for f in (4, 13):
        for example in collected[f].evidence.examples:
            grid, values, image = expected_patches(reader, ds, brute, example.row, f)
            (shown,) = example.images
            assert shown.size == image.size
            for index, box in enumerate(grid.cell_boxes(*image.size)):
                original, got = image.crop(box), shown.crop(box)
                if float(values.reshape(-1)[index]) > 0:
                    assert got.tobytes() == original.tobytes()
                elif mode == "mask":
                    assert got.getextrema() == ((0, 0), (0, 0), (0, 0))
                else:
                    assert got.tobytes() == Image.eval(original, lambda v: v // 4).tobytes()
                checked += 1
    assert checked > 0


# --- the OpenAI-compatible client ------------------------------------------------------------------------------------


@pytest.fixture
def chat_server():
    """An OpenAI-compatible chat-completions server on 127.0.0.1: `state["reply"](body) -> (status, text, delay)`;
    every request is kept in `state["requests"]`. Yields `(base URL, state)`."""
    state = {"requests": [], "reply": lambda body: (200, json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "the digit three"}}]}), 0.0)}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            state["requests"].append({"path": self.path, "headers": dict(self.headers), "body": body})
            status, text, delay = state["reply"](body)
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(text.encode())
            except OSError:  # the client gave up waiting
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


def reply_with(content, status=200):
    return lambda body: (status, json.dumps({"choices": [{"message": {"content": content}}]}), 0.0)


def demo_evidence():
    image = Image.new("RGB", (24, 16), (200, 10, 10))
    return FeatureEvidence(7, [EvidenceExample(3, 2.5, "what digit is <<three>> ?", [image]),
                               EvidenceExample(9, 1.5, "is it <<three>> ?", [])])


def test_the_openai_client_sends_the_model_the_messages_and_the_images(chat_server, monkeypatch):
    url, state = chat_server
    monkeypatch.setenv("OPENAI_API_KEY", "from-the-environment")
    explainer = OpenAIChatExplainer(url, "tiny-vlm", timeout=5)
    assert explainer.explain(demo_evidence()) == "the digit three"
    (request,) = state["requests"]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer from-the-environment"
    body = request["body"]
    assert body["model"] == "tiny-vlm" and body["temperature"] == 0 and body["max_tokens"] == 48
    (message,) = body["messages"]
    assert message["role"] == "user"
    texts = [part["text"] for part in message["content"] if part["type"] == "text"]
    assert any("what digit is <<three>> ?" in text for text in texts) and any("is it <<three>>" in t for t in texts)
    (image_part,) = [part for part in message["content"] if part["type"] == "image_url"]
    url_text = image_part["image_url"]["url"]
    assert url_text.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url_text.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.size == (24, 16) and sent.getpixel((0, 0)) == (200, 10, 10)
    order = [part["type"] for part in message["content"]]
    assert order.index("image_url") == 2  # after the first example's text, before the second's

    state["reply"] = reply_with("Yes, it does.")
    example = EvidenceExample(4, 1.0, "is it three ?", [], marked=False)
    assert OpenAIChatExplainer(url + "/chat/completions", "m", api_key="explicit").judge("the digit three", example)
    judged = state["requests"][-1]
    assert judged["path"] == "/v1/chat/completions" and judged["headers"]["Authorization"] == "Bearer explicit"
    assert "the digit three" in judged["body"]["messages"][0]["content"][0]["text"]
    state["reply"] = reply_with("No.")
    assert not explainer.judge("the digit three", example)
    text_only = OpenAIChatExplainer(url, "m", send_images=False)
    text_only.explain(demo_evidence())
    assert all(part["type"] == "text" for part in state["requests"][-1]["body"]["messages"][0]["content"])
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIChatExplainer(url, "m").explain(demo_evidence())
    assert "Authorization" not in state["requests"][-1]["headers"]  # no key: none sent


def test_the_openai_client_errors_name_the_endpoint_and_the_status(chat_server):
    url, state = chat_server
    endpoint = url + "/chat/completions"
    explainer = OpenAIChatExplainer(url, "tiny-vlm", timeout=0.5)
    state["reply"] = lambda body: (500, '{"error": "model crashed"}', 0.0)
    with pytest.raises(ConnectionError, match=re.escape(endpoint) + r" answered HTTP 500.*model crashed"):
        explainer.explain(demo_evidence())
    state["reply"] = lambda body: (401, '{"error": "bad key"}', 0.0)
    with pytest.raises(ConnectionError, match=r"HTTP 401.*check the API key"):
        explainer.explain(demo_evidence())
    state["reply"] = lambda body: (200, "<html>not an API</html>", 0.0)
    with pytest.raises(ValueError, match=r"not a chat completion \(choices\[0\]\.message\.content\)"):
        explainer.explain(demo_evidence())
    state["reply"] = lambda body: (200, json.dumps({"choices": [{"message": {"content": "late"}}]}), 2.0)
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=re.escape(endpoint) + r" did not answer within 0.5 s"):
        explainer.explain(demo_evidence())
    assert time.perf_counter() - started < 1.8
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}/v1/chat/completions cannot be reached"):
        OpenAIChatExplainer(f"http://127.0.0.1:{port}/v1", "m", timeout=2).explain(demo_evidence())
    with pytest.raises(ValueError, match="must be an http"):
        OpenAIChatExplainer("127.0.0.1:8000/v1", "m")
    with pytest.raises(ValueError, match="needs the name of the model"):
        OpenAIChatExplainer(url, "")


# --- the local transformers explainer -------------------------------------------------------------------------------


def test_the_transformers_explainer_generates_its_label_from_a_prompt_holding_the_evidence(labelled):
    tiny, ds, reader, sae, _ = labelled
    evidence = collect_examples(sae, reader, ds, [13], LabelArguments(num_rows=None, top_n=2, num_detection=0))[13]
    evidence = evidence.evidence
    explainer = TransformersExplainer(tiny.model, tiny.processor, max_new_tokens=5)
    inputs = explainer.inputs(explanation_parts(evidence))
    image_token = tiny.model.config.image_token_id
    num_images = sum(len(e.images) for e in evidence.examples)
    assert num_images == 2 and inputs["pixel_values"].shape[0] == num_images
    assert int((inputs["input_ids"] == image_token).sum()) == 16 * num_images
    prompt = tiny.tokenizer.decode(inputs["input_ids"][0])
    assert not any("<<" in e.text for e in evidence.examples)  # feature 13 fires on the image alone
    assert prompt.count("what digit is this ? is it") == 2  # both examples' texts are in the prompt
    label = explainer.explain(evidence)
    generated = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert label == clean_label(tiny.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True))
    assert isinstance(label, str) and label
    assert isinstance(explainer.judge(label, EvidenceExample(0, 0.0, "is it three ?", [], marked=False)), bool)


def test_a_text_only_chat_lm_explains_from_the_text_evidence_alone(tiny_model_factory):
    text = tiny_model_factory("text")
    explainer = TransformersExplainer(text.model, text.processor, max_new_tokens=4)
    inputs = explainer.inputs(explanation_parts(demo_evidence()))
    assert "pixel_values" not in inputs  # the image evidence is dropped
    assert "three" in text.tokenizer.decode(inputs["input_ids"][0])
    assert isinstance(explainer.explain(demo_evidence()), str)


@pytest.mark.parametrize("answer, yes", [("Yes", True), (" yes, it fires", True), ("TRUE", True), ("no", False),
                                         ("", False), ("maybe yes", False)])
def test_a_judges_answer_is_yes_only_when_it_opens_with_yes(answer, yes):
    assert parse_yes(answer) is yes


def test_a_generated_label_is_cleaned_and_never_empty():
    assert clean_label('\n  Label: "the digit three"\nmore text') == "the digit three"
    assert clean_label("   ") == "(no label: the explainer answered nothing)"
    assert len(clean_label("x" * 500)) == 200


# --- label_features end to end ---------------------------------------------------------------------------------------


class OracleJudge:
    """Knows the brute-force row maxima: says yes exactly where the feature fires."""

    def __init__(self, brute):
        self.brute = brute

    def judge(self, label, example):
        feature = int(label.split()[-1])
        return float(self.brute[example.row]["max"][feature]) > 0


class RecordingExplainer:
    name = "recording"

    def __init__(self):
        self.seen = []

    def explain(self, evidence):
        self.seen.append(evidence)
        return f"feature {evidence.feature}"


def test_label_features_writes_a_label_per_firing_feature_and_scores_it(labelled, caplog):
    _, ds, reader, sae, brute = labelled
    explainer = RecordingExplainer()
    args = LabelArguments(num_rows=None, top_n=3, num_detection=4, batch_size=8)
    with caplog.at_level(logging.WARNING):
        labels = label_features(sae, reader, ds, FEATURES + [SILENT], explainer, OracleJudge(brute), args)
    assert list(labels) == FEATURES  # the silent feature gets no label, and a warning names it
    assert f"[{SILENT}]" in caplog.text
    explanation, _ = split_rows(NUM_ROWS, 0.5, 0)
    for evidence in explainer.seen:
        assert {e.row for e in evidence.examples} <= set(explanation) and len(evidence.examples) == 3
    for f, label in labels.items():
        assert label == FeatureLabel(f, f"feature {f}", "recording", label.detection)
        assert label.detection["f1"] == 1.0 and label.detection["accuracy"] == 1.0  # an oracle judge
        assert label.detection["num_activating"] == label.detection["num_non_activating"] == 4
    unscored = label_features(sae, reader, ds, [4], explainer, object(), LabelArguments(num_rows=None, num_detection=0))
    assert unscored[4].detection is None  # num_detection=0: no judge needed


def test_labels_json_round_trips_and_a_bad_file_names_the_fault(tmp_path, labelled):
    *_, sae, _ = labelled
    labels = {3: FeatureLabel(3, "the digit three", "m", {k: 1 for k in DETECTION_KEYS}),
              1: FeatureLabel(1, "red things", None, None)}
    path = write_labels(labels, tmp_path / "labels.json", sae)
    assert read_labels(path) == labels
    assert json.loads(path.read_text())["saev"] == {"d_sae": D_SAE, "d_in": 64, "hook_layer": 1}
    record = json.loads(path.read_text())
    del record["features"]["3"]["detection"]["f1"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"feature '3': its detection score lacks \['f1'\]"):
        read_labels(path)
    with pytest.raises(FileNotFoundError, match="saev label"):
        read_labels(tmp_path / "none.json")


# --- `saev label` ----------------------------------------------------------------------------------------------------


def saved_sources(labelled, tmp_path):
    tiny, ds, _, sae, _ = labelled
    ds.save_to_disk(tmp_path / "data")
    sae.save_pretrained(tmp_path / "sae")
    return ["--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(tiny.path),
            "--dataset_name", str(tmp_path / "data"), "--device", "cpu"]


def test_saev_label_writes_labels_json_that_read_labels_reads(labelled, tmp_path, capsys):
    tiny = labelled[0]
    sources = saved_sources(labelled, tmp_path)
    out = tmp_path / "labels"
    assert main(["label", *sources, "--features", "13", "1", "--explainer_model_name_or_path", str(tiny.path),
                 "--num_rows", "24", "--top_n", "2", "--num_detection", "3", "--max_new_tokens", "4",
                 "--output_dir", str(out), "--disable_tqdm"]) == 0
    assert "Labelled 2 of 2 features (2 with a detection score)" in capsys.readouterr().out
    labels = read_labels(out / "labels.json")
    assert set(labels) == {1, 13} and all(label.label for label in labels.values())
    assert all(label.explainer == str(tiny.path) for label in labels.values())
    assert all(label.detection["num_activating"] == 3 for label in labels.values())
    assert json.loads((out / "labels.json").read_text())["saev"]["d_sae"] == D_SAE
    table = (out / "labels.md").read_text()
    assert "| feature | label | accuracy |" in table and "| 13 |" in table and "| 1 |" in table
    assert json.loads((out / "saev_output.json").read_text()) | {"saev_hf": None} == {
        "command": "saev label", "saev_hf": None, "complete": True}


def test_saev_label_asks_an_openai_compatible_endpoint(labelled, tmp_path, chat_server):
    url, state = chat_server
    state["reply"] = lambda body: (200, json.dumps({"choices": [{"message": {"content": (
        "the digit three" if "Label:" in body["messages"][0]["content"][-1]["text"] else "yes")}}]}), 0.0)
    out = tmp_path / "labels"
    assert main(["label", *saved_sources(labelled, tmp_path), "--features", "4", "--explainer_url", url,
                 "--explainer_model", "tiny-vlm", "--explainer_api_key", "k", "--num_rows", "24", "--top_n", "2",
                 "--num_detection", "2", "--output_dir", str(out), "--disable_tqdm"]) == 0
    (label,) = read_labels(out / "labels.json").values()
    assert label.label == "the digit three" and label.explainer == f"tiny-vlm at {url}/chat/completions"
    assert label.detection["recall"] == 1.0 and label.detection["precision"] == 0.5  # a judge that always says yes
    assert len(state["requests"]) == 1 + 4 and all(r["headers"]["Authorization"] == "Bearer k"
                                                   for r in state["requests"])


# --- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_features_and_unusable_data_are_refused_before_any_row_is_read(labelled):
    _, ds, reader, sae, _ = labelled
    explainer, judge = RecordingExplainer(), ScriptedJudge(set())
    with pytest.raises(ValueError, match=r"Unknown feature id\(s\) \[32, -1\]: .* ids 0 to 31"):
        label_features(sae, reader, ds, [3, 32, -1], explainer, judge)
    with pytest.raises(ValueError, match="No features to label"):
        label_features(sae, reader, ds, [], explainer, judge)
    with pytest.raises(ValueError, match="has 1 row"):
        label_features(sae, reader, ds.select([0]), [3], explainer, judge)
    with pytest.raises(ValueError, match="needs a dataset with a length"):
        label_features(sae, reader, ds.to_iterable_dataset(), [3], explainer, judge)
    with pytest.raises(TypeError, match="has no explain"):
        label_features(sae, reader, ds, [3], object(), judge)
    with pytest.raises(TypeError, match=r"has no judge\(label, example\)"):
        label_features(sae, reader, ds, [3], explainer, judge=object())
    other_layer = LayerReader(reader.model, reader.processor, layer=0)
    with pytest.raises(ValueError, match="trained on layer 1"):
        label_features(sae, other_layer, ds, [3], explainer, judge)
    assert explainer.seen == []


@pytest.mark.parametrize("options, message", [
    (dict(explanation_fraction=1.0), "explanation_fraction=1.0 must be between 0 and 1"),
    (dict(num_rows=1), "num_rows=1 must be at least 2"),
    (dict(top_n=0), "top_n=0 must be a positive integer"),
    (dict(num_detection=-1), "num_detection=-1 must be 0 or more"),
    (dict(image_evidence="blur"), "image_evidence='blur' must be one of"),
    (dict(max_patches=0), "max_patches=0 must be at least 1"),
    (dict(mark_fraction=1.5), r"mark_fraction=1.5 must be in \[0, 1\]"),
])
def test_label_arguments_refuse_settings_that_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        LabelArguments(**options)


@pytest.mark.parametrize("options, message", [
    (dict(explainer_model_name_or_path="m"), "features is required"),
    (dict(features=[1]), "No explainer: give a local chat model"),
    (dict(features=[1], explainer_model_name_or_path="m", explainer_url="http://h/v1", explainer_model="x"),
     "not both"),
    (dict(features=[1], explainer_url="http://h/v1"), "needs --explainer_model"),
    (dict(features=[1], explainer_model_name_or_path="m", judge_model="x"), "give the endpoint with --judge_url"),
])
def test_explainer_arguments_name_the_missing_or_conflicting_option(options, message):
    with pytest.raises(ValueError, match=message):
        ExplainerArguments(**options)


def test_saev_label_without_an_explainer_is_a_usage_error(labelled, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["label", *saved_sources(labelled, tmp_path), "--features", "3", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "--explainer_model_name_or_path" in capsys.readouterr().err
