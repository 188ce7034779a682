"""The interactive explorer: its numbers against the scorer's and brute force, its feature pages, steering, the Gradio
app driven through `gradio_client` on 127.0.0.1, a headless-Chromium screenshot, `saev explore` on the embedded model,
and the Space `saev push --space` writes, run from the loopback Hub."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_inspection import _chrome, hand_weighted, make_dataset
from test_scoring import data_driven_sae

from saev_hf.activations import LayerReader, Modality
from saev_hf.cli import main
from saev_hf.hub.space import write_space
from saev_hf.interpret import InspectionArguments, feature_logits, inspect_saev, write_feature_browser
from saev_hf.interpret.explorer import Explorer, build_explorer
from saev_hf.interpret.labels import FeatureLabel, write_labels
from saev_hf.interpret.steering import SteerArguments, generate_steered
from saev_hf.patches import PatchLocator
from saev_hf.scoring import SAEVScorer

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "images"


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    """`(tiny llava, sae with weights, dataset, explorer)`."""
    tiny = tiny_model_factory("llava")
    ds = make_dataset()
    reader = LayerReader(tiny.model, tiny.processor, layer=1)
    sae = hand_weighted(data_driven_sae(reader, ds, d_sae=96))
    return tiny, sae, ds, Explorer(sae, tiny.model, tiny.processor, top_k=6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_analysis_equals_the_scorer_and_brute_force(setup):
    tiny, sae, ds, explorer = setup
    row = ds[3]
    analysis = explorer.analyze(row["images"][0], row["prompt"])
    scored = SAEVScorer(sae, tiny.model, tiny.processor)(ds.select([3])[:])
    assert analysis.scores["saev_cosine_score"] == pytest.approx(scored["saev_cosine_score"][0], abs=1e-6)
    assert analysis.scores["saev_cooccur_l0"] == scored["saev_cooccur_l0"][0]
    assert analysis.scores["saev_l0"] == pytest.approx(scored["saev_l0"][0], rel=1e-6)
    # the top features: the largest activations over the row's positions, brute force
    acts = LayerReader(tiny.model, tiny.processor, layer=1).read(ds.select([3])[:])
    hidden, modality = acts.example(0)
    z = sae.encode(hidden).detach()
    peak = z.max(0).values
    listed = [f.feature for f in analysis.top_features]
    assert listed == peak.topk(6).indices.tolist()
    for f in analysis.top_features:
        assert f.max_image == pytest.approx(float(z[modality == Modality.IMAGE, f.feature].max()), abs=1e-5)
        assert f.max_text == pytest.approx(float(z[modality != Modality.IMAGE, f.feature].max()), abs=1e-5)
    members = {c.feature for c in analysis.explanation.contributions}
    assert {f.feature for f in analysis.top_features if f.cooccurs} == members & set(listed)
    record = analysis.to_dict()
    json.dumps(record, allow_nan=False)  # what the /analyze endpoint sends: no NaN (a missing weight is None)
    assert sum(c["contribution"] for c in record["contributions"]) == pytest.approx(
        record["scores"]["saev_cosine_score"], abs=1e-6)
    # a second look at the same input is served from the explorer's memory, not read again
    assert explorer.analyze(row["images"][0], row["prompt"]) is analysis


def test_feature_view_heatmap_and_tokens(setup):
    tiny, sae, ds, explorer = setup
    row = ds[5]
    analysis = explorer.analyze(row["images"][0], row["prompt"])
    feature = analysis.top_features[0].feature
    shown = explorer.feature_view(analysis, feature)
    hidden, modality = analysis.hidden, analysis.modality
    z = sae.encode(hidden)[:, feature].float().detach()
    grid = PatchLocator(tiny.model, tiny.processor).grids(
        explorer.reader.prepare([{"images": row["images"], "prompt": row["prompt"]}]), example=0,
        image_sizes=[row["images"][0].size])[0]
    assert torch.allclose(shown["patches"][0], grid.values(z[modality == Modality.IMAGE]).float(), atol=1e-6)
    # tokens: the image run folded into one entry with its largest activation, text tokens one by one
    image_entries = [t for t in shown["tokens"] if t[0].startswith("[image")]
    assert len(image_entries) == 1
    n_image = int((modality == Modality.IMAGE).sum())
    assert image_entries[0][0] == f"[image \u00d7{n_image}]"
    top_image = float(z[modality == Modality.IMAGE].max())
    assert image_entries[0][1] == (pytest.approx(top_image, abs=1e-6) if top_image > 0 else None)
    assert len(shown["tokens"]) == len(analysis.view.tokens) - n_image + 1
    assert shown["images"][0].size[0] > 0
    with pytest.raises(ValueError, match="does not exist: this SAE-V has features 0 to 95"):
        explorer.feature_view(analysis, 96)


def test_feature_page_shows_logit_lens_label_and_inspection(setup, tmp_path):
    tiny, sae, ds, _ = setup
    reader = LayerReader(tiny.model, tiny.processor, layer=1)
    inspection = inspect_saev(sae, reader, ds, InspectionArguments(num_examples=None, top_n=2, num_explained=0,
                                                                   features=[4], max_features=0))
    labels = {4: FeatureLabel(4, "digit | ink", "scripted", {"accuracy": 0.75, "precision": 1.0, "recall": 0.5,
                                                             "f1": 0.6667, "num_activating": 4,
                                                             "num_non_activating": 4})}
    write_feature_browser(inspection, tmp_path / "report", labels=labels, explorer_url="http://127.0.0.1:7860")
    summary = json.loads((tmp_path / "report" / "features.json").read_text())
    explorer = Explorer(sae, tiny.model, tiny.processor, labels=labels, inspection=summary,
                        inspection_dir=tmp_path / "report")
    page = explorer.feature_page(4)
    lens = feature_logits(sae, tiny.model, tiny.tokenizer, [4], 8)[4]
    assert "digit \\| ink" in page and "accuracy 0.750, F1 0.667 on 4 activating and 4 non-activating" in page
    assert f"{lens.positive[0][1]:.3g}" in page and f"{lens.negative[0][1]:.3g}" in page
    tops = summary["features"]["4"]["top_examples"]
    assert tops and f"row {tops[0]['row']} ({tops[0]['activation']:.3g})" in page
    assert str((tmp_path / "report" / "features" / "feature_4.html").resolve()) in page
    # the static page shows the label with its score and links to the explorer
    html = (tmp_path / "report" / "features" / "feature_4.html").read_text()
    assert "<b>digit | ink</b>" in html and "accuracy 0.75, F1 0.667 on 4 + 4 held-out" in html
    assert 'href="http://127.0.0.1:7860/?feature=4"' in html
    assert "label" in (tmp_path / "report" / "index.html").read_text()
    # a feature not in the inspection says so
    assert "not among the inspection run's features" in explorer.feature_page(7)


def test_steering_panel_matches_generate_steered(setup):
    tiny, sae, ds, explorer = setup
    image, prompt = ds[0]["images"][0], ds[0]["prompt"]
    f = explorer.analyze(image, prompt).top_features[0].feature
    texts = explorer.steer(image, prompt, "", "all", 4)
    assert texts["plain"] == texts["steered"]  # no clamp: the model unchanged
    steered = explorer.steer(image, prompt, f"{f}=50", "image", 4)
    expected = generate_steered(tiny.model, tiny.processor, sae, SteerArguments(prompt=prompt, features=f"{f}=50",
                                positions="image", max_new_tokens=4), images=[image])
    assert steered == expected
    with pytest.raises(ValueError, match="FEATURE=VALUE"):
        explorer.steer(image, prompt, "12", "all", 4)
    with pytest.raises(ValueError, match="does not exist"):
        explorer.steer(image, prompt, "500=1", "all", 4)


def test_bad_inputs_name_the_problem(setup, tmp_path):
    tiny, sae, ds, explorer = setup
    with pytest.raises(ValueError, match="No image: upload an image"):
        explorer.analyze(None, "what is it?")
    with pytest.raises(ValueError, match="The prompt is empty"):
        explorer.analyze(ds[0]["images"][0], "  ")
    with pytest.raises(ValueError, match="does not exist"):
        explorer.check_feature("1.5")
    from saev_hf.interpret.labels import read_labels

    path = write_labels({3: FeatureLabel(3, "x")}, tmp_path / "labels.json", sae)
    assert read_labels(path, sae)[3].label == "x"
    record = json.loads(path.read_text())
    record["saev"]["d_sae"] = 10
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="were made for an SAE-V with .*'d_sae': 10"):
        read_labels(path, sae)


@pytest.fixture(scope="module")
def served(setup):
    """The app on a free port of 127.0.0.1, and a gradio_client Client of it."""
    from gradio_client import Client

    *_, explorer = setup
    app = build_explorer(explorer)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/", Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def test_app_endpoints_through_gradio_client(setup, served, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    tiny, sae, ds, explorer = setup
    _, url, client = served
    assert {"/analyze", "/feature", "/steer"} <= set(client.view_api(return_format="dict")["named_endpoints"])
    image, prompt = ds[2]["images"][0], ds[2]["prompt"]
    path = tmp_path / "input.png"
    image.save(path)
    result = client.predict(handle_file(str(path)), prompt, api_name="/analyze")
    direct = explorer.analyze(image, prompt).to_dict()
    assert result["scores"] == pytest.approx(direct["scores"])
    assert [f["feature"] for f in result["top_features"]] == [f["feature"] for f in direct["top_features"]]
    feature = result["top_features"][0]["feature"]
    heatmap, tokens, page = client.predict(handle_file(str(path)), prompt, feature, api_name="/feature")
    assert Image.open(heatmap).size == explorer.feature_view(explorer.analyze(image, prompt), feature)["images"][0].size
    scores = [t["class_or_confidence"] for t in tokens]
    assert max(s for s in scores if s is not None) == pytest.approx(1.0)  # scaled by the feature's peak
    assert page.startswith(f"### Feature {feature}")
    plain, steered = client.predict(handle_file(str(path)), prompt, "", "all", 3, api_name="/steer")
    assert plain == steered == explorer.steer(image, prompt, "", "all", 3)["plain"]
    with pytest.raises(Exception, match="The prompt is empty"):
        client.predict(handle_file(str(path)), "", api_name="/analyze")


def test_app_in_headless_chromium_with_a_screenshot(setup, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tiny, sae, ds, explorer = setup
    _, url, _ = served
    driver = _chrome()
    try:
        driver.set_window_size(1280, 1400)
        driver.get(url + "?feature=7")  # a static page's link: opens feature 7's page
        WebDriverWait(driver, 60).until(lambda d: "Feature 7" in d.find_element(By.TAG_NAME, "body").text)
        image_path = tmp_path / "scene.png"
        ds[1]["images"][0].resize((96, 96)).save(image_path)
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image_path))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='gradio_api/file']"))
        button = next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Analyze")
        button.click()
        WebDriverWait(driver, 90).until(lambda d: "saev_cosine_score" in d.find_element(By.TAG_NAME, "body").text)
        top = explorer.analyze(ds[1]["images"][0].resize((96, 96)), "What is in this image?").top_features[0].feature
        WebDriverWait(driver, 60).until(lambda d: f"Feature {top}" in d.find_element(By.TAG_NAME, "body").text)
        shot = tmp_path / "explorer.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    picture = Image.open(shot).convert("L")
    assert picture.size[0] >= 1200 and len(set(picture.getdata())) > 50  # a drawn page, not a blank one
    if os.environ.get("SAEV_HF_UPDATE_SCREENSHOTS"):  # python -m pytest tests/test_explorer.py with it set: docs/
        SCREENSHOTS.mkdir(exist_ok=True)
        Image.open(shot).save(SCREENSHOTS / "explorer_tiny.png")


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 240) -> None:
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {seconds} s")


def _stop(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""


def test_saev_explore_opens_on_the_embedded_model_with_defaults(tmp_path):
    """`saev explore` with no model named: the embedded grounded LLaVA and the demo's SAE-V (trained once, cached)."""
    from gradio_client import Client, handle_file

    port = _free_port()
    env = {**os.environ, "SAEV_HF_DEMO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "saev_hf.cli", "explore", "--server_port", str(port), "--demo_saev_steps", "40"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", process)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        from saev_hf.demo.explorer_default import demo_explorer_sources

        os.environ["SAEV_HF_DEMO_CACHE"] = str(tmp_path / "cache")
        try:
            sae, model, processor, examples, _ = demo_explorer_sources(steps=40, progress=False)
        finally:
            del os.environ["SAEV_HF_DEMO_CACHE"]
        assert len(list((tmp_path / "cache").iterdir())) == 1  # the app's SAE-V was cached and reused here
        image, prompt = examples[0]
        image.save(tmp_path / "scene.png")
        result = client.predict(handle_file(str(tmp_path / "scene.png")), prompt, api_name="/analyze")
        expected = Explorer(sae, model, processor).analyze(image, prompt).to_dict()
        assert result["scores"] == pytest.approx(expected["scores"])
        assert result["tokens"] == expected["tokens"] and "[image" not in "".join(result["tokens"][:1])
    finally:
        _stop(process)


