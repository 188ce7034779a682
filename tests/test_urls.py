"""Images given as URLs: fetched concurrently, checked, cached by content, with a failure policy and a report.

Every test runs a real HTTP server on 127.0.0.1 (`saev_hf.testing.image_server`) serving good images and the web's
faults: 404s, responses slower than the read timeout, truncated bodies, HTML instead of an image, redirects, oversized
bodies, a flaky 503 and bytes that are not an image.
"""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from saev_hf.data import FetchSettings, ImageFetcher, RowError, fetch_images
from saev_hf.data.urls import REPORT_FILE, FetchReport
from saev_hf.testing.digit_data import digit_images
from saev_hf.testing.image_server import ImageServer


@pytest.fixture
def server():
    with ImageServer(slow_seconds=2.0, oversized_bytes=300_000) as image_server:
        for i, (image, _) in enumerate(digit_images(6, seed=3)):
            image_server.add_image(f"d{i}.png", image.resize((32, 32)))
        image_server.add_image("photo.jpg", digit_images(1, seed=4)[0][0].resize((32, 32)))
        yield image_server


def settings(tmp_path, **overrides):
    values = dict(workers=4, read_timeout=0.5, retries=1, backoff=0.01, max_bytes=200_000,
                  cache_dir=str(tmp_path / "image-cache"), allow_private_urls=True)
    return FetchSettings(**{**values, **overrides})


def test_each_fault_is_named_and_good_images_are_the_served_pixels(server, tmp_path):
    fetcher = ImageFetcher(settings(tmp_path))
    urls = {
        "good": f"{server.url}/images/d0.png", "jpeg": f"{server.url}/images/photo.jpg",
        "redirect": f"{server.url}/redirect/d1.png", "flaky": f"{server.url}/flaky/d2.png",
        "missing": f"{server.url}/missing/x.png", "slow": f"{server.url}/slow/d3.png",
        "truncated": f"{server.url}/truncated/d4.png", "html": f"{server.url}/html/page",
        "oversized": f"{server.url}/oversized/d5.png", "garbage": f"{server.url}/garbage/x.png",
    }
    results = dict(zip(urls, fetcher.fetch_many(list(urls.values()))))
    for name in ("good", "jpeg", "redirect", "flaky"):
        assert results[name].ok, (name, results[name])
    served = Image.open(__import__("io").BytesIO(server.images["d0.png"])).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(results["good"].path).convert("RGB")), np.asarray(served))
    assert results["redirect"].path.endswith(".png") and results["jpeg"].path.endswith(".jpg")
    assert {name: results[name].kind for name in ("missing", "slow", "truncated", "html", "oversized", "garbage")} == {
        "missing": "http 404", "slow": "timeout", "truncated": "truncated body", "html": "not an image",
        "oversized": "too large", "garbage": "undecodable"}
    # retried: the flaky URL (503 once, then the image) and the slow one (past the timeout each time)
    assert server.requests["/flaky/d2.png"] == 2 and server.requests["/slow/d3.png"] == 2
    assert server.requests["/missing/x.png"] == 1  # a 404 is final: no retry


def test_a_rerun_requests_nothing_again_but_retries_what_may_pass(server, tmp_path):
    urls = [f"{server.url}/images/d0.png", f"{server.url}/images/d0.png", f"{server.url}/missing/x.png",
            f"{server.url}/slow/d3.png", f"{server.url}/redirect/d1.png"]
    first = ImageFetcher(settings(tmp_path, retries=0))
    first_results = first.fetch_many(urls)
    assert first.requests_made == 5  # d0 once (a duplicate URL is fetched once), redirect = 2 requests
    second = ImageFetcher(settings(tmp_path, retries=0))
    second_results = second.fetch_many(urls)
    assert second.requests_made == 1  # only the timed-out URL: a timeout may pass, so it is not recorded
    assert [r.path for r in second_results] == [r.path for r in first_results]
    assert [r.kind for r in second_results] == [None, None, "http 404", "timeout", None]
    assert all(r.from_cache for i, r in enumerate(second_results) if i != 3)
    # identical bytes behind two URLs are stored once
    server.add_image("copy.png", Image.open(first_results[0].path))
    assert ImageFetcher(settings(tmp_path)).fetch(f"{server.url}/images/copy.png").path == first_results[0].path


def test_a_damaged_cached_image_is_fetched_again(server, tmp_path):
    url = f"{server.url}/images/d0.png"
    path = ImageFetcher(settings(tmp_path)).fetch(url).path
    with open(path, "r+b") as file:
        file.write(b"xx")
    again = ImageFetcher(settings(tmp_path))
    result = again.fetch(url)
    assert result.ok and not result.from_cache and again.requests_made == 1


