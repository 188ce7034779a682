"""The loopback Hub (tests/hub_server.py) against the real huggingface_hub, transformers and datasets clients."""

import hashlib
import http.client
import socket
from urllib.parse import urlsplit

import pytest
import torch
from hub_server import loopback_hub  # noqa: F401
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    ModelCard,
    ModelCardData,
    create_repo,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    upload_file,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session


def tiny_bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99
    )
    return transformers.BertModel(config).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_upload_and_download_bytes(loopback_hub):
    api = loopback_hub.api
    url = create_repo("org/files")  # the module-level function (HfApi built at import time)
    assert url.repo_id == "org/files" and url.startswith(loopback_hub.endpoint)
    text, blob = b"hello loopback\n", bytes(range(256)) * 50  # a text file (inline) and a binary one (LFS)
    upload_file(path_or_fileobj=text, path_in_repo="dir/hello.txt", repo_id="org/files")
    info = api.upload_file(path_or_fileobj=blob, path_in_repo="weights.bin", repo_id="org/files")
    assert loopback_hub.repo("org/files").commits[-1].files["weights.bin"].lfs
    assert loopback_hub.files("org/files")["weights.bin"] == blob

    assert open(hf_hub_download("org/files", "dir/hello.txt"), "rb").read() == text
    assert open(hf_hub_download("org/files", "weights.bin", revision=info.oid), "rb").read() == blob
    assert sorted(api.list_repo_files("org/files")) == [".gitattributes", "dir/hello.txt", "weights.bin"]
    model_info = api.model_info("org/files", files_metadata=True)
    assert model_info.sha == info.oid
    sizes = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in model_info.siblings}
    assert sizes["weights.bin"][0] == len(blob) and sizes["dir/hello.txt"] == (len(text), None)
    assert api.file_exists("org/files", "dir/hello.txt") and not api.file_exists("org/files", "nope.txt")
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree("org/files", expand=True)}
    assert tree == {".gitattributes": "RepoFile", "dir": "RepoFolder", "weights.bin": "RepoFile"}

    folder = snapshot_download("org/files")
    assert open(f"{folder}/dir/hello.txt", "rb").read() == text and open(f"{folder}/weights.bin", "rb").read() == blob

    # a commit mixing an inline file, an LFS file and a deletion; the old revision stays readable
    api.create_commit(
        "org/files",
        operations=[
            CommitOperationAdd("dir/other.txt", b"other"),
            CommitOperationAdd("big.safetensors", b"\x00" * 1000),
            CommitOperationDelete("dir/hello.txt"),
        ],
        commit_message="mixed",
    )
    assert set(loopback_hub.files("org/files")) == {".gitattributes", "weights.bin", "dir/other.txt", "big.safetensors"}
    assert loopback_hub.repo("org/files").commits[-1].files["big.safetensors"].lfs
    old_path = hf_hub_download("org/files", "dir/hello.txt", revision=info.oid, force_download=True)
    assert open(old_path, "rb").read() == text
    assert [c.title for c in api.list_repo_commits("org/files")][0] == "mixed"

    # Range requests (HfFileSystem reads files by blocks)
    from huggingface_hub import HfFileSystem

    with HfFileSystem(endpoint=loopback_hub.endpoint).open("org/files/weights.bin", block_size=100) as f:
        f.seek(1000)
        assert f.read(300) == blob[1000:1300]
    # chunked request bodies (not what httpx2 sends today, but valid HTTP/1.1 that a client may use)
    data = b"sent in chunks"
    oid = hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection(*urlsplit(loopback_hub.endpoint).netloc.split(":"))
    conn.request("PUT", f"/_lfs/{oid}", body=iter([data[:4], data[4:]]), encode_chunked=True)
    assert conn.getresponse().status == 200 and loopback_hub.lfs_objects[oid] == data
    conn.close()

    url = hf_hub_url("org/files", "weights.bin")
    assert get_session().get(url, headers={"Range": "bytes=-10"}).content == blob[-10:]
    assert get_session().get(url, headers={"Range": f"bytes={len(blob)}-"}).status_code == 416


