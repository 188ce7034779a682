"""Complete or clearly failed, never half-written: a command killed (SIGKILL) in the middle of its work, then run
again, gives what an uninterrupted run gives, and a partial output is never taken for a result; a full disk is a
clear error with nothing left marked done."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from saev_hf import SAEV, SAEVConfig
from saev_hf.cache import ActivationCache
from saev_hf.cli import main
from saev_hf.runtime.folders import OUTPUT_RECORD
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    root = tmp_path_factory.mktemp("faults")
    images = digit_images(48, seed=9)
    datasets.Dataset.from_dict({
        "images": [[image] for image, _ in images],
        "prompt": [f"what digit is this? is it {DIGIT_NAMES[(label + k) % 10]}?" for k, (_, label) in enumerate(images)],
    }).save_to_disk(root / "data")
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=64, d_sae=96, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    sae.save_pretrained(root / "sae")
    return llava, root


def killed(argv: list[str], when, timeout: float = 120) -> int:
    """Run `saev ARGV` in a process of its own and SIGKILL it as soon as `when()` holds; its exit status."""
    process = subprocess.Popen([sys.executable, "-m", "saev_hf.cli", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while not when() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def test_saev_cache_killed_mid_shard_resumes_to_the_uninterrupted_cache(setup, tmp_path):
    llava, root = setup
    argv = ["cache", "--model_name_or_path", str(llava.path), "--dataset_name", str(root / "data"), "--layer", "1",
            "--read_batch_size", "2", "--shard_size_tokens", "150", "--disable_tqdm"]
    assert main([*argv, "--output_dir", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    status = killed([*argv, "--output_dir", str(out)], lambda: len(list(out.glob("shard-*.safetensors"))) >= 2)
    assert status == -signal.SIGKILL
    manifest = json.loads((out / "cache_manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"]  # finished shards recorded, the run not marked done
    with pytest.raises(ValueError, match="is unfinished"):
        ActivationCache(out)
    assert main([*argv, "--output_dir", str(out)]) == 0  # resumes
    whole, resumed = ActivationCache(tmp_path / "whole"), ActivationCache(out)
    assert [e["sha256"] for e in resumed.shards] == [e["sha256"] for e in whole.shards]  # byte for byte


@pytest.mark.parametrize("command", ["score", "weights"])  # (`saev filter` is over too fast to kill mid-way)
def test_a_killed_command_leaves_an_output_no_one_reads_and_a_rerun_gives_the_result(setup, tmp_path, command):
    llava, root = setup
    common = ["--model_name_or_path", str(llava.path), "--dataset_name", str(root / "data"), "--device", "cpu",
              "--disable_tqdm"]
    if command == "filter":  # scores to filter first
        assert main(["score", "--sae_name_or_path", str(root / "sae"), *common, "--scores", "l0",
                     "--output_dir", str(tmp_path / "scored")]) == 0
        argv = ["filter", "--dataset_name", str(tmp_path / "scored"), "--column", "saev_l0", "--fraction", "0.5"]
    else:
        argv = [command, "--sae_name_or_path", str(root / "sae"), *common, "--batch_size", "2",
                *(["--scores", "l0", "cooccur_l0"] if command == "score" else ["--num_examples", "48"])]
    assert main([*argv, "--output_dir", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    killed([*argv, "--output_dir", str(out)], lambda: (out / OUTPUT_RECORD).exists())
    record = json.loads((out / OUTPUT_RECORD).read_text())
    assert record["complete"] is False
    with pytest.raises(ValueError, match="unfinished output of `saev"):
        (SAEV.from_pretrained(out) if command == "weights" else
         main(["filter", "--dataset_name", str(out), "--column", "saev_l0", "--fraction", "0.5", "--output_dir",
               str(tmp_path / "next")]))
    assert main([*argv, "--output_dir", str(out)]) == 0  # its own (unfinished) output: written again
    assert json.loads((out / OUTPUT_RECORD).read_text())["complete"] is True
    if command == "weights":
        torch.testing.assert_close(SAEV.from_pretrained(out).feature_weights,
                                   SAEV.from_pretrained(tmp_path / "whole").feature_weights, equal_nan=True)
    else:
        assert datasets.load_from_disk(str(out)).to_dict() == datasets.load_from_disk(str(tmp_path / "whole")).to_dict()


def test_a_killed_sweep_is_not_marked_finished_and_a_rerun_trains_every_member(setup, tmp_path):
    llava, root = setup
    argv = ["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(root / "data"), "--layer", "1",
            "--expansion_factor", "2", "--max_steps", "30", "--train_batch_size_tokens", "32",
            "--buffer_size_tokens", "128", "--read_batch_size", "4", "--input_scale_estimation_tokens", "64",
            "--save_steps", "10", "--disable_tqdm", "--sweep", json.dumps({"l1_coefficient": [1, 5]})]
    assert main([*argv, "--output_dir", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    killed([*argv, "--output_dir", str(out)], lambda: (out / "checkpoint-10").exists())
    assert json.loads((out / "sweep.json").read_text())["finished"] is False
    assert not any((out / member / "model.safetensors").exists()  # no member saved as trained
                   for member in ("l1_coefficient=1", "l1_coefficient=5"))
    assert main([*argv, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "sweep.json").read_text())["finished"] is True
    for member in ("l1_coefficient=1", "l1_coefficient=5"):
        assert torch.equal(SAEV.from_pretrained(out / member).W_dec, SAEV.from_pretrained(tmp_path / "whole" / member).W_dec)


def _full_disk(limit_bytes: int):
    """A `preexec_fn` that caps the size of any file the child writes (RLIMIT_FSIZE): a full disk, as far as the
    writer can tell (writes past the cap fail with EFBIG)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.parametrize("command", ["cache", "score", "weights", "train", "filter"])
