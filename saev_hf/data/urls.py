"""Images given as URLs (OBELICS's, many of them dead): fetched concurrently, checked, cached on disk by content.

[`ImageFetcher`] fetches with `requests` (a maintained client; `datasets`' own image decoding reads local files and
bytes, not URLs) in a pool of `workers` threads, each URL with connect and read timeouts, redirects followed (each hop
checked), retries with exponential backoff on what may pass (timeouts, connection errors, 5xx, 429, a truncated body),
a size cap, a content-type check (an HTML error page is not an image) and a decode check (PIL opens and loads it).

The cache holds each image once, named by the SHA-256 of its bytes (`images/ab/<sha256>.<ext>`), and an index from
each URL to its image or to the reason it failed for good (`urls/cd/<sha256 of the URL>.json`): a rerun, or a second
command on the same data, requests nothing again. Failures that may pass (a timeout, a 5xx) are not recorded, so a
rerun tries those URLs again.

Why a step before the model, and not inside the input pipeline: the forward then never waits on the network, a
failure is known (and handled by the policy) before anything is trained on, the report counts every URL, and the
cache makes the step free the second time. On a stream (`streaming=True`) the same step runs lazily as rows are read,
a map batch of URLs at a time, concurrently; with `preprocessing_workers` the reading (so the fetching) runs in a
worker process ahead of the forward.

What happens to an image that cannot be fetched ([`IMAGE_FAILURE_POLICIES`]): `error` stops with an error naming the
row, the URL and why; `skip_image` leaves the image out (a document keeps its text: the image's part goes too); `skip_row`
leaves the row out. Either way it is counted, and [`FetchReport`] (written beside the output as
`image_fetch_report.json`) holds the counts by reason and a sample of the failed URLs. URLs that point to loopback,
private, link-local or reserved addresses are refused unless `allow_private_urls` (a dataset can be crafted to make the
fetcher reach inside a network).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import datasets
import requests
from huggingface_hub.constants import HF_HOME
from PIL import Image

from .errors import RowError

logger = logging.getLogger(__name__)

IMAGE_FAILURE_POLICIES = ("error", "skip_image", "skip_row")
"""What happens to an image whose URL cannot be fetched (`--image_failure_policy`)."""
REPORT_FILE = "image_fetch_report.json"
"""The report written beside a command's output when its data had image URLs."""
DEFAULT_CACHE = Path(os.environ.get("SAEV_HF_IMAGE_CACHE", Path(HF_HOME) / "saev_hf" / "images"))
"""Where fetched images are kept by default (`SAEV_HF_IMAGE_CACHE` overrides it)."""
FETCH_BATCH = 64  # rows whose URLs are fetched together (measured against 16 rows: see benchmarks/url_fetching.py)
MAX_REDIRECTS = 5
SAMPLE_SIZE = 20  # failed URLs kept in a report
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def is_url(value: Any) -> bool:
    """Whether `value` is an http(s) URL (an image to fetch rather than a local path)."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


@dataclass
class FetchSettings:
    """How [`ImageFetcher`] fetches: concurrency, timeouts, retries, limits and where it caches."""

    workers: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20 * 1024 * 1024
    cache_dir: str | None = None
    allow_private_urls: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.retries < 0 or self.max_bytes < 1 or self.connect_timeout <= 0 \
                or self.read_timeout <= 0 or self.backoff < 0:
            raise ValueError(f"Image fetching settings out of range: {asdict(self)} (workers and max_bytes at least 1, "
                             f"retries and backoff at least 0, timeouts positive).")


@dataclass
class FetchResult:
    """One URL's outcome: the cached image's path, or why it failed (`kind`: a short reason, e.g. `http 404`,
    `not an image`, `too large`, `timeout`), and whether it came from the cache without a request."""

    url: str
    path: str | None = None
    kind: str | None = None
    detail: str | None = None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.path is not None


class _Failure(Exception):
    def __init__(self, kind: str, detail: str, permanent: bool) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.permanent = kind, detail, permanent


@dataclass
class FetchReport:
    """What fetching a dataset's image URLs did: counts, failures by reason, a sample of failed URLs, what the
    policy dropped. Live while a stream is read; `write` puts it beside an output."""

    policy: str = "error"
    urls: int = 0
    fetched: int = 0
    from_cache: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    failed_sample: list[dict[str, Any]] = field(default_factory=list)
    images_dropped: int = 0
    rows_dropped: int = 0
    spool: str | None = field(default=None, repr=False)
    """A folder where every process that reads the data (a stream read by a DataLoader worker) appends what it did,
    so that the report counts the URLs fetched in other processes too ([`merged`])."""

    def add(self, result: FetchResult, row: int) -> None:
        """Count one URL's outcome (`row`: the dataset row it belongs to)."""
        self._count({"url": result.url, "ok": result.ok, "from_cache": result.from_cache, "kind": result.kind,
                     "detail": result.detail, "row": row})

    def left_out(self, images: int = 0, rows: int = 0) -> None:
        """Count what the failure policy left out."""
        self._count({"images_dropped": images, "rows_dropped": rows})

    def _count(self, event: dict[str, Any]) -> None:
        self._apply(event)
        if self.spool is not None:
            with open(Path(self.spool) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps(event) + "\n")

    def _apply(self, event: dict[str, Any]) -> None:
        if "url" not in event:
            self.images_dropped += event["images_dropped"]
            self.rows_dropped += event["rows_dropped"]
            return
        self.urls += 1
        if event["ok"]:
            self.from_cache += event["from_cache"]
            self.fetched += not event["from_cache"]
            return
        self.failed += 1
        self.failed_by_reason[event["kind"]] = self.failed_by_reason.get(event["kind"], 0) + 1
        if len(self.failed_sample) < SAMPLE_SIZE:
            self.failed_sample.append({"row": event["row"], "url": event["url"], "reason": event["kind"],
                                       "detail": event["detail"]})

    def merged(self) -> "FetchReport":
        """The report of every process that read the data: this one's counts, or, with a spool, all of theirs."""
        if self.spool is None:
            return self
        report = FetchReport(policy=self.policy)
        for path in sorted(Path(self.spool).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                report._apply(json.loads(line))
        return report

    def summary(self) -> str:
        """One line for the end of a command."""
        report = self.merged()
        reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.failed_by_reason.items()))
        return (f"Image URLs: {report.urls} ({report.fetched} fetched, {report.from_cache} from the cache, "
                f"{report.failed} failed{f' ({reasons})' if reasons else ''}); policy {report.policy}: "
                f"{report.images_dropped} images and {report.rows_dropped} rows left out.")

    def write(self, folder: str | os.PathLike) -> Path:
        """Write the report (of every process that read the data) to `folder/image_fetch_report.json`."""
        values = asdict(self.merged())
        values.pop("spool")
        path = Path(folder) / REPORT_FILE
        path.write_text(json.dumps(values, indent=2) + "\n")
        return path