def test_dataset_repo_type(loopback_hub):
    api = loopback_hub.api
    api.create_repo("org/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="x.csv", repo_id="org/data", repo_type="dataset")
    assert open(hf_hub_download("org/data", "x.csv", repo_type="dataset"), "rb").read() == b"a,b\n1,2\n"
    assert "x.csv" in api.list_repo_files("org/data", repo_type="dataset")
    assert api.dataset_info("org/data").sha == loopback_hub.repo("org/data", "dataset").commits[-1].id
    with pytest.raises(RepositoryNotFoundError):  # the model repo of that name does not exist
        hf_hub_download("org/data", "x.csv")


def test_errors(loopback_hub):
    loopback_hub.api.create_repo("org/model")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        loopback_hub.api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", ".gitattributes", revision="0" * 40)
    with pytest.raises(HfHubHTTPError) as error:  # exist_ok=False
        loopback_hub.api.create_repo("org/model")
    assert error.value.response.status_code == 409
    assert loopback_hub.api.create_repo("org/model", exist_ok=True).repo_id == "org/model"


def test_transformers_push_and_load(loopback_hub):
    from transformers import AutoConfig, AutoModel, BertModel

    model = tiny_bert()
    model.push_to_hub("org/tiny-bert")
    stored = loopback_hub.repo("org/tiny-bert").commits[-1].files
    assert {"config.json", "model.safetensors", "README.md"} <= set(stored) and stored["model.safetensors"].lfs

    assert_same_weights(model, BertModel.from_pretrained("org/tiny-bert"))
    assert_same_weights(model, AutoModel.from_pretrained("org/tiny-bert"))
    assert AutoConfig.from_pretrained("org/tiny-bert").hidden_size == 32
    # transformers' normal not-found behaviour: an OSError naming the missing file
    with pytest.raises(OSError, match="does not appear to have a file named"):
        BertModel.from_pretrained("org/tiny-bert", subfolder="nowhere")
    with pytest.raises(OSError, match="is not a valid model identifier"):
        AutoConfig.from_pretrained("org/does-not-exist")


def test_transformers_subfolder(loopback_hub, tmp_path):
    from transformers import AutoModel, BertModel

    model = tiny_bert()
    model.save_pretrained(tmp_path / "checkpoint")
    loopback_hub.api.create_repo("org/nested")
    loopback_hub.api.upload_folder(folder_path=tmp_path / "checkpoint", path_in_repo="sub/", repo_id="org/nested")
    assert {"sub/config.json", "sub/model.safetensors"} <= set(loopback_hub.files("org/nested"))
    assert_same_weights(model, BertModel.from_pretrained("org/nested", subfolder="sub"))
    assert_same_weights(model, AutoModel.from_pretrained("org/nested", subfolder="sub"))
    with pytest.raises(OSError, match="does not appear to have a file named"):
        BertModel.from_pretrained("org/nested")  # no weights at the root


def test_model_card_round_trip(loopback_hub):
    data = ModelCardData(license="apache-2.0", tags=["saev", "loopback"], library_name="saev_hf")
    card = ModelCard.from_template(data, model_description="A card pushed to the loopback hub.")
    loopback_hub.api.create_repo("org/carded")
    card.push_to_hub("org/carded")
    loaded = ModelCard.load("org/carded")
    assert loaded.data.to_dict() == data.to_dict()
    assert "loopback hub" in loaded.text
    assert loopback_hub.api.model_info("org/carded").card_data.tags == ["saev", "loopback"]
    with pytest.raises(ValueError, match="Invalid metadata"):  # the hub validates README metadata
        loopback_hub.api.upload_file(path_or_fileobj=b"---\n- a\n---\n", path_in_repo="README.md", repo_id="org/carded")


def test_datasets_push_and_load(loopback_hub):
    import datasets

    rows = {"text": ["a", "bb", "ccc"], "label": [0, 1, 0], "score": [0.5, -1.0, 2.25]}
    datasets.Dataset.from_dict(rows).push_to_hub("org/ds")
    stored = loopback_hub.repo("org/ds", "dataset").commits[-1].files
    assert "README.md" in stored and stored["data/train-00000-of-00001.parquet"].lfs

    loaded = datasets.load_dataset("org/ds")
    assert list(loaded) == ["train"] and loaded["train"].to_dict() == rows
    # a second push (another split) keeps the first: it reads the card back through HfFileSystem
    datasets.Dataset.from_dict(rows).select([2]).push_to_hub("org/ds", split="test")
    loaded = datasets.load_dataset("org/ds")
    assert sorted(loaded) == ["test", "train"] and loaded["test"]["text"] == ["ccc"]
    assert loaded["train"].to_dict() == rows


def test_only_loopback_is_reachable(loopback_hub):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(("8.8.8.8", 53))  # no name lookup: the connection itself is refused
    assert len(loopback_hub.blocked) == 2
    loopback_hub.blocked.clear()  # expected here: do not fail the teardown check
    socket.create_connection(("127.0.0.1", int(loopback_hub.endpoint.rsplit(":", 1)[1])), timeout=1).close()


@pytest.fixture
def offline_mode(monkeypatch):
    """The user's HF_HUB_OFFLINE=1, as already read at import time by the libraries."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_offline_mode_is_lifted(offline_mode, loopback_hub):  # offline_mode is set up first
    loopback_hub.api.create_repo("org/online")
    loopback_hub.api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/online")
    assert open(hf_hub_download("org/online", "config.json"), "rb").read() == b"{}"
