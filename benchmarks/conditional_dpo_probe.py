"""Probe: does an image-conditional preference term (mDPO's, Wang et al. 2024) make DPO on the scene rows teach the
grounded LLaVA to see what is absent? (issue 12, item 5)

Plain DPO on the scene rows (`scene_dpo.py`) lowers hallucinations by answering "none" more often within a question
kind: a prior, not grounding. mDPO calls this unconditional preference and adds a conditional term: the same chosen
answer preferred under the row's own image over a corrupted one (here another scene: without the object the question
names when it is present, with it when it is absent, so that the chosen answer is wrong there). This probe trains
with

    loss = std_weight * DPO(chosen vs rejected | image)
         + cond_weight * DPO(chosen | image vs chosen | corrupted image)
         + anchor * -log sigmoid(beta * (log pi(chosen) - log pi_ref(chosen)))      (mDPO's reward anchor)

in a plain PyTorch loop (TRL's DPOTrainer has no image-conditional pairs; a trainer subclass is the step after this
probe), then measures held-out accuracy, hallucination rate and accuracy per question kind. A probe for a decision,
not a library feature: one seed per call.

    python benchmarks/conditional_dpo_probe.py --model-dir <grounded LLaVA> --cond-weight 1 --std-weight 1 --anchor 1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saev_hf.demo.run import load_grounded_llava, load_recipe  # noqa: E402
from saev_hf.demo.grounded_llava import answer_accuracy  # noqa: E402
from saev_hf.demo.scenes import DigitScans, preference_rows, question_rows, random_scene  # noqa: E402
from saev_hf.testing.tiny_pretraining import response_log_likelihoods  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="A grounded LLaVA folder (default: the embedded one).")
    parser.add_argument("--cond-weight", type=float, default=1.0)
    parser.add_argument("--std-weight", type=float, default=1.0)
    parser.add_argument("--anchor", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", choices=["clean", "all"], default="clean")
    parser.add_argument("--num-pairs", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def corrupted_image(row: dict, scans: DigitScans, rng: np.random.Generator):
    """Another scene's image under which the row's chosen answer is wrong (None for count questions)."""
    concept = row["concept"]
    if concept is None:
        return None
    if row["present"]:
        return random_scene(rng, scans, "train", avoid={concept}).image(scans)
    while True:  # absent: a scene that holds the object, so "none" / "no" is wrong there
        scene = random_scene(rng, scans, "train")
        if concept in scene.concepts:
            return scene.image(scans)


def log_likelihoods(model, processor, rows: list[dict], answer: str, images: list | None = None) -> torch.Tensor:
    """Per row, the summed log-probability of its `answer` under `model` (under `images`, if given, not its own)."""
    return response_log_likelihoods(model, processor, [
        {"images": [images[i]] if images else row["images"], "prompt": row["prompt"], "response": row[answer]}
        for i, row in enumerate(rows)])[0]


def run(args: argparse.Namespace) -> dict:
    """Train with the probe's loss; return the record of held-out answers before and after (a summary printed)."""
    model, processor = load_grounded_llava(args.model_dir)
    recipe = load_recipe(args.model_dir)
    scans = DigitScans(recipe.held_out_fraction, seed=recipe.seed)
    eval_rows = question_rows(scans, args.eval_rows, "held_out", np.random.default_rng([args.seed, 99]),
                              absent_fraction=0.25)
    base = answer_accuracy(model, processor, eval_rows)
    rows = preference_rows(scans, args.num_pairs, "train", np.random.default_rng([args.seed, 5]),
                           low_quality_fraction=0.4)
    subset = [row for row in rows if not row["low_quality"]] if args.rows == "clean" else rows
    rng = np.random.default_rng([args.seed, 7])
    corrupted = [corrupted_image(row, scans, rng) for row in subset]
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    order = np.random.default_rng([args.seed, 8])
    policy.train()
    for _ in range(args.steps):
        batch_index = order.choice(len(subset), size=min(args.batch_size, len(subset)), replace=False)
        batch = [subset[i] for i in batch_index]
        loss = torch.zeros(())
        if args.std_weight or args.anchor:
            chosen = log_likelihoods(policy, processor, batch, "chosen")
            with torch.no_grad():
                chosen_ref = log_likelihoods(reference, processor, batch, "chosen")
            if args.std_weight:
                rejected = log_likelihoods(policy, processor, batch, "rejected")
                with torch.no_grad():
                    rejected_ref = log_likelihoods(reference, processor, batch, "rejected")
                margin = (chosen - chosen_ref) - (rejected - rejected_ref)
                loss = loss + args.std_weight * -F.logsigmoid(args.beta * margin).mean()
            if args.anchor:
                loss = loss + args.anchor * -F.logsigmoid(args.beta * (chosen - chosen_ref)).mean()
        paired = [(subset[i], corrupted[i]) for i in batch_index if corrupted[i] is not None]
        if args.cond_weight and paired:
            rows_, images = [r for r, _ in paired], [image for _, image in paired]
            true, false = (log_likelihoods(policy, processor, rows_, "chosen"),
                           log_likelihoods(policy, processor, rows_, "chosen", images))
            with torch.no_grad():
                true_ref, false_ref = (log_likelihoods(reference, processor, rows_, "chosen"),
                                       log_likelihoods(reference, processor, rows_, "chosen", images))
            margin = (true - true_ref) - (false - false_ref)
            loss = loss + args.cond_weight * -F.logsigmoid(args.beta * margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    after = answer_accuracy(policy, processor, eval_rows)
    change = max(float((a - b).abs().max()) for a, b in zip(policy.parameters(), model.parameters()))
    record = {"arguments": vars(args), "base": base, "after": after, "train_rows": len(subset),
              "max_parameter_change": change}
    print(json.dumps({"base": [base["accuracy"], base["hallucination_rate"]],
                      "after": [after["accuracy"], after["hallucination_rate"]], "by_kind": after["by_kind"]}))
    return record


if __name__ == "__main__":
    run(parse_args())
