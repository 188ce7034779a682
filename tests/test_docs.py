"""The README's and the docs' code runs as written: every Python block (in order, each page in its own namespace), the
command-line walk-through line by line, every other `saev` line shown parses, and every relative link resolves.

The README's quickstart names the real Hub repos (the authors' SAE-V, LLaVA-NeXT, RLAIF-V): the loopback Hub serves
tiny stand-ins under those names, the dataset with RLAIF-V's exact schema, so the block runs verbatim."""

import json
import re
import shlex
from pathlib import Path

import datasets
import pytest
import torch
from paper_datasets import RLAIF_V_FEATURES  # openbmb/RLAIF-V-Dataset's card, field by field

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
WALK_THROUGH = ROOT / "docs" / "command_line.md"


def python_blocks(page: Path) -> list[str]:
    """The runnable Python blocks of a page (```python; blocks marked `python notest` are skipped)."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def bash_lines(page: Path) -> list[str]:
    """The lines of a page's bash blocks, continuation lines joined, comments removed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# The README's quickstart, on stand-ins served under the real names
# ----------------------------------------------------------------------------------------------------------------------

def rlaif_v_stand_in(n: int = 12) -> datasets.Dataset:
    from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

    images = digit_images(n, seed=3)
    return datasets.Dataset.from_dict({
        "ds_name": ["RLAIF-V"] * n,
        "image": [image for image, _ in images],
        "question": ["What digit is shown?"] * n,
        "chosen": [f"The digit {DIGIT_NAMES[label]}." for _, label in images],
        "rejected": ["A cat."] * n,
        "origin_dataset": ["digits"] * n, "origin_split": ["{}"] * n,
        "idx": [str(i) for i in range(n)], "image_path": [f"{i}.png" for i in range(n)],
    }, features=RLAIF_V_FEATURES)