class ImageFetcher:
    """
    Fetches image URLs into a content-addressed disk cache (see the module docstring).

    Example:

    ```python
    fetcher = ImageFetcher(FetchSettings(workers=8, cache_dir="image-cache"))
    results = fetcher.fetch_many(["https://example.org/a.jpg", "https://example.org/b.png"])
    [result.path for result in results]  # local files, or None with result.kind saying why
    ```
    """

    def __init__(self, settings: FetchSettings | None = None) -> None:
        self.settings = settings or FetchSettings()
        self.cache = Path(self.settings.cache_dir) if self.settings.cache_dir else DEFAULT_CACHE
        self._local = threading.local()
        self.requests_made = 0  # HTTP requests sent (for tests and benchmarks: a rerun makes none)
        self._lock = threading.Lock()

    def fetch_many(self, urls: list[str]) -> list[FetchResult]:
        """Every URL of `urls`, fetched concurrently (each distinct URL once), in their order."""
        distinct = list(dict.fromkeys(urls))
        with ThreadPoolExecutor(max_workers=min(self.settings.workers, max(len(distinct), 1))) as pool:
            results = dict(zip(distinct, pool.map(self.fetch, distinct)))
        return [results[url] for url in urls]

    def fetch(self, url: str) -> FetchResult:
        """One URL: from the cache's index, or fetched (with retries), checked and stored."""
        recorded = self._recorded(url)
        if recorded is not None:
            return recorded
        attempt = 0
        while True:
            try:
                data = self._download(url)
                path = self._store(url, data)
                return FetchResult(url, path=str(path))
            except _Failure as failure:
                if failure.permanent or attempt >= self.settings.retries:
                    if failure.permanent:
                        self._record(url, {"url": url, "error": failure.kind, "detail": failure.detail})
                    return FetchResult(url, kind=failure.kind, detail=failure.detail)
                time.sleep(self.settings.backoff * 2 ** attempt)
                attempt += 1

    # --- the request ---------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = "saev-hf image fetcher"
        return session

    def _download(self, url: str) -> bytes:
        timeout = (self.settings.connect_timeout, self.settings.read_timeout)
        for _ in range(MAX_REDIRECTS + 1):
            self._check_address(url)
            with self._lock:
                self.requests_made += 1
            try:
                response = self._session().get(url, timeout=timeout, stream=True, allow_redirects=False)
            except requests.Timeout as error:
                raise _Failure("timeout", str(error), permanent=False) from error
            except requests.RequestException as error:
                raise _Failure("connection error", str(error), permanent=False) from error
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                return self._body(url, response)
        raise _Failure("too many redirects", f"more than {MAX_REDIRECTS} redirects", permanent=True)

    def _body(self, url: str, response: requests.Response) -> bytes:
        status = response.status_code
        if status >= 400:
            raise _Failure(f"http {status}", f"HTTP {status} {response.reason}",
                           permanent=status < 500 and status != 429)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type and not content_type.startswith("image/"):
            raise _Failure("not an image", f"Content-Type {content_type}", permanent=True)
        declared = response.headers.get("Content-Length")
        if declared is not None and int(declared) > self.settings.max_bytes:
            raise _Failure("too large", f"{declared} bytes > max {self.settings.max_bytes}", permanent=True)
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > self.settings.max_bytes:
                    raise _Failure("too large", f"more than {self.settings.max_bytes} bytes", permanent=True)
                chunks.append(chunk)
        except requests.Timeout as error:
            raise _Failure("timeout", str(error), permanent=False) from error
        except requests.RequestException as error:  # a body cut short ("IncompleteRead")
            raise _Failure("truncated body", str(error), permanent=False) from error
        data = b"".join(chunks)
        if declared is not None and len(data) != int(declared):
            raise _Failure("truncated body", f"{len(data)} of {declared} bytes", permanent=False)
        return data

    def _check_address(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Failure("not an http url", url, permanent=True)
        if self.settings.allow_private_urls:
            return
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
        except socket.gaierror as error:
            raise _Failure("unknown host", str(error), permanent=False) from error
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
                raise _Failure("private address", f"{parts.hostname} resolves to {ip}: refused (pass "
                               f"--allow_private_urls to fetch from private or loopback addresses)", permanent=True)

    # --- the cache -----------------------------------------------------------------------------------------------

    def _store(self, url: str, data: bytes) -> Path:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.load()
        except Exception as error:  # PIL raises many kinds: all mean the bytes are not a readable image
            raise _Failure("undecodable", f"{type(error).__name__}: {error}", permanent=True) from error
        digest = hashlib.sha256(data).hexdigest()
        path = self.cache / "images" / digest[:2] / f"{digest}.{EXTENSIONS.get(image_format, 'img')}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        self._record(url, {"url": url, "sha256": digest, "file": str(path.relative_to(self.cache))})
        return path

    def _index_path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()
        return self.cache / "urls" / digest[:2] / f"{digest}.json"

    def _record(self, url: str, record: dict[str, Any]) -> None:
        path = self._index_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)

    def _recorded(self, url: str) -> FetchResult | None:
        path = self._index_path(url)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if "error" in record:
            return FetchResult(url, kind=record["error"], detail=record.get("detail"), from_cache=True)
        image = self.cache / record["file"]
        if not image.is_file() or hashlib.sha256(image.read_bytes()).hexdigest() != record["sha256"]:
            return None  # the cached image is gone or damaged: fetch it again
        return FetchResult(url, path=str(image), from_cache=True)


