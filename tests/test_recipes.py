"""Every recipe under `recipes/` runs end to end, as its header says (`saev COMMAND --config FILE`), on tiny
stand-ins served by the loopback Hub under the real names: LLaVA-NeXT and Chameleon (tiny models), OBELICS (documents
whose images are URLs on a local image server), Align-Anything (its `text-image-to-text` config) and RLAIF-V (their
schemas copied exactly, `paper_datasets.py`), the CLIP checkpoint, and the authors' SAE-V repo. Only sizes are
overridden on the command line (steps, batch sizes, the layer of a 4-layer model), which also checks that flags
override the file; and the local image server needs --allow_private_urls.
"""

import json
from pathlib import Path

import datasets
import pytest
import torch
from paper_datasets import align_anything_rows, obelics_documents, rlaif_v_rows

from saev_hf import SAEV
from saev_hf.cli import main
from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images
from saev_hf.testing.image_server import ImageServer
from saev_hf.testing.tiny_models import build_tiny_clip, save_tiny_model
from saev_hf.testing.tiny_processing import register_tiny_processors

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# (recipe, commands in the order its header gives them); recipes later in the list use earlier ones' outputs
ORDER = [
    ("saev_llava_next_obelics.yaml", ["train", "eval"]),
    ("saev_chameleon_obelics.yaml", ["train", "eval"]),
    ("filter_llava_next_align_anything.yaml", ["weights", "score", "filter", "dpo"]),
    ("filter_chameleon_align_anything.yaml", ["weights", "score", "filter", "dpo"]),
    ("filter_chameleon_rlaif_v.yaml", ["weights", "score", "filter", "dpo"]),
    ("ifd_llava_next_align_anything.yaml", ["dpo", "score", "filter"]),
    ("patches_imagenet_llava_next.yaml", ["patches"]),
]

SMALL = {  # sizes only
    "train": ["--layer", "1", "--expansion_factor", "2", "--max_steps", "4", "--train_batch_size_tokens", "32",
              "--buffer_size_tokens", "128", "--read_batch_size", "4", "--input_scale_estimation_tokens", "64",
              "--lr_warmup_steps", "1", "--lr_decay_steps", "1", "--l1_warmup_steps", "1", "--max_length", "512",
              "--disable_tqdm"],
    "eval": ["--num_examples", "4", "--batch_size", "2", "--max_length", "512"],
    "weights": ["--num_examples", "6", "--batch_size", "3"],
    "score": ["--batch_size", "4"],
    "dpo": ["--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_length", "256", "--save_strategy", "no", "--lora"],
    "patches": ["--batch_size", "4"],
}
IMAGES = ["--allow_private_urls", "--image_fetch_retries", "0"]  # the OBELICS stand-in's images are on 127.0.0.1


def test_every_recipe_is_run_here():
    assert sorted(path.name for path in RECIPES.glob("*.yaml")) == sorted(name for name, _ in ORDER)
    for name, commands in ORDER:  # each header names the commands it is run with, in this order
        header = "".join(line for line in (RECIPES / name).read_text().splitlines(True) if line.startswith("#"))
        positions = [header.index(f"saev {command}") for command in commands]
        assert positions == sorted(positions), name


@pytest.fixture
def stand_ins(loopback_hub, tmp_path):
    register_tiny_processors()
    api = loopback_hub.api
    for repo, arch in (("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"), ("facebook/chameleon-7b", "chameleon")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=save_tiny_model(arch, tmp_path / "models" / arch))
    clip = tmp_path / "models" / "clip"
    for part in build_tiny_clip(seed=3):
        part.save_pretrained(clip)
    api.create_repo("openai/clip-vit-large-patch14")
    api.upload_folder(repo_id="openai/clip-vit-large-patch14", folder_path=clip)
    align_anything_rows(9, seed=4, overall=[1, 2, 2, 1, 0, 1, 2, 1, 2]).push_to_hub(
        "PKU-Alignment/align-anything", config_name="text-image-to-text")
    rlaif_v_rows(8, seed=6).push_to_hub("openbmb/RLAIF-V-Dataset")
    digits = digit_images(8, seed=7)
    datasets.Dataset.from_dict({  # the patch recipe's imagenet-10 folder, as docs/reproduction.md builds it
        "images": [[image] for image, _ in digits],
        "prompt": ["What is the main object in this image? Answer with its class name."] * len(digits),
        "label": [DIGIT_NAMES[label] for _, label in digits],
    }).save_to_disk(tmp_path / "work" / "imagenet-10")
    with ImageServer() as server:
        urls = [server.add_image(f"d{i}.png", image) for i, (image, _) in enumerate(digit_images(5, seed=8))]
        urls.append(f"{server.url}/missing/gone.png")
        obelics_documents(urls, 12, seed=2, without_images=2).push_to_hub("HuggingFaceM4/OBELICS")
        yield loopback_hub, tmp_path / "work", server