def test_explore_command_refuses_half_a_source(capsys):
    with pytest.raises(SystemExit):
        main(["explore", "--sae_name_or_path", "some/saev"])
    assert "Give both --sae_name_or_path and --model_name_or_path" in capsys.readouterr().err


def test_space_folder_metadata_and_refusals(tmp_path):
    import gradio

    labels = write_labels({3: FeatureLabel(3, "red things")}, tmp_path / "labels.json")
    folder = write_space(tmp_path / "space", "org/saev", "org/mllm", labels_file=labels)
    readme = (folder / "README.md").read_text()
    metadata = yaml.safe_load(readme.split("---")[1])
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == gradio.__version__
    assert metadata["app_file"] == "app.py" and metadata["models"] == ["org/saev", "org/mllm"]
    from saev_hf import __version__

    assert (folder / "requirements.txt").read_text().strip() == f"saev-hf[explorer]=={__version__}"
    app = (folder / "app.py").read_text()
    assert "sae_name_or_path='org/saev'" in app and "model_name_or_path='org/mllm'" in app
    assert "labels='labels.json'" in app and json.loads((folder / "labels.json").read_text())["features"]["3"]
    compile(app, "app.py", "exec")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a Space's"):
        write_space(tmp_path / "other", "org/saev", "org/mllm")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'features' mapping"):
        write_space(tmp_path / "space2", "org/saev", "org/mllm", labels_file=tmp_path / "bad.json")


