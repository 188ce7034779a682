"""Take the screenshots shown in the README and docs/interpretation.md, on the embedded demo model (offline, CPU):

    OMP_NUM_THREADS=1 python docs/make_screenshots.py

- `docs/images/explorer.png`: `saev explore` (no model named: the embedded grounded LLaVA and the demo's SAE-V)
  after analysing a held-out scene, with the top feature's heatmap, tokens and page;
- `docs/images/feature_page.png`: the static feature browser's page of that feature (`saev inspect` on 200 held-out
  scene questions, with the labels of `labels.json` where given as the first argument, and a link to the explorer).

It needs the dev extra (selenium) and Chromium with its driver (`bash .ci/setup` installs both).
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

import datasets
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_inspection import _chrome  # noqa: E402  (the browser tests' headless Chromium)

from saev_hf.activations import LayerReader  # noqa: E402
from saev_hf.demo.explorer_default import demo_explorer_sources  # noqa: E402
from saev_hf.demo.run import load_recipe  # noqa: E402
from saev_hf.demo.scenes import DigitScans, question_rows  # noqa: E402
from saev_hf.interpret import InspectionArguments, inspect_saev, write_feature_browser  # noqa: E402
from saev_hf.interpret.explorer import Explorer, build_explorer  # noqa: E402
from saev_hf.interpret.labels import read_labels  # noqa: E402

OUT = REPO / "docs" / "images"


def main() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    labels = read_labels(sys.argv[1]) if len(sys.argv) > 1 else None
    sae, model, processor, examples, title = demo_explorer_sources(progress=False)
    explorer = Explorer(sae, model, processor, labels=labels, examples=examples, title=title)
    # the example with the highest cosine score: one whose text and image share concepts
    image, prompt = max(examples, key=lambda e: explorer.analyze(*e).scores["saev_cosine_score"])
    analysis = explorer.analyze(image, prompt)
    top = next((f for f in analysis.top_features if f.cooccurs), analysis.top_features[0]).feature
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    app = build_explorer(explorer)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    OUT.mkdir(exist_ok=True)
    driver = _chrome()
    try:
        driver.set_window_size(1280, 1900)
        driver.get(url)
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "scene.png"
            image.save(path)
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
            driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='gradio_api/file']"))
            box = driver.find_element(By.CSS_SELECTOR, "textarea")
            box.clear()
            box.send_keys(prompt)
            next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Analyze").click()
            WebDriverWait(driver, 120).until(lambda d: "saev_cosine_score" in body(d))
            WebDriverWait(driver, 60).until(lambda d: "logit lens" in body(d))
            number = driver.find_element(By.CSS_SELECTOR, "input[type=number]")
            number.clear()
            number.send_keys(str(top))
            next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Show feature").click()
            WebDriverWait(driver, 60).until(lambda d: f"Feature {top}" in body(d))
            driver.save_screenshot(str(OUT / "explorer.png"))

            recipe = load_recipe(None)
            scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
            rows = question_rows(scans, 200, "held_out", np.random.default_rng([0, 41]))
            dataset = datasets.Dataset.from_list([{"images": r["images"], "prompt": r["prompt"]} for r in rows])
            reader = LayerReader(model, processor, layer=sae.config.hook_layer)
            inspection = inspect_saev(sae, reader, dataset, InspectionArguments(
                num_examples=None, features=[top], max_features=0, num_explained=0, top_n=6))
            index = write_feature_browser(inspection, Path(folder) / "report", labels=labels, explorer_url=url)
            driver.set_window_size(1100, 1400)
            driver.get((index.parent / "features" / f"feature_{top}.html").as_uri())
            WebDriverWait(driver, 30).until(lambda d: f"Feature {top}" in body(d))
            driver.save_screenshot(str(OUT / "feature_page.png"))
    finally:
        driver.quit()
        app.close()
    print(f"Wrote {OUT / 'explorer.png'} and {OUT / 'feature_page.png'} (feature {top}, prompt {prompt!r})")


if __name__ == "__main__":
    main()
