"""Render the example Hub cards in this folder from recorded inputs, with the current card templates.

    python hub_cards/render.py                      # the cards, from hub_cards/inputs/
    python hub_cards/render.py --from-demo DIR      # first record the inputs from a `saev demo --output_dir DIR` run

The cards are those `saev push` writes: the model card of the demo's SAE-V (with its evaluation on held-out scenes)
and the card of the preference dataset filtered by its cosine score (the best half). The inputs are recorded once
from a demo run (the SAE-V's config, its metrics, every row's scores), so that rendering is exact and fast:
`tests/test_hub_cards.py` renders them again and fails when a template changed and the cards here were not rendered
again.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import datasets
import torch

from saev_hf import (SAEV, FilterArguments, SAEVConfig, ScorerArguments, filter_by_score, filtered_dataset_card,
                     saev_model_card)

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"
SAE_REPO = "saev-hf/saev-grounded-tiny-llava"
BASE_MODEL = "saev-hf/grounded-tiny-llava"
DATASET_REPO = "saev-hf/scene-preferences-saev-cosine"
SOURCE_DATASET = "saev-hf/scene-preferences"
FILTER = FilterArguments(column="saev_cosine_score", fraction=0.5)


def render(inputs: Path = INPUTS, output: Path = HERE) -> list[Path]:
    """Write `saev_model_card.md` and `filtered_dataset_card.md` to `output` from the inputs in `inputs`."""
    config = SAEVConfig.from_dict(json.loads((inputs / "demo_saev_config.json").read_text()))
    sae = SAEV(config)  # its weights are not needed for a card; its feature weights are
    weights = json.loads((inputs / "demo_saev_feature_weights.json").read_text())
    sae.set_feature_weights(torch.tensor([math.nan if w is None else w for w in weights]),
                            info=config.feature_weights_info)
    metrics = json.loads((inputs / "demo_saev_metrics.json").read_text())
    model_card = saev_model_card(sae, metrics, repo_id=SAE_REPO, license="apache-2.0")
    scored = datasets.Dataset.from_dict(json.loads((inputs / "demo_scores.json").read_text()))
    kept = filter_by_score(scored, FILTER)
    dataset_card = filtered_dataset_card(kept, source_dataset=SOURCE_DATASET, scored=scored, filter_args=FILTER,
                                         sae_repo=SAE_REPO, sae_config=config, scorer_args=ScorerArguments(),
                                         repo_id=DATASET_REPO, license="apache-2.0")  # the demo's scorer settings
    written = []
    for name, card in (("saev_model_card.md", model_card), ("filtered_dataset_card.md", dataset_card)):
        (output / name).write_text(str(card) + "\n")
        written.append(output / name)
    return written


def record_inputs(demo_dir: Path, inputs: Path = INPUTS) -> None:
    """Record the inputs from a demo run: its SAE-V's config, the SAE-V evaluated on 64 held-out questions, and the
    scores of the demo's preference rows (rebuilt from the demo's seed, scored again with its SAE-V)."""
    import numpy as np

    from saev_hf import SAEVScorer, evaluate_saev
    from saev_hf.demo import load_grounded_llava, load_recipe
    from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows

    summary = json.loads((demo_dir / "summary.json").read_text())
    sae = SAEV.from_pretrained(demo_dir / "saev")
    model, processor = load_grounded_llava()
    recipe = load_recipe()
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    seed = summary["arguments"]["seed"]
    held_out = question_rows(scans, 64, "held_out", np.random.default_rng([seed, 99]), absent_fraction=0.25)
    columns = ("images", "prompt", "chosen", "rejected")
    evaluation = datasets.Dataset.from_list([{"images": row["images"], "prompt": row["prompt"]} for row in held_out])
    metrics = evaluate_saev(sae, model, processor, evaluation, batch_size=16)
    metrics["model"] = BASE_MODEL
    rows = preference_rows(scans, summary["num_rows"], "train", np.random.default_rng([seed, 5]),
                           low_quality_fraction=summary["arguments"]["low_quality_fraction"])
    preferences = datasets.Dataset.from_list([{key: row[key] for key in columns} for row in rows])
    scored = preferences.map(SAEVScorer(sae, model, processor), batched=True, batch_size=32)
    inputs.mkdir(parents=True, exist_ok=True)
    # the names the card shows: the Hub repos the demo's model and data would be published as, not this machine's paths
    sae.config.base_model_name_or_path, sae.config.dataset_name = BASE_MODEL, SOURCE_DATASET
    (inputs / "demo_saev_config.json").write_text(sae.config.to_json_string(use_diff=False))
    weights = [None if math.isnan(w) else w for w in sae.feature_weights.tolist()]
    (inputs / "demo_saev_feature_weights.json").write_text(json.dumps(weights) + "\n")
    (inputs / "demo_saev_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    scores = {"prompt": list(scored["prompt"]), "chosen": list(scored["chosen"]), "rejected": list(scored["rejected"]),
              **{name: list(scored[name]) for name in ("saev_cosine_score", "saev_l0", "saev_cooccur_l0")}}
    (inputs / "demo_scores.json").write_text(json.dumps(scores) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-demo", type=Path, help="a `saev demo` output folder to record the inputs from first")
    args = parser.parse_args()
    if args.from_demo is not None:
        record_inputs(args.from_demo)
    for path in render():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