def test_pushed_space_runs_the_same_app_from_the_loopback_hub(setup, loopback_hub, tmp_path, capsys):
    """`saev push --space`, then the Space's own files run as a Space runs them (`python app.py`), reading the SAE-V and
    the model from the Hub: its /analyze answers as the app in this process does."""
    from gradio_client import Client, handle_file
    from huggingface_hub import snapshot_download

    tiny, sae, ds, explorer = setup
    sae.save_pretrained(tmp_path / "saev")
    loopback_hub.api.create_repo("org/saev")
    loopback_hub.api.upload_folder(repo_id="org/saev", folder_path=str(tmp_path / "saev"))
    loopback_hub.api.create_repo("org/mllm")
    loopback_hub.api.upload_folder(repo_id="org/mllm", folder_path=str(tiny.path))
    main(["push", "--space", "--sae", "org/saev", "--model", "org/mllm", "--repo_id", "org/explorer"])
    assert "as the Space org/explorer" in capsys.readouterr().out
    assert set(loopback_hub.files("org/explorer", "space")) >= {"app.py", "requirements.txt", "README.md"}
    local = Path(snapshot_download("org/explorer", repo_type="space", local_dir=tmp_path / "space"))
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=local, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", process)
        image, prompt = ds[4]["images"][0], ds[4]["prompt"]
        image.save(tmp_path / "input.png")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict(handle_file(str(tmp_path / "input.png")), prompt, api_name="/analyze")
    finally:
        _stop(process)
    direct = explorer.analyze(image, prompt).to_dict()
    assert result["scores"] == pytest.approx(direct["scores"], abs=1e-5)
    assert [f["feature"] for f in result["top_features"]][:6] == [f["feature"] for f in direct["top_features"]]
    with pytest.raises(SystemExit):
        main(["push", "--space", "--sae", "org/saev", "--repo_id", "org/explorer"])
    assert "--space needs --sae and --model" in capsys.readouterr().err