def test_a_full_disk_is_a_clear_error_and_nothing_is_marked_done(setup, tmp_path, command):
    llava, root = setup
    common = ["--model_name_or_path", str(llava.path), "--dataset_name", str(root / "data"), "--device", "cpu",
              "--disable_tqdm", "--output_dir", str(tmp_path / "out")]
    if command == "filter":
        assert main(["score", "--sae_name_or_path", str(root / "sae"), *common[:-1], str(tmp_path / "scored"),
                     "--scores", "l0"]) == 0
    argv = {"cache": ["cache", *common, "--layer", "1", "--shard_size_tokens", "4000"],
            "score": ["score", "--sae_name_or_path", str(root / "sae"), *common, "--scores", "l0"],
            "weights": ["weights", "--sae_name_or_path", str(root / "sae"), *common, "--num_examples", "8"],
            "train": ["train", *[a for a in common if a not in ("--device", "cpu")], "--layer", "1",
                      "--expansion_factor", "8", "--max_steps", "4", "--train_batch_size_tokens", "32",
                      "--buffer_size_tokens", "128", "--input_scale_estimation_tokens", "64"],
            "filter": ["filter", "--dataset_name", str(tmp_path / "scored"), "--column", "saev_l0", "--fraction",
                       "0.5", "--output_dir", str(tmp_path / "out")]}[command]
    run = subprocess.run([sys.executable, "-m", "saev_hf.cli", *argv], capture_output=True, text=True, timeout=300,
                         preexec_fn=_full_disk(20_000 if command == "cache" else 6_000), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    assert "File too large" in run.stderr or "No space" in run.stderr or "EFBIG" in run.stderr, run.stderr[-2000:]
    out = tmp_path / "out"
    if command == "cache":  # the manifest (small) is written, the first shard (1 MB) is not
        assert not json.loads((out / "cache_manifest.json").read_text())["complete"]
        assert not list(out.glob("shard-*.safetensors"))
    elif command == "train":
        assert not (out / "trainer_state.json").exists()  # written last: the run is not recorded as finished
        with pytest.raises(Exception):  # and no loadable, whole SAE-V was left
            SAEV.from_pretrained(out)
    else:
        assert json.loads((out / OUTPUT_RECORD).read_text())["complete"] is False


def _rank_process(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launched process with LOCAL_RANK=`rank` under `launcher_pid` (from /proc), or None."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return child.pid
    return None


def test_one_of_two_processes_dying_fails_the_job_naming_the_rank_and_nothing_is_marked_done(setup, tmp_path):
    llava, root = setup
    out = tmp_path / "scored"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "saev_hf.cli", "weights", "--sae_name_or_path", str(root / "sae"), "--model_name_or_path", str(llava.path),
            "--dataset_name", str(root / "data"), "--device", "cpu", "--num_examples", "48", "--batch_size", "1",
            "--output_dir", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, victim = time.time() + 120, None
        while time.time() < deadline and not (out / OUTPUT_RECORD).exists():
            time.sleep(0.05)
        while victim is None and time.time() < deadline:
            victim = _rank_process(process.pid, 1)
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "rank      : 1" in stderr or "local_rank: 1" in stderr, stderr[-3000:]
    assert json.loads((out / OUTPUT_RECORD).read_text())["complete"] is False
    assert not (out / "model.safetensors").exists()


def test_a_push_killed_mid_upload_leaves_the_repo_whole_or_untouched_and_a_rerun_completes(loopback_hub, tmp_path):
    """A Hub commit holds all its files or none: a `saev push` killed after its uploads began leaves the repo without
    a half-made SAE-V, and running it again pushes it whole."""
    torch.manual_seed(0)
    sae = SAEV(SAEVConfig(d_in=256, d_sae=4096, hook_layer=1))  # 8 MB of weights: an LFS upload
    sae.save_pretrained(tmp_path / "sae")
    argv = ["push", "--sae", str(tmp_path / "sae"), "--repo_id", "me/saev-killed"]
    killed(argv, lambda: any("preupload" in line or "lfs" in line for line in loopback_hub.log))
    try:
        files = set(loopback_hub.files("me/saev-killed"))
    except KeyError:  # the repo was never created
        files = set()
    whole = {"config.json", "model.safetensors", "README.md"}
    assert not files & whole or whole <= files, files  # all or nothing
    assert main(argv) == 0
    assert whole <= set(loopback_hub.files("me/saev-killed"))
    pulled = SAEV.from_pretrained("me/saev-killed")
    assert torch.equal(pulled.W_enc, sae.W_enc)