def test_readme_quickstart_runs_on_stand_ins_under_the_real_names(loopback_hub, tmp_path, monkeypatch):
    from saev_hf import SAEV, SAEVConfig
    from saev_hf.testing.tiny_models import save_tiny_model

    torch.manual_seed(0)
    authors = SAEV(SAEVConfig(d_in=64, expansion_factor=4, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        authors.b_enc.normal_(0, 0.1)
    authors.save_saelens(tmp_path / "authors")
    api = loopback_hub.api
    api.create_repo("PKU-Alignment/SAE-V")
    api.upload_folder(repo_id="PKU-Alignment/SAE-V", folder_path=tmp_path / "authors",
                      path_in_repo="SAEV_LLaVA_NeXT-7b_OBELICS")
    api.create_repo("llava-hf/llava-v1.6-mistral-7b-hf")
    api.upload_folder(repo_id="llava-hf/llava-v1.6-mistral-7b-hf",
                      folder_path=save_tiny_model("llava", tmp_path / "llava"))
    stand_in = rlaif_v_stand_in()
    stand_in.push_to_hub("openbmb/RLAIF-V-Dataset")

    (block,) = python_blocks(README)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(block, str(README), "exec"), namespace)
    scored, best_half = namespace["scored"], namespace["best_half"]
    assert scored.features["image"] == RLAIF_V_FEATURES["image"] and len(scored) == len(stand_in)
    assert {"saev_cosine_score", "saev_l0", "saev_cooccur_l0"} <= set(scored.column_names)
    assert namespace["sae"].has_feature_weight.any()  # Algorithm 1 ran on the stand-in rows
    assert len(best_half) == len(stand_in) // 2
    assert min(best_half["saev_cosine_score"]) >= sorted(scored["saev_cosine_score"])[len(stand_in) // 2 - 1]


# ----------------------------------------------------------------------------------------------------------------------
# The docs pages' Python blocks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)], ids=lambda page: page.name)
def test_every_python_block_of_the_docs_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write to relative folders
    namespace = {"__name__": f"__docs_{page.stem}__"}  # a page reads top to bottom: a block uses what earlier ones made
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
    checks = {  # what each page's examples leave, beyond running
        "training.md": lambda ns: ns["sae"].config.training_tokens == 20 * 64 and len(ns["saes"]) == 4
        and (tmp_path / "saev-sweep" / "sweep.json").is_file() and ns["metrics"]["all"]["tokens"] > 0,
        "caching.md": lambda ns: ns["cache"].manifest["storage_dtype"] == "bfloat16" and len(ns["cache"].shards) > 1
        and ns["sae"].config.training_tokens == 5 * 64,
        "scoring.md": lambda ns: len(ns["best_half"]) == 8 and ns["trainer"].state.global_step == 2
        and list(ns["rescored"]["saev_l0"]) != list(ns["best_half"]["saev_l0"]),
        "interpretation.md": lambda ns: ns["index"].is_file() and "saev_patch_scores" in ns["masked"].column_names
        and len(ns["lens"][0].positive) == 5 and ns["steered"].shape[1] == ns["plain"].shape[1],
        "data.md": lambda ns: len(ns["preferences"]) == 2 and ns["preferences"][1]["chosen"] == "One."
        and ns["preferences"][1]["rejected"] == "Three." and {"images", "prompt", "chosen", "rejected",
                                                                 "overall_response"} == set(ns["preferences"].column_names)
        - {"response_1", "response_2"},
    }
    assert checks[page.name](namespace), page.name


# ----------------------------------------------------------------------------------------------------------------------
# The command-line walk-through, line by line; every other command line parses
# ----------------------------------------------------------------------------------------------------------------------

# Options appended to a line so that it runs in seconds on the tiny model (a later option wins in argparse).
FAST = {
    "train": ["--layer", "1", "--expansion_factor", "2", "--max_steps", "4", "--train_batch_size_tokens", "64",
              "--buffer_size_tokens", "256", "--input_scale_estimation_tokens", "256"],
    "cache": ["--layer", "1", "--shard_size_tokens", "128"],
    "dpo": ["--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--max_length", "128", "--report_to", "none"],
}
SKIPPED = {"demo"}  # minutes with its defaults; tests/test_demo_pipeline.py runs it with small settings


def preference_rows(n=16):
    """Digits, plain prompts, chosen and rejected: TRL's preference layout."""
    from saev_hf.testing.digit_data import digit_images

    return datasets.Dataset.from_dict({
        "images": [[image] for image, label in digit_images(n)],
        "prompt": ["What digit is this?"] * n,
        "chosen": ["A handwritten digit."] * n,
        "rejected": ["A photo of a cat."] * n,
    })


def test_the_command_line_walk_through_runs_in_order_each_output_feeding_the_next(loopback_hub, tmp_path,
                                                                                   monkeypatch, capsys):
    from huggingface_hub import DatasetCard, ModelCard

    from saev_hf import SAEV, SAEVConfig
    from saev_hf.cache import ActivationCache
    from saev_hf.cli import main
    from saev_hf.evaluation import format_metrics_table
    from saev_hf.testing.tiny_models import save_tiny_model

    # Hub names the walk-through loads from, as local folders; the authors' SAE-V repo and the pushes: the loopback Hub
    local = tmp_path / "hub-names"
    local_names = {"llava-hf/llava-v1.6-mistral-7b-hf": save_tiny_model("llava", local / "mllm")}
    for name in ("my/image-text", "my/prefs", "my/images"):
        local_names[name] = local / name
        preference_rows().save_to_disk(str(local_names[name]))
    torch.manual_seed(0)
    authors = SAEV(SAEVConfig(d_in=64, expansion_factor=4, hook_layer=1, cooccurrence_threshold=0.05))
    with torch.no_grad():
        authors.b_enc.normal_(0, 0.1)
    authors.save_saelens(local / "authors")
    loopback_hub.api.create_repo("PKU-Alignment/SAE-V")
    loopback_hub.api.upload_folder(repo_id="PKU-Alignment/SAE-V", folder_path=local / "authors",
                                   path_in_repo="SAEV_LLaVA_NeXT-7b_OBELICS")

    monkeypatch.chdir(tmp_path)  # the walk-through's output folders are relative
    variables, ran = {}, []
    for line in bash_lines(WALK_THROUGH):
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
                assert argv[i + 1] in local_names, f"line {line!r} loads {argv[i + 1]}: give it a local folder"
                argv[i + 1] = str(local_names[argv[i + 1]])
        assert main(argv[1:] + FAST.get(command, [])) == 0, line
        ran.append(command)
    out = capsys.readouterr().out
    assert ran == ["convert", "info", "train", "cache", "train", "train", "eval", "push", "eval", "push", "weights",
                   "score", "filter", "inspect", "patches", "dpo", "push", "push", "push"]

    converted = SAEV.from_pretrained("saev-llava")  # convert -> info, weights
    assert torch.equal(converted.W_enc, authors.W_enc) and '"hook_layer": 1' in out
    trained = SAEV.from_pretrained("saev-new")  # train -> eval -> push
    assert trained.config.training_tokens == 4 * 64
    cache = ActivationCache("cache-l16")  # cache -> train, push
    assert cache.manifest["storage_dtype"] == "bfloat16" and cache.num_rows == 16 and len(cache.shards) > 1
    assert SAEV.from_pretrained("saev-from-cache").config.training_tokens == 4 * 64
    assert "explained variance" in out and "Model " + str(local_names["llava-hf/llava-v1.6-mistral-7b-hf"]) in out
    swept = json.loads(Path("saev-sweep/sweep.json").read_text())["sweep"]  # cache -> a sweep of 4, one pass
    assert [m["folder"] for m in swept][-1] == "l1_coefficient=5,expansion_factor=16"
    assert SAEV.from_pretrained("saev-sweep/l1_coefficient=5,expansion_factor=16").config.d_sae == 16 * 64
    assert ActivationCache("me/cache-l16").manifest == cache.manifest
    metrics = json.loads(Path("eval-new/metrics.json").read_text())
    assert metrics["num_examples"] == 16 and metrics["all"]["tokens"] > 0
    assert format_metrics_table(metrics) in ModelCard.load("me/saev-new").text
    weighted = SAEV.from_pretrained("saev-llava-w")  # weights -> score, inspect, patches, push
    assert weighted.has_feature_weight.any() and torch.equal(weighted.W_enc, authors.W_enc)
    scored = datasets.load_from_disk("scored")  # score -> filter, push
    cosine = torch.tensor(scored["saev_cosine_score"])
    assert len(scored) == 16 and (cosine != 0).any() and (torch.tensor(scored["saev_l0"]) > 0).all()
    kept = datasets.load_from_disk("best-half")  # filter -> dpo, push
    assert len(kept) == 8 and min(kept["saev_cosine_score"]) >= cosine.sort().values[7]
    assert isinstance(kept[0]["prompt"], str)  # DPO took the plain prompts
    assert Path("report/index.html").is_file() and Path("report/features.json").is_file()
    assert "on llava-hf/llava-v1.6-mistral-7b-hf as the Space me/saev-llava-explorer" in out  # push --space
    assert "saev_patch_scores" in datasets.load_from_disk("masked").column_names
    assert Path("dpo-out/adapter_config.json").is_file()
    assert torch.equal(SAEV.from_pretrained("me/saev-llava").feature_weights.nan_to_num(),
                       weighted.feature_weights.nan_to_num())
    assert "| Rows after | 8 (50.0% kept) |" in DatasetCard.load("me/prefs-saev", repo_type="dataset").text


def shown_command_lines():
    """Every `saev` line in the README and the docs but the walk-through's (which runs): (page, line)."""
    return [(page.name, line) for page in [README, *PAGES] if page != WALK_THROUGH for line in bash_lines(page)
            if re.search(r"(^|\s|\))saev\s+\w", line) and "saev_hf" not in line.split("saev", 1)[0]]


@pytest.mark.parametrize("page, line", shown_command_lines(), ids=lambda value: value[:60])
def test_every_command_line_shown_names_a_command_and_its_options(page, line):
    """A line with `...` cannot run, but its command and every option it names must exist."""
    from saev_hf.cli import COMMANDS

    words = shlex.split(line.replace("$(which saev)", "saev"))
    start = max(i for i, word in enumerate(words) if word == "saev" or word.endswith("saev_hf.cli"))
    command, options = words[start + 1], [w.split("=")[0] for w in words[start + 2:] if w.startswith("--")]
    assert command in COMMANDS, (page, line)
    if not options or command == "dpo":  # dpo's options are TRL's too: parsed when it runs (the walk-through)
        return
    from transformers import HfArgumentParser

    parser = HfArgumentParser(COMMANDS[command].arguments())
    known = {option for action in parser._actions for option in action.option_strings} | {"--config"}
    unknown = [option for option in options if option not in known]
    assert not unknown, f"{page}: `{line}` names options `saev {command}` does not have: {unknown}"


def test_every_relative_link_resolves():
    for page in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_introduces_and_leaves_the_detail_to_the_docs():
    lines = README.read_text().splitlines()
    assert len(lines) < 150, len(lines)
    for heading in ("## Install", "## Quickstart", "## What it does", "## Results", "## The two commands"):
        assert heading in lines, heading
    assert "PKU-Alignment/SAE-V" in python_blocks(README)[0]  # the quickstart is on the authors' checkpoint

