"""Feature pages and score explanations: brute-force references, the scorer's own numbers, the HTML report, a real
headless browser, errors and `saev inspect`."""

import copy
import os
import re
from html.parser import HTMLParser

import datasets
import pytest
import torch
from test_scoring import data_driven_sae

from saev_hf.activations import LayerReader, Modality
from saev_hf.cli import main
from saev_hf.interpret import write_feature_browser
from saev_hf.interpret import InspectionArguments, explain_rows, inspect_saev
from saev_hf.scoring import SAEVScorer
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

DELTA = 0.05  # the tiny models' hidden states have norms near 0.1; delta = 1 would leave nothing co-occurring
D_SAE = 96
NUM_ROWS = 12
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def make_dataset(n=NUM_ROWS, seed=5):
    data = digit_images(n, seed=seed)
    return datasets.Dataset.from_dict({
        "images": [[image] for image, _ in data],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(data)],
    })


def directional_sae(reader, ds, d_sae=D_SAE):
    """The scoring tests' data-driven SAE-V: features along sampled token states, so rows differ in what co-occurs."""
    return data_driven_sae(reader, ds, d_sae=d_sae)


def hand_weighted(sae):
    """Set hand-made cross-modal weights: positive, negative, and none (NaN) for every fourth feature."""
    weights = torch.linspace(-1, 1, D_SAE)[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))]
    weights[::4] = float("nan")
    sae.set_feature_weights(weights, info={"hand_set": True})
    return sae


@pytest.fixture(scope="module")
def inspected(tiny_model_factory):
    """`inspected(arch) -> (tiny model, reader, sae with weights, dataset, inspection)`, built once per architecture."""
    cache = {}

    def build(arch):
        if arch not in cache:
            tiny = tiny_model_factory(arch)
            ds = make_dataset()
            reader = LayerReader(tiny.model, tiny.processor, layer=1)
            sae = hand_weighted(directional_sae(reader, ds))
            args = InspectionArguments(num_examples=None, top_n=3, num_explained=3, num_contributors=2,
                                       num_top_weighted=3, features=[0, 1], batch_size=5)
            cache[arch] = tiny, reader, sae, ds, inspect_saev(sae, reader, ds, args)
        return cache[arch]

    return build


@pytest.fixture(scope="module")
def report(inspected, tmp_path_factory):
    """The tiny LLaVA's inspection rendered once: `(inspection, index.html path)`."""
    *_, inspection = inspected("llava")
    return inspection, write_feature_browser(inspection, tmp_path_factory.mktemp("report") / "report")