def test_private_addresses_are_refused_unless_allowed(server, tmp_path):
    result = ImageFetcher(settings(tmp_path, allow_private_urls=False)).fetch(f"{server.url}/images/d0.png")
    assert result.kind == "private address" and "--allow_private_urls" in result.detail
    assert server.requests["/images/d0.png"] == 0
    assert ImageFetcher(settings(tmp_path)).fetch("ftp://example.org/a.png").kind == "not an http url"


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="workers and max_bytes at least 1"):
        FetchSettings(workers=0)


def url_rows(server):
    return {
        "images": [[f"{server.url}/images/d0.png"], [f"{server.url}/missing/a.png", f"{server.url}/images/d1.png"],
                   [f"{server.url}/html/p"], [f"{server.url}/images/d2.png"]],
        "prompt": ["a", "b", "c", "d"],
    }


def test_the_error_policy_names_the_row_the_url_and_the_fix(server, tmp_path):
    dataset = datasets.Dataset.from_dict(url_rows(server))
    with pytest.raises(RowError, match=r"Row 1: image 0 \(http://127\.0\.0\.1:\d+/missing/a\.png\) could not be "
                                       r"fetched: http 404.*--image_failure_policy skip_image"):
        fetch_images(dataset, "images", ImageFetcher(settings(tmp_path)), "error")


def test_skip_image_and_skip_row_count_what_they_leave_out_and_write_the_report(server, tmp_path):
    dataset = datasets.Dataset.from_dict(url_rows(server))
    skipped, report = fetch_images(dataset, "images", ImageFetcher(settings(tmp_path)), "skip_image")
    assert [len(images) for images in skipped["images"]] == [1, 1, 0, 1]
    assert isinstance(skipped[0]["images"][0], Image.Image)  # the cached files decode like any image column
    assert skipped.features["images"] == datasets.List(datasets.Image())
    assert (report.urls, report.fetched, report.failed, report.images_dropped, report.rows_dropped) == (5, 3, 2, 2, 0)
    assert report.failed_by_reason == {"http 404": 1, "not an image": 1}
    assert [(s["row"], s["reason"]) for s in report.failed_sample] == [(1, "http 404"), (2, "not an image")]

    rows, report = fetch_images(dataset, "images", ImageFetcher(settings(tmp_path)), "skip_row")
    assert list(rows["prompt"]) == ["a", "d"] and report.rows_dropped == 2
    assert (report.fetched, report.from_cache, report.failed) == (0, 3, 2)  # failures for good are recorded too
    written = json.loads((report.write(tmp_path)).read_text())
    assert written == {key: value for key, value in json.loads(json.dumps(report.__dict__)).items() if key != "spool"}
    assert (tmp_path / REPORT_FILE).exists()
    assert "2 rows left out" in report.summary()


def test_skip_image_takes_the_image_part_out_of_a_document(server, tmp_path):
    dataset = datasets.Dataset.from_dict({
        "images": [[f"{server.url}/images/d0.png", f"{server.url}/missing/b.png"]],
        "prompt": [[{"type": "image", "text": None}, {"type": "text", "text": "first"},
                    {"type": "image", "text": None}, {"type": "text", "text": "second"}]],
    })
    fetched, report = fetch_images(dataset, "images", ImageFetcher(settings(tmp_path)), "skip_image")
    assert [part["type"] for part in fetched[0]["prompt"]] == ["image", "text", "text"]
    assert len(fetched[0]["images"]) == 1 and report.images_dropped == 1


def test_a_stream_fetches_lazily_as_rows_are_read(server, tmp_path):
    stream = datasets.Dataset.from_dict(url_rows(server)).to_iterable_dataset()
    fetcher = ImageFetcher(settings(tmp_path))
    fetched, report = fetch_images(stream, "images", fetcher, "skip_row")
    assert fetcher.requests_made == 0 and report.urls == 0
    assert [row["prompt"] for row in fetched] == ["a", "d"]
    assert report.urls == 5 and report.rows_dropped == 2


def test_an_empty_report_sums_up_to_nothing():
    assert FetchReport().summary().startswith("Image URLs: 0 (0 fetched")


def test_a_stream_read_in_a_dataloader_worker_is_counted_in_the_report(server, tmp_path):
    import torch

    stream = datasets.Dataset.from_dict(url_rows(server)).to_iterable_dataset()
    fetched, report = fetch_images(stream, "images", ImageFetcher(settings(tmp_path)), "skip_image")
    rows = list(torch.utils.data.DataLoader(fetched, batch_size=None, num_workers=1))
    assert [row["prompt"] for row in rows] == ["a", "b", "c", "d"]
    assert report.urls == 0  # this process fetched nothing: the worker did
    merged = report.merged()
    assert (merged.urls, merged.fetched, merged.failed, merged.images_dropped) == (5, 3, 2, 2)
    assert json.loads(report.write(tmp_path).read_text())["urls"] == 5 and "Image URLs: 5" in report.summary()
