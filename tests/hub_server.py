"""An in-process, loopback-only stand-in for the Hugging Face Hub, for tests.

No Hub server can be installed for offline tests (the Hub's own server is not distributed), so this module
implements, with the standard library only (``http.server`` in a background thread, bound to 127.0.0.1 on a free port,
storage in memory), the subset of the Hub's HTTP surface that the *real* ``huggingface_hub``, ``transformers`` and
``datasets`` clients use to push and pull model and dataset repos, unchanged, when pointed at its endpoint:

=====================================================  ==================================================
``POST /api/repos/create``                              ``create_repo`` (409 with the ``url`` if it exists)
``POST /api/validate-yaml``                             README metadata check (cards, ``README.md`` commits)
``GET  /api/{type}s/{repo}[/revision/{rev}]``           ``repo_info`` / ``model_info``: ``sha``, ``siblings``
``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``        ``list_repo_tree`` / ``list_repo_files``
``POST /api/{type}s/{repo}/paths-info/{rev}``           ``get_paths_info`` (``HfFileSystem.info``)
``GET  /api/{type}s/{repo}/commits/{rev}``              ``list_repo_commits``
``POST /api/{type}s/{repo}/preupload/{rev}``            upload mode of each file: ``regular`` or ``lfs``
``POST /api/{type}s/{repo}/commit/{rev}``               ``create_commit`` (NDJSON body, ``parentCommit``)
``POST /[datasets/]{repo}.git/info/lfs/objects/batch``  LFS batch API, then ``PUT`` + verify ``/_lfs/{oid}``
``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``    downloads: ETag, X-Repo-Commit, X-Linked-*, Range
=====================================================  ==================================================

Every commit is an immutable snapshot with a 40-hex sha, readable as a revision; the only branch is ``main``.
Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) from which the
clients build their usual exceptions. Files go to LFS where the Hub would put them (the binary extensions of its
default ``.gitattributes``, binary content, 10 MB or more), the others inline. Xet storage is never offered: the
fixture sets ``HF_HUB_DISABLE_XET`` and no response carries Xet headers.

The ``loopback_hub`` fixture starts a fresh server per test, points the already-imported clients at it (see
``_point_clients_at`` for each patch and why) and refuses every connection that is not to a loopback address.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import itertools
import json
import re
import socket
import threading
import traceback
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_loopback_fake_token"
USER = "loopback-user"
LFS_SUFFIXES = frozenset(
    ".7z .arrow .bin .bz2 .ckpt .ftz .gz .h5 .joblib .mlmodel .model .msgpack .npy .npz .onnx .ot .parquet .pb"
    " .pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz .zip .zst".split()
)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in sorted(LFS_SUFFIXES)).encode()
YAML_BLOCK = re.compile(r"^\s*---\r?\n([\S\s]*?)\r?\n---[ \t]*(?:\r?\n|$)")
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}
_API = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"  # API routes
_GIT = r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"  # git-style routes: no prefix for models


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _card_data(content: bytes) -> dict | None:
    match = YAML_BLOCK.match(content.decode("utf-8", "replace"))
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else None


@dataclasses.dataclass(eq=False)
class StoredFile:
    content: bytes
    lfs: bool
    commit: str | None = None  # the last commit that changed the file (None: the one being made)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:  # the git-lfs pointer file that the git repo holds in place of the content
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @cached_property
    def oid(self) -> str:  # the git blob id (of the pointer, for LFS files)
        return _git_oid(self.pointer if self.lfs else self.content)

    def lfs_info(self, sha_key: str) -> dict:
        return {sha_key: self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}


@dataclasses.dataclass
class Commit:
    id: str
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]

    def folders(self) -> set[str]:
        return {p.rsplit("/", i)[0] for p in self.files for i in range(1, p.count("/") + 1)}


@dataclasses.dataclass
class Repo:
    type: str  # "model", "dataset" or "space"
    id: str  # "namespace/name"
    private: bool
    created: str
    commits: list[Commit] = dataclasses.field(default_factory=list)  # oldest first; the last one is `main`

    @property
    def url_prefix(self) -> str:
        return "" if self.type == "model" else f"{self.type}s/"


class Request(NamedTuple):
    match: re.Match
    body: bytes
    query: dict[str, list[str]]
    headers: Any  # email.message.Message

    def arg(self, name: str) -> str:
        return self.query.get(name, [""])[0]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class LoopbackHub:
    """The server: ``endpoint``, ``api`` (an ``HfApi`` bound to it), and accessors to inspect what was pushed."""

    def __init__(self) -> None:
        from huggingface_hub import HfApi

        self.repos: dict[tuple[str, str], Repo] = {}  # (repo type, repo id) -> repo
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, from the LFS uploads
        self.log: list[str] = []  # "METHOD path -> status", one line per request served
        self.errors: list[str] = []  # tracebacks of server-side bugs (answered with a 500)
        self.blocked: list[str] = []  # non-loopback connections refused by the fixture's guard
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.api = HfApi(endpoint=self.endpoint, token=TOKEN)
        threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo: its ``commits``, each with its ``files`` (``StoredFile``: ``content``, ``lfs``...)."""
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of a repo at a revision (``main`` or a commit sha)."""
        return {p: f.content for p, f in self._commit(self.repo(repo_id, repo_type), revision).files.items()}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _repo(self, req: Request) -> Repo:
        repo = self.repos.get((REPO_TYPES[req.match["type"]], unquote(req.match["repo"])))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in ("main", "refs/heads/main"):
            return repo.commits[-1]
        for commit in repo.commits:
            if commit.id == revision:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, title: str, message: str, files: dict[str, StoredFile]) -> Commit:
        sha = hashlib.sha1(f"{repo.type}/{repo.id}/{next(self._counter)}/{_now()}".encode()).hexdigest()
        files = {p: StoredFile(f.content, f.lfs, sha) if f.commit is None else f for p, f in files.items()}
        repo.commits.append(Commit(sha, title, message, _now(), files))
        return repo.commits[-1]

    @staticmethod
    def _path_info(repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            f = commit.files[path]
            info = {"type": "file", "path": path, "size": len(f.content), "oid": f.oid}
            info |= {"lfs": f.lfs_info("oid")} if f.lfs else {}
            last = f.commit
        else:  # a folder, whose last commit is the latest of its files'
            order = {c.id: i for i, c in enumerate(repo.commits)}
            last = max((f.commit for p, f in commit.files.items() if p.startswith(path + "/")), key=order.__getitem__)
            info = {"type": "directory", "path": path, "size": 0, "oid": _git_oid(f"{commit.id}:{path}".encode())}
        if expand:
            c = next(c for c in repo.commits if c.id == last)
            info["lastCommit"] = {"id": c.id, "title": c.title, "date": c.date}
        return info

    # -- routes ----------------------------------------------------------------------------------------------------
    def create_repo(self, req: Request):
        self._require_auth(req)
        payload = json.loads(req.body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, private, _now())
        url = f"{self.endpoint}/{repo.url_prefix}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}
        self._new_commit(repo, "initial commit", "", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, req: Request):
        try:
            match = YAML_BLOCK.match(json.loads(req.body).get("content", ""))
            if match and not isinstance(yaml.safe_load(match.group(1)), (dict, type(None))):
                raise yaml.YAMLError("the metadata must be a YAML mapping")
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": str(e)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def repo_info(self, req: Request):
        repo = self._repo(req)
        commit = self._commit(repo, req.match["rev"] or "main")
        siblings = []
        for path, f in sorted(commit.files.items()):
            siblings.append({"rfilename": path})
            if "blobs" in req.query:  # files_metadata=True
                siblings[-1] |= {"size": len(f.content), "blobId": f.oid}
                siblings[-1] |= {"lfs": f.lfs_info("sha256")} if f.lfs else {}
        readme = commit.files.get("README.md")
        card_data = _card_data(readme.content) if readme else None
        return 200, {
            "id": repo.id, "author": repo.id.split("/")[0], "sha": commit.id, "private": repo.private,
            "gated": False, "disabled": False, "createdAt": repo.created, "lastModified": commit.date,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "cardData": card_data,
        }

    def tree(self, req: Request):
        repo = self._repo(req)
        commit = self._commit(repo, req.match["rev"])
        base, folders = unquote(req.match["path"] or "").strip("/"), commit.folders()
        if base and base not in folders:
            raise HubError(404, f"{base} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.id})
        prefix, recursive = base + "/" if base else "", _true(req.arg("recursive"))
        paths = [p for p in sorted([*folders, *commit.files]) if p.startswith(prefix)]
        paths = [p for p in paths if recursive or "/" not in p[len(prefix) :]]
        return 200, [self._path_info(repo, commit, p, _true(req.arg("expand"))) for p in paths]

    def paths_info(self, req: Request):
        repo = self._repo(req)
        commit = self._commit(repo, req.match["rev"])
        form = parse_qs(req.body.decode())
        paths = [p.strip("/") for p in form.get("paths", [])]
        expand, known = _true(form.get("expand", [""])[0]), commit.folders() | set(commit.files)
        return 200, [self._path_info(repo, commit, p, expand) for p in paths if p in known]

    def commits(self, req: Request):
        repo = self._repo(req)
        history = repo.commits[: repo.commits.index(self._commit(repo, req.match["rev"])) + 1]
        return 200, [
            {"id": c.id, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
            for c in reversed(history)
        ]

    def preupload(self, req: Request):
        self._require_auth(req)
        commit = self._commit(self._repo(req), req.match["rev"])
        out = []
        for f in json.loads(req.body)["files"]:
            suffix, sample = Path(f["path"]).suffix.lower(), base64.b64decode(f["sample"])
            lfs = f["size"] >= LFS_MIN_SIZE or suffix in LFS_SUFFIXES or b"\0" in sample
            old = commit.files.get(f["path"])  # its oid lets the client skip unchanged files
            oid = None if old is None else old.sha256 if old.lfs else old.oid
            mode = "lfs" if lfs else "regular"
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": commit.id}

    def commit(self, req: Request):
        self._require_auth(req)
        if _true(req.arg("create_pr")):
            raise HubError(400, "pull requests are not supported by the loopback hub")
        repo = self._repo(req)
        head = self._commit(repo, req.match["rev"])
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if head is not repo.commits[-1]:
            raise HubError(400, "commits can only be made on the main branch")
        if header.get("parentCommit") not in (None, head.id):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}. Please retry.")
        files = dict(head.files)
        for key, value in ((line["key"], line["value"]) for line in lines if line["key"] != "header"):
            path = value.get("path", "").strip("/")
            if key == "file":
                raw = value["content"]
                new = StoredFile(base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode(), False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"The LFS object of {path} ({value['oid']}) was never uploaded")
                new = StoredFile(self.lfs_objects[value["oid"]], True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                continue
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path + "/")}
                continue
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
            old = files.get(path)  # an unchanged file keeps its last commit
            files[path] = old if old and (old.content, old.lfs) == (new.content, new.lfs) else new
        sha = self._new_commit(repo, header.get("summary", ""), header.get("description", ""), files).id
        url = f"{self.endpoint}/{repo.url_prefix}{repo.id}/commit/{sha}"
        return 200, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}

    def lfs_batch(self, req: Request):
        self._require_auth(req)
        self._repo(req)
        objects = []
        for obj in json.loads(req.body)["objects"]:
            objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True})
            if obj["oid"] not in self.lfs_objects:  # no "actions": already uploaded
                href = f"{self.endpoint}/_lfs/{obj['oid']}"
                upload, verify = {"href": href, "header": {}}, {"href": href + "/verify", "header": {}}
                objects[-1]["actions"] = {"upload": upload, "verify": verify}
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, req: Request):
        if hashlib.sha256(req.body).hexdigest() != req.match["oid"]:
            raise HubError(400, "The uploaded content does not match its sha256")
        self.lfs_objects[req.match["oid"]] = req.body
        return 200, b""

    def lfs_verify(self, req: Request):
        if len(self.lfs_objects.get(req.match["oid"], b"")) != json.loads(req.body)["size"]:
            raise HubError(404, f"LFS object {req.match['oid']} not found")
        return 200, {"success": True}

    def resolve(self, req: Request):
        commit = self._commit(self._repo(req), req.match["rev"])
        f = commit.files.get(unquote(req.match["path"]))
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{f.sha256 if f.lfs else f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.content))}
        size = len(f.content)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (req.headers.get("Range") or "").strip())
        if not match or not (match[1] or match[2]):
            return 200, f.content, headers
        if match[1]:  # bytes=start-[end]
            start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        else:  # bytes=-suffix_length
            start, end = max(size - int(match[2]), 0), size - 1
        if start >= size or start > end:
            return 416, b"", headers | {"Content-Range": f"bytes */{size}"}
        return 206, f.content[start : end + 1], headers | {"Content-Range": f"bytes {start}-{end}/{size}"}

    @staticmethod
    def _require_auth(req: Request) -> None:
        if not (req.headers.get("Authorization") or "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    ROUTES = [  # (method, path regex, handler); HEAD is served as GET without the body
        ("POST", r"/api/repos/create", create_repo),
        ("POST", r"/api/validate-yaml", validate_yaml),
        ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", repo_info),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", tree),
        ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", paths_info),
        ("GET", _API + r"/commits/(?P<rev>[^/]+)", commits),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)", preupload),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)", commit),
        ("POST", _GIT + r"\.git/info/lfs/objects/batch", lfs_batch),
        ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", lfs_put),
        ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", lfs_verify),
        ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", resolve),
    ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the clients pool their connections
    timeout = 60

    def _dispatch(self) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        req_method, body = "GET" if self.command == "HEAD" else self.command, self._read_body()
        status, payload, headers = 404, {"error": f"No route for {self.command} {url.path}"}, {}
        try:
            for method, pattern, handler in LoopbackHub.ROUTES:
                if method == req_method and (match := re.fullmatch(pattern, url.path)):
                    with hub.lock:
                        status, payload, *rest = handler(hub, Request(match, body, parse_qs(url.query), self.headers))
                    headers = rest[0] if rest else {}
                    break
        except HubError as e:
            status, payload = e.status, {"error": str(e)}
            message = str(e).encode("ascii", "replace").decode()  # headers are latin-1
            headers = {**e.headers, "X-Error-Message": message, **({"X-Error-Code": e.code} if e.code else {})}
        except Exception:
            hub.errors.append(traceback.format_exc())
            status, payload, headers = 500, {"error": "Loopback hub bug: see LoopbackHub.errors"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        content_type = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        self.server.hub.log.append(f"{self.command} {self.path} -> {code}")  # type: ignore[attr-defined]


# -- the fixture -------------------------------------------------------------------------------------------------------
def _is_loopback(host: Any) -> bool:
    if host is None:  # a passive lookup (to bind), not a remote name
        return True
    host = (host.decode() if isinstance(host, bytes) else str(host)).strip("[]").split("%")[0].lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard_network(hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse, and record in ``hub.blocked``, every name lookup or connection that is not for a loopback address.

    ``socket.getaddrinfo`` and ``socket.socket.connect``/``connect_ex`` are where all clients end up:
    ``socket.create_connection`` (httpcore behind httpx/httpx2, urllib), asyncio (aiohttp) and raw sockets alike.
    """
    real_getaddrinfo = socket.getaddrinfo

    def check(host: Any, what: str) -> None:
        if not _is_loopback(host):
            hub.blocked.append(f"{what} of {host!r}")
            raise ConnectionRefusedError(f"loopback_hub refused a {what} of {host!r}: tests stay on 127.0.0.1")

    def getaddrinfo(host, *args, **kwargs):
        check(host, "name lookup")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                check(address[0], "connection")
            return real(sock, address)

        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))


