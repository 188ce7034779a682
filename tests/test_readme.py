"""The README's Python examples run as written (blocks marked `python notest` need the real Hub and are skipped)."""

import json
import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README must show a first usage example"
    monkeypatch.chdir(tmp_path)  # the examples write checkpoints to the working directory
    namespace = {"__name__": "__readme__"}  # read top to bottom: a block may use what an earlier one defined
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "saev-tiny" / "model.safetensors").exists()
    assert (tmp_path / "saev-tiny-saelens" / "sae_weights.safetensors").exists()
    # DPO took the filtered split of the README's own data (plain prompts) and the trained model scored it again
    assert isinstance(namespace["best_half"][0]["prompt"], str)
    assert namespace["trainer"].state.global_step == 2
    assert len(namespace["rescored"]) == len(namespace["best_half"])
    assert list(namespace["rescored"]["saev_l0"]) != list(namespace["best_half"]["saev_l0"])


# --- the README's command lines, in order (issue 17) ------------------------------------------------------------------

# Options appended to a README line so that it runs in seconds on the tiny model (a later option wins in argparse).
FAST = {
    "train": ["--layer", "1", "--expansion_factor", "2", "--max_steps", "4", "--train_batch_size_tokens", "64",
              "--buffer_size_tokens", "256", "--input_scale_estimation_tokens", "256"],
    "cache": ["--layer", "1", "--shard_size_tokens", "128"],
    "dpo": ["--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--max_length", "128", "--report_to", "none"],
}
# `saev demo` runs minutes with its defaults; tests/test_cli.py and tests/test_demo.py run it with small settings.
SKIPPED = {"demo"}


def readme_command_lines() -> list[str]:
    """The lines of the README's "Command line" block, comments removed, shell variables kept as lines."""
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def readme_data(n=16):
    """The README's own example data (its second Python block): digits, plain prompts, chosen and rejected."""
    import datasets

    from saev_hf.testing.digit_data import digit_images

    return datasets.Dataset.from_dict({
        "images": [[image] for image, label in digit_images(n)],
        "prompt": ["What digit is this?"] * n,
        "chosen": ["A handwritten digit."] * n,
        "rejected": ["A photo of a cat."] * n,
    })


def test_readme_command_lines_run_in_order_each_output_feeding_the_next(loopback_hub, tmp_path, monkeypatch, capsys):
    import datasets
    import torch
    from huggingface_hub import DatasetCard, ModelCard

    from saev_hf import SAEV, SAEVConfig
    from saev_hf.cli import main
    from saev_hf.evaluation import format_metrics_table
    from saev_hf.testing.tiny_models import save_tiny_model

    # Hub names the README loads from, as local folders; the authors' SAE-V repo and the pushes go to the loopback Hub
    local = tmp_path / "hub-names"
    local_names = {"llava-hf/llava-v1.6-mistral-7b-hf": save_tiny_model("llava", local / "mllm")}
    for name in ("my/image-text", "my/prefs", "my/images"):
        local_names[name] = local / name
        readme_data().save_to_disk(str(local_names[name]))
    torch.manual_seed(0)
    authors = SAEV(SAEVConfig(d_in=64, expansion_factor=4, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        authors.b_enc.normal_(0, 0.1)
    authors.save_saelens(local / "authors")
    loopback_hub.api.create_repo("PKU-Alignment/SAE-V")
    loopback_hub.api.upload_folder(repo_id="PKU-Alignment/SAE-V", folder_path=local / "authors",
                                   path_in_repo="SAEV_LLaVA_NeXT-7b_OBELICS")

    monkeypatch.chdir(tmp_path)  # the README's output folders are relative
    variables, ran = {}, []
    for line in readme_command_lines():
        if re.fullmatch(r"\w+=\S+", line):
            name, value = line.split("=", 1)
            variables[name] = value
            continue
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
        assert argv[0] == "saev", line
        command = argv[1]
        if command in SKIPPED:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg in ("--model_name_or_path", "--dataset_name") and not Path(argv[i + 1]).exists():
                assert argv[i + 1] in local_names, f"README line {line!r} loads {argv[i + 1]}: give it a local folder"
                argv[i + 1] = str(local_names[argv[i + 1]])
        assert main(argv[1:] + FAST.get(command, [])) == 0, line
        ran.append(command)
    out = capsys.readouterr().out
    assert ran == ["convert", "info", "train", "cache", "train", "train", "eval", "push", "eval", "push", "weights", "score", "filter", "inspect", "patches",
                   "dpo", "push", "push"]

    converted = SAEV.from_pretrained("saev-llava")  # convert -> info, weights
    assert torch.equal(converted.W_enc, authors.W_enc) and '"hook_layer": 1' in out
    trained = SAEV.from_pretrained("saev-new")  # train -> eval -> push
    assert trained.config.training_tokens == 4 * 64
    from saev_hf.cache import ActivationCache  # cache -> train, push

    cache = ActivationCache("cache-l16")
    assert cache.manifest["storage_dtype"] == "bfloat16" and cache.num_rows == 16 and len(cache.shards) > 1
    assert SAEV.from_pretrained("saev-from-cache").config.training_tokens == 4 * 64
    assert "explained variance" in out and "Model " + str(local_names["llava-hf/llava-v1.6-mistral-7b-hf"]) in out
    swept = json.loads(Path("saev-sweep/sweep.json").read_text())["sweep"]  # cache -> a sweep of 4, one pass
    assert [m["folder"] for m in swept][-1] == "l1_coefficient=5,expansion_factor=16"
    assert SAEV.from_pretrained("saev-sweep/l1_coefficient=5,expansion_factor=16").config.d_sae == 16 * 64
    assert ActivationCache("me/cache-l16").manifest == cache.manifest
    metrics = json.loads(Path("metrics.json").read_text())
    assert metrics["num_examples"] == 16 and metrics["all"]["tokens"] > 0
    assert format_metrics_table(metrics) in ModelCard.load("me/saev-new").text
    weighted = SAEV.from_pretrained("saev-llava-w")  # weights -> score, inspect, patches, push
    assert weighted.has_feature_weight.any() and torch.equal(weighted.W_enc, authors.W_enc)
    scored = datasets.load_from_disk("scored")  # score -> filter, push
    cosine = torch.tensor(scored["saev_cosine_score"])
    assert len(scored) == 16 and (cosine != 0).any() and (torch.tensor(scored["saev_l0"]) > 0).all()
    kept = datasets.load_from_disk("best-half")  # filter -> dpo, push
    assert len(kept) == 8 and min(kept["saev_cosine_score"]) >= cosine.sort().values[7]
    assert isinstance(kept[0]["prompt"], str)  # DPO took the README's plain prompts
    assert Path("report/index.html").is_file()
    assert "saev_patch_scores" in datasets.load_from_disk("masked").column_names
    assert Path("dpo-out/adapter_config.json").is_file()
    assert torch.equal(SAEV.from_pretrained("me/saev-llava").feature_weights.nan_to_num(),
                       weighted.feature_weights.nan_to_num())
    assert "| Rows after | 8 (50.0% kept) |" in DatasetCard.load("me/prefs-saev", repo_type="dataset").text