def fetch_images(dataset: Any, column: str, fetcher: ImageFetcher, policy: str = "error",
                 prompt_column: str = "prompt") -> tuple[Any, FetchReport]:
    """
    `dataset` with the image URLs of `column` replaced by the paths of their cached files, and the live
    [`FetchReport`]. A row's URLs are fetched with those of its map batch, concurrently; `policy` says what a failure
    does (see the module docstring). A document's image that is left out takes its image part in `prompt_column` with
    it. Works on a `datasets.Dataset` (every URL fetched now; the map is not cached by `datasets`, since the image
    cache makes it cheap and the report must count every URL) and on an `IterableDataset` (as rows are read).
    """
    if policy not in IMAGE_FAILURE_POLICIES:
        raise ValueError(f"image_failure_policy={policy!r} must be one of {IMAGE_FAILURE_POLICIES}.")
    streamed = not hasattr(dataset, "__len__")  # a stream may be read by a DataLoader worker: spool its counts
    report = FetchReport(policy=policy, spool=tempfile.mkdtemp(prefix="saev-hf-fetch-report-") if streamed else None)

    def resolve(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        values = batch[column]
        urls = [url for value in values for url in _as_list(value) if is_url(url)]
        results = iter(fetcher.fetch_many(urls))
        keep, images, prompts = [], [], list(batch.get(prompt_column, [None] * len(values)))
        for position, (value, row) in enumerate(zip(values, indices)):
            row_images, failed = [], []
            for image_index, item in enumerate(_as_list(value)):
                if not is_url(item):
                    row_images.append(item)
                    continue
                result = next(results)
                report.add(result, row)
                if result.ok:
                    row_images.append(result.path)
                else:
                    failed.append((image_index, result))
            if failed and policy == "error":
                index, result = failed[0]
                raise RowError(f"Row {row}: image {index} ({result.url}) could not be fetched: {result.kind} "
                               f"({result.detail}). Pass --image_failure_policy skip_image (the row keeps its text) or "
                               f"skip_row (the row is left out); both are counted in {REPORT_FILE}.")
            if failed and policy == "skip_row":
                report.left_out(rows=1)
                keep.append(False)
                continue
            if failed:
                report.left_out(images=len(failed))
            if failed and _is_parts(prompts[position]):
                prompts[position] = _without_images(prompts[position], {index for index, _ in failed})
            keep.append(True)
            images.append(row_images if isinstance(value, (list, tuple)) else (row_images[0] if row_images else None))
        out = {name: [v for v, k in zip(vals, keep) if k] for name, vals in batch.items()}
        out[column] = images
        if prompt_column in batch:
            out[prompt_column] = [p for p, k in zip(prompts, keep) if k]
        return out

    kwargs: dict[str, Any] = {"batched": True, "batch_size": FETCH_BATCH, "with_indices": True}
    features = getattr(dataset, "features", None)
    if features is not None and column in features:
        kwargs["features"] = datasets.Features({**features, column: _as_image_feature(features[column])})
    if hasattr(dataset, "__len__"):  # the fetcher does not pickle: a fingerprint of what the map depends on instead
        identity = f"{getattr(dataset, '_fingerprint', '')}|{column}|{prompt_column}|{policy}|{fetcher.cache}"
        kwargs.update(load_from_cache_file=False, desc="Fetching image URLs",
                      new_fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:16])
    return dataset.map(resolve, **kwargs), report


def _as_image_feature(feature: Any) -> Any:
    """The feature of an image column once its URLs are cached files: `datasets.Image` where it held strings (a
    column of paths decodes into PIL images like any other image column), lists kept as lists."""
    if isinstance(feature, (datasets.List, datasets.Sequence)):
        return datasets.List(_as_image_feature(feature.feature))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return datasets.Image()
    return feature


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _is_parts(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(p, dict) and "type" in p for p in prompt)


def _without_images(parts: list[dict[str, Any]], dropped: set[int]) -> list[dict[str, Any]]:
    """A document's parts without its image parts number `dropped` (0-based among its images)."""
    kept, seen = [], 0
    for part in parts:
        if part["type"] == "image":
            seen += 1
            if seen - 1 in dropped:
                continue
        kept.append(part)
    return kept