def brute_force(sae, reader, ds):
    """Per row and feature, the largest activation; per modality and feature, the firing positions; per feature, the
    rows where it co-occurs: every row read at once, every activation in memory."""
    acts = reader.read(ds[:])
    maxima, counts, cooccur = [], {m: 0 for m in ("image", "text", "special")}, 0
    for i in range(len(acts)):
        hidden, modality = acts.example(i)
        z = sae.encode(hidden)
        maxima.append(z.max(0).values)
        for name, code in (("image", Modality.IMAGE), ("text", Modality.TEXT), ("special", Modality.SPECIAL)):
            counts[name] = counts[name] + (z[modality == code] > 0).sum(0)
        text = (modality == Modality.TEXT) | (modality == Modality.SPECIAL)
        cooccur = cooccur + ((z[text] > DELTA).any(0) & (z[modality == Modality.IMAGE] > DELTA).any(0)).long()
    return torch.stack(maxima), counts, cooccur


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_top_examples_and_modality_profiles_equal_a_brute_force_pass(inspected, arch):
    tiny, reader, sae, ds, inspection = inspected(arch)
    maxima, counts, cooccur = brute_force(sae, reader, ds)
    assert {0, 1} <= set(inspection.features) and len(inspection.features) > 2
    for f, summary in inspection.features.items():
        expected = maxima[:, f].sort(descending=True).values[:3]
        expected = expected[expected > 0]
        got = torch.tensor([e.activation for e in summary.top_examples])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the highest maxima, highest first
        for example in summary.top_examples:  # ...and the rows they belong to (equal maxima may swap rows)
            torch.testing.assert_close(maxima[example.row, f].item(), example.activation, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(example.token_activations.max().item(), example.activation, rtol=1e-5, atol=1e-6)
        assert summary.firing_counts == {name: int(counts[name][f]) for name in counts}
        assert summary.examples_fired == int((maxima[:, f] > 0).sum())
        assert summary.examples_cooccurring == int(cooccur[f])
        if sum(summary.firing_counts.values()):
            assert sum(summary.modality_profile.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_explanations_add_up_to_the_scorers_cosine_score(inspected, arch):
    tiny, reader, sae, ds, inspection = inspected(arch)
    scorer = SAEVScorer(sae, tiny.model, tiny.processor)
    scores = scorer.score_rows(ds[:])
    torch.testing.assert_close(inspection.scores["cosine"], torch.tensor(scores["saev_cosine_score"]).double())
    torch.testing.assert_close(inspection.scores["l0"], torch.tensor(scores["saev_l0"]).double())
    assert inspection.scores["cooccur_l0"].tolist() == scores["saev_cooccur_l0"]
    # by default the lowest-scored rows are explained, lowest first
    lowest = sorted(range(NUM_ROWS), key=lambda r: scores["saev_cosine_score"][r])[:3]
    assert list(inspection.explanations) == lowest
    explanations = {**inspection.explanations, **explain_rows(sae, reader, ds, [4, 9])}
    for row, e in explanations.items():
        assert e.cosine_score == pytest.approx(scores["saev_cosine_score"][row], rel=1e-6, abs=1e-9)
        assert sum(c.contribution for c in e.contributions) == pytest.approx(e.cosine_score, rel=1e-6, abs=1e-9)
        assert e.cooccur_l0 == len(e.contributions) == scores["saev_cooccur_l0"][row]
        assert e.l0 == pytest.approx(scores["saev_l0"][row])
        sizes = [abs(c.contribution) for c in e.contributions if c.weight == c.weight]
        assert sizes == sorted(sizes, reverse=True) and e.num_weighted == len(sizes)
        for c in e.contributions:
            assert min(c.max_text_activation, c.max_image_activation) > DELTA
    # the top contributors of the explained rows have pages
    for row in inspection.explanations:
        first = next(c for c in inspection.explanations[row].contributions if c.contribution != 0)
        assert first.feature in inspection.features


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_patch_heatmaps_come_from_the_image_tokens(inspected, arch):
    tiny, reader, sae, ds, inspection = inspected(arch)
    for summary in inspection.features.values():
        for example in summary.top_examples:
            view = inspection.rows[example.row]
            image_acts = example.token_activations[view.modality == Modality.IMAGE]
            assert view.grids is not None and len(example.patch_activations) == len(view.images) == 1
            patches = example.patch_activations[0]
            assert patches.shape == (4, 4)  # a 32x32 image in 8-pixel patches: the base grid
            if arch == "llava":  # one view: the patches are the 16 image tokens, row by row
                torch.testing.assert_close(patches.float(), image_acts.reshape(4, 4))
            assert float(patches.max()) <= float(image_acts.max()) + 1e-6


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src")]


def test_report_pages_and_their_links_exist(report):
    inspection, index = report
    root = index.parent
    for f in inspection.features:
        assert (root / "features" / f"feature_{f}.html").exists()
    for row in inspection.explanations:
        assert (root / "examples" / f"example_{row}.html").exists()
    linked_features = set()
    for page in root.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        for target in parser.targets:
            assert "://" not in target and not target.startswith("/"), f"{page.name}: {target} is not relative"
            assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"
            if page.parent.name == "examples" and target.startswith("../features/feature_"):
                linked_features.add(int(re.search(r"feature_(\d+)\.html", target).group(1)))
    assert linked_features and linked_features <= set(inspection.features)
    index_html = index.read_text(encoding="utf-8")
    rows = [int(r) for r in re.findall(r'href="examples/example_(\d+)\.html"', index_html)]
    assert rows == list(inspection.explanations)  # lowest score first


def test_odd_tokens_are_escaped(report, tmp_path):
    inspection = copy.deepcopy(report[0])
    row = next(iter(inspection.explanations))
    odd = '<script>alert("x")</script> & \'q\''
    inspection.rows[row].tokens[-1] = odd
    inspection.dataset_name = "<b>data</b>"
    index = write_feature_browser(inspection, tmp_path / "odd")
    page = (tmp_path / "odd" / "examples" / f"example_{row}.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;" in page
    assert "<b>data</b>" not in index.read_text(encoding="utf-8")


def test_a_model_without_patch_layout_shows_plain_images(inspected, monkeypatch, tmp_path):
    tiny, reader, sae, ds, _ = inspected("llava")

    def no_layout(self, model, processor):
        raise NotImplementedError("No patch layout for model type 'mystery'.")

    monkeypatch.setattr("saev_hf.patches.PatchLocator.__init__", no_layout)
    inspection = inspect_saev(sae, reader, ds, InspectionArguments(features=[3], num_explained=1, num_top_weighted=0,
                                                                    num_contributors=0, top_n=2))
    example = inspection.features[3].top_examples[0]
    assert example.patch_activations is None and inspection.rows[example.row].grids is None
    write_feature_browser(inspection, tmp_path / "plain")
    page = (tmp_path / "plain" / "features" / "feature_3.html").read_text(encoding="utf-8")
    assert "No patch heatmap: No patch layout for model type &#x27;mystery&#x27;." in page
    assert (tmp_path / "plain" / "features" / f"feature_3_row{example.row}_image0.png").stat().st_size > 0


def test_errors_name_the_problem_and_the_fix(inspected):
    tiny, reader, sae, ds, _ = inspected("llava")
    with pytest.raises(ValueError, match=rf"Unknown feature id\(s\) \[{D_SAE}\].*ids 0 to {D_SAE - 1}"):
        inspect_saev(sae, reader, ds, InspectionArguments(features=[3, D_SAE]))
    with pytest.raises(ValueError, match=rf"Row\(s\) \[{NUM_ROWS}\].*0 to {NUM_ROWS - 1}"):
        inspect_saev(sae, reader, ds, InspectionArguments(examples=[NUM_ROWS]))
    with pytest.raises(ValueError, match=r"image column 'images' is not in the dataset.*'pictures'.*--image_column"):
        inspect_saev(sae, reader, ds.rename_column("images", "pictures"), InspectionArguments(num_explained=0))

    unweighted = directional_sae(reader, ds)
    with pytest.raises(ValueError, match=r"compute_feature_weights.*--num_explained 0"):
        inspect_saev(unweighted, reader, ds, InspectionArguments())
    with pytest.raises(ValueError, match="compute_feature_weights"):
        explain_rows(unweighted, reader, ds, [0])
    # without weights the features still get pages: the ones that co-occur in the most rows
    inspection = inspect_saev(unweighted, reader, ds, InspectionArguments(num_explained=0, num_top_weighted=2, top_n=1))
    assert not inspection.explanations and len(inspection.features) == 2
    assert all(s.selected_because == "co-occurs in the most rows" for s in inspection.features.values())
    assert inspection.scores["cosine"].isnan().all()


def _chrome():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the browser test needs Chromium and its driver (Debian's "
                    f"chromium chromium-driver). Run `bash .ci/setup`, which installs them.")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `bash .ci/setup` (it installs the dev extra).")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    return driver


def _broken_images(driver):
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")


def test_report_renders_in_a_headless_browser(report):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    inspection, index = report
    row = next(iter(inspection.explanations))
    feature = next(f for f, s in inspection.features.items() if s.top_examples)
    driver = _chrome()
    try:
        driver.get(index.as_uri())
        assert driver.title == "SAE-V inspection"
        assert driver.execute_script("return document.images.length") >= len(inspection.features)
        assert _broken_images(driver) == []

        driver.get((index.parent / "features" / f"feature_{feature}.html").as_uri())
        assert driver.title == f"Feature {feature} \u00b7 SAE-V inspection"
        assert _broken_images(driver) == []
        highlighted = driver.find_elements(By.CSS_SELECTOR, "span.tok.active")
        assert highlighted and all("rgba(255, 110, 0" in h.get_attribute("style") for h in highlighted)
        assert driver.find_elements(By.CSS_SELECTOR, ".example img")  # the heatmaps

        driver.get((index.parent / "examples" / f"example_{row}.html").as_uri())
        assert driver.title == f"Row {row} \u00b7 SAE-V inspection"
        assert _broken_images(driver) == []
        link = driver.find_element(By.CSS_SELECTOR, "table a[href^='../features/feature_']")
        target = link.text
        link.click()
        WebDriverWait(driver, 30).until(expected_conditions.title_is(f"Feature {target} \u00b7 SAE-V inspection"))
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Feature {target}"
    finally:
        driver.quit()


def test_inspect_command_writes_the_report(inspected, tiny_model_factory, tmp_path, capsys):
    tiny, reader, sae, ds, _ = inspected("llava")
    ds.select(range(8)).save_to_disk(tmp_path / "data")
    sae.save_pretrained(tmp_path / "sae")
    out = tmp_path / "report"
    assert main(["inspect", "--sae_name_or_path", str(tmp_path / "sae"), "--model_name_or_path", str(tiny.path),
                 "--dataset_name", str(tmp_path / "data"), "--output_dir", str(out), "--device", "cpu",
                 "--features", "5", "7", "--examples", "2", "--num_examples", "6", "--top_n", "2",
                 "--num_top_weighted", "1", "--batch_size", "4"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    assert (out / "features" / "feature_5.html").exists() and (out / "features" / "feature_7.html").exists()
    assert [p.name for p in (out / "examples").glob("*.html")] == ["example_2.html"]
    assert "rows scanned</td><td>6</td>" in (out / "index.html").read_text(encoding="utf-8")


def test_script_in_dataset_text_is_shown_and_never_run_in_a_browser(report, tmp_path):
    """Dataset text is untrusted: HTML and script in it (in tokens, the dataset's name, a feature page's examples)
    render as text in headless Chromium; nothing of it runs or becomes an element."""
    from selenium.webdriver.common.by import By

    inspection = copy.deepcopy(report[0])
    row = next(iter(inspection.explanations))
    payloads = ['<script>window.pwned = 1; document.title = "pwned"</script>',
                '<img src=x onerror="window.pwned = 2">', '"><svg onload="window.pwned = 3">']
    for i, payload in enumerate(payloads):
        inspection.rows[row].tokens[-1 - i] = payload
    inspection.dataset_name = payloads[1]
    index = write_feature_browser(inspection, tmp_path / "hostile")
    driver = _chrome()
    try:
        for page in (index, tmp_path / "hostile" / "examples" / f"example_{row}.html"):
            driver.get(page.as_uri())
            assert driver.execute_script("return window.pwned === undefined")
            assert driver.title != "pwned"
            assert not driver.find_elements(By.CSS_SELECTOR, "svg[onload], img[onerror], script:not([src])") or \
                all("pwned" not in (e.get_attribute("outerHTML") or "") for e in
                    driver.find_elements(By.CSS_SELECTOR, "svg, img, script"))
        assert payloads[0] in driver.find_element(By.TAG_NAME, "body").text  # shown, as text
    finally:
        driver.quit()


def test_the_logit_lens_reads_each_features_decoder_direction_through_the_unembedding(report, inspected):
    from saev_hf import SAEV, SAEVConfig
    from saev_hf.interpret.logit_lens import feature_logits, final_norm

    tiny, reader, sae, _, inspection = inspected("llava")
    feature = next(iter(inspection.features))
    lens = inspection.features[feature].logit_lens
    assert lens is not None and len(lens.positive) == len(lens.negative) == 10
    norm = final_norm(tiny.model)
    direction = sae.W_dec[feature].float() / sae.config.input_scale * norm.weight.float()
    logits = direction @ tiny.model.get_output_embeddings().weight.float().T
    top = logits.topk(10)
    assert [token for token, _ in lens.positive] == tiny.tokenizer.convert_ids_to_tokens(top.indices.tolist())
    assert [value for _, value in lens.positive] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert [value for _, value in lens.negative] == pytest.approx((-(-logits).topk(10).values).tolist(), rel=1e-5)
    assert lens.positive[0][1] >= lens.positive[-1][1] and lens.negative[0][1] <= lens.negative[-1][1]
    # the feature page shows it
    _, index = report
    page = (index.parent / "features" / f"feature_{feature}.html").read_text(encoding="utf-8")
    assert "What it writes (logit lens)" in page
    with pytest.raises(ValueError, match="writes d_in=32"):
        feature_logits(SAEV(SAEVConfig(d_in=32, d_sae=8)), tiny.model, tiny.tokenizer, [0])