def _point_clients_at(hub: LoopbackHub, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the clients talk to ``hub``, authenticated with a fake token, and cache under ``home``, for one test.

    The libraries read their environment once, at import time, into module constants (and a few long-lived objects):
    the environment variables only reach code imported later, so the constants and objects are patched too.
    ``monkeypatch`` puts everything back after the test.
    """
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    hub_cache, datasets_cache = home / "hub", home / "datasets"
    env = {
        "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache), "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_TOKEN_PATH": str(home / "token"), "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Offline switches (the test must reach the loopback hub), and variables that would take precedence over ours.
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN",
                "HF_OIDC_RESOURCE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)

    for name, value in {
        # URLs: ENDPOINT is the base of every call of an HfApi(endpoint=None), of RepoCard.validate, and of the
        # download URL template (`hf_hub_url` fills the template, then swaps ENDPOINT for an explicit endpoint).
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        # Offline mode would block every request (`hf_request_event_hook`); Xet would bypass the LFS protocol
        # (`is_xet_available()` reads this constant); a user-set HF_HUB_DISABLE_IMPLICIT_TOKEN would drop the token.
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
        # Caches and token files: nothing may come from, or leak into, the user's cache or another test's.
        "HF_HOME": str(home), "HF_HUB_CACHE": str(hub_cache), "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    # `huggingface_hub.create_repo`, `upload_file`, ... are bound methods of a module-level HfApi() whose endpoint was
    # frozen at import time; ModelCard.push_to_hub goes through them.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)

    try:  # transformers routes its Hub calls through a shared HfApi built on first use: drop it, for a fresh one
        import transformers.utils.hub
    except ImportError:
        pass
    else:
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)

    try:  # datasets copies its settings into `datasets.config` at import time
        import datasets.config
        from huggingface_hub import HfFileSystem
    except ImportError:
        return
    downloads = datasets_cache / "downloads"
    for name, value in {
        "HF_ENDPOINT": hub.endpoint,  # for its HfApi(endpoint=...) and HfFileSystem(endpoint=...)
        "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False,
        # The dataset viewer is another host ("datasets-server." + the endpoint's host) which we do not serve, and
        # download counts are a HEAD to s3.amazonaws.com: neither must be tried.
        "USE_PARQUET_EXPORT": False, "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": datasets_cache, "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": downloads, "EXTRACTED_DATASETS_PATH": downloads / "extracted",
    }.items():
        monkeypatch.setattr(datasets.config, name, value)
    HfFileSystem.clear_instance_cache()  # instances are cached (per endpoint, token, thread) with their listings


@pytest.fixture
def loopback_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh :class:`LoopbackHub`, used by the real clients for the duration of one test.

    Yields the hub: ``.endpoint`` (``"http://127.0.0.1:PORT"``), ``.api`` (an ``HfApi`` bound to it, with the fake
    token), ``.files(repo_id, repo_type="model", revision="main")`` (``{path: bytes}``), ``.repo(repo_id, repo_type)``
    (its commits and stored files, with their LFS flag) and ``.log`` (the requests served). The test fails if
    anything tried to reach beyond loopback (``.blocked``) or if the server hit a bug (``.errors``).
    """
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import close_session

    hub = LoopbackHub()
    try:
        _guard_network(hub, monkeypatch)
        _point_clients_at(hub, tmp_path / "hf_home", monkeypatch)
        close_session()  # start from a fresh connection pool
        yield hub
    finally:
        close_session()  # drop the keep-alive connections to this server, which ends its handler threads
        HfFileSystem.clear_instance_cache()
        hub.close()
    assert not hub.blocked, f"connections beyond loopback were attempted: {hub.blocked}"
    assert not hub.errors, "the loopback hub failed:\n" + "\n".join(hub.errors)