def run(recipe: str, command: str, *extra: str) -> None:
    argv = [command, "--config", str(RECIPES / recipe), *SMALL.get(command, []), *extra]
    assert main(argv) == 0, " ".join(argv)


def test_every_recipe_runs_end_to_end_on_stand_ins(stand_ins, monkeypatch):
    hub, work, server = stand_ins
    monkeypatch.chdir(work)  # the recipes' output folders are relative
    images = [*IMAGES, "--image_cache_dir", str(work / "image-cache")]
    run("saev_llava_next_obelics.yaml", "train", *images)
    run("saev_llava_next_obelics.yaml", "eval", *images)
    trained = SAEV.from_pretrained("saev-llava-next-obelics")
    assert trained.config.hook_layer == 1 and trained.config.training_tokens == 4 * 32  # flags overrode the file
    assert trained.config.base_model_name_or_path == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert json.loads(Path("saev-llava-next-obelics/image_fetch_report.json").read_text())["failed"] > 0
    metrics = json.loads(Path("eval-llava-next-obelics/metrics.json").read_text())
    assert metrics["num_examples"] == 4 and metrics["layer"] == 1

    run("saev_chameleon_obelics.yaml", "train", *images)
    run("saev_chameleon_obelics.yaml", "eval", *images)
    assert SAEV.from_pretrained("saev-chameleon-obelics").config.base_model_name_or_path == "facebook/chameleon-7b"

    # the authors' SAE-V repo the LLaVA-NeXT filtering recipe starts from: the one trained above, in SAELens' layout
    trained.save_saelens(work / "authors")
    hub.api.create_repo("PKU-Alignment/SAE-V")
    hub.api.upload_folder(repo_id="PKU-Alignment/SAE-V", folder_path=work / "authors",
                          path_in_repo="SAEV_LLaVA_NeXT-7b_OBELICS")
    for recipe in ("filter_llava_next_align_anything.yaml", "filter_chameleon_align_anything.yaml",
                   "filter_chameleon_rlaif_v.yaml"):
        for command in ("weights", "score", "filter", "dpo"):
            run(recipe, command, *(["--threshold_quantile", "0.5"] if command == "weights" else []))
    scored = datasets.load_from_disk("align-anything-scored")
    assert len(scored) == 8 and {"saev_cosine_score", "length", "clip_score"} <= set(scored.column_names)
    assert len(datasets.load_from_disk("kept-0.5")) == 4 and len(datasets.load_from_disk("kept-0.1")) == 1
    for output in ("dpo-0.5", "dpo-0.1"):
        assert (Path(output) / "adapter_config.json").exists()

    run("ifd_llava_next_align_anything.yaml", "dpo")
    run("ifd_llava_next_align_anything.yaml", "score")
    run("ifd_llava_next_align_anything.yaml", "filter")
    ifd = datasets.load_from_disk("align-anything-ifd")["ifd"]
    kept = datasets.load_from_disk("ifd-kept-0.5")["ifd"]
    at_most_one = sorted(value for value in ifd if value <= 1)
    assert sorted(kept) == at_most_one[len(at_most_one) - round(0.5 * len(at_most_one)):]

    run("patches_imagenet_llava_next.yaml", "patches", "--sae_name_or_path", "saev-llava-next-weighted")
    masked = datasets.load_from_disk("patches-cosine-0.25")
    original = datasets.load_from_disk("imagenet-10")
    assert len(masked) == 8 and Path("patches-cosine-0.25/preview.png").exists()
    for before, after in zip(original, masked):  # a quarter of the patches kept: pixels were blacked out
        before, after = (torch.tensor(list(row["images"][0].convert("L").getdata())) for row in (before, after))
        assert (after == 0).sum() > (before == 0).sum() and ((after != before) <= (after == 0)).all()
