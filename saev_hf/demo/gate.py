"""The gate before any DPO sweep: does the miniature have what SAE-V's data filter needs?

Four measurements on held-out scenes, each with its bar (``GateThresholds``):

(a) weighted features: how many SAE-V features get a cross-modal weight (K = 30, 5 text + 5 image, the paper's rule);
(b) concept features: for how many of the 15 concepts (10 digits, 5 colours) some feature fires (above the
    co-occurrence bound delta) on the concept's word in the question and, more than elsewhere, on the image cells that
    show it;
(c) the paper's prompt-only SAE-V cosine score separates consistent image-question pairs (the question names an
    object of the image) from inconsistent ones (the same question under another scene's image, without it): AUROC;
(d) the model's held-out answer accuracy.

A miniature that fails the gate cannot show the filter working, whatever a DPO sweep on it says.

Beside the gate, [`absence_knowledge`] asks whether DPO on faithful rows has something it can fix: whether the model
tells a present object from an absent one (the AUROC of its own margin for ``none`` / ``no``) and how much accuracy
moving that margin's threshold alone would buy. DPO from a few hundred rows shifts preferences between answers the
model already tells apart; it does not teach the model to see.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .scenes import CONCEPTS, DigitScans, ask, random_scene


@dataclass
class GateThresholds:
    """The bars of the gate (issue 12's)."""

    min_weighted_features: int = field(default=50, metadata={"help": "(a) features with a cross-modal weight."})
    min_concept_fraction: float = field(default=0.5, metadata={"help": "(b) share of concepts with a shared feature "
                                                                "(more than this: 'most')."})
    min_text_rate: float = field(default=0.5, metadata={"help": "(b) the feature fires on at least this share of the "
                                                         "concept's words in questions ..."})
    min_image_rate: float = field(default=0.5, metadata={"help": "(b) ... and of the image cells that show it ..."})
    min_image_ratio: float = field(default=2.0, metadata={"help": "(b) ... this many times more often than on the "
                                                          "other image cells."})
    min_auroc: float = field(default=0.75, metadata={"help": "(c) AUROC of the prompt-only cosine score."})
    min_accuracy: float = field(default=0.8, metadata={"help": "(d) held-out answer accuracy."})


REPRODUCIBILITY_TOLERANCE: dict[str, float] = {"weighted_features": 10, "shared_concepts": 1, "auroc": 0.03,
                                                 "delta_relative": 0.05}
"""How far the demo's SAE-V figures may move between environments (another CPU, torch build or BLAS), for the same
command: they are bit for bit the same across runs and thread counts on one machine
(`benchmarks/results/reproducibility.md`), but float32 rounding differs between CPUs and the SAE-V's training
amplifies it. Measured: 74 weighted features on the 2-core CI machine, 72 in another environment, 66 in an older
committed gate table, with the same concepts covered and gate AUROCs within 0.01."""


def consistency_pairs(scans: DigitScans, num_pairs: int, rng: np.random.Generator,
                      split: str = "held_out") -> list[dict[str, Any]]:
    """`num_pairs` consistent rows (a question naming an object of the scene: which / colour / where / exists) and as
    many inconsistent ones (the same question under the image of another scene that lacks the object), interleaved:
    ``{"images", "prompt", "consistent", "concept", "scene_concepts"}``."""
    rows = []
    for _ in range(num_pairs):
        scene = random_scene(rng, scans, split)
        question = ask(scene, ("which", "colour", "where", "exists")[rng.integers(4)], rng)
        other = random_scene(rng, scans, split, avoid={question.concept})
        for shown, consistent in ((scene, True), (other, False)):
            rows.append({"images": [shown.image(scans)], "prompt": question.text, "consistent": consistent,
                         "concept": question.concept, "scene_concepts": sorted(shown.concepts)})
    return rows


@dataclass
class ConceptFeature:
    """The best shared feature of one concept and how often it fires (above delta) where the concept is named or
    shown; `shared` says whether it clears the bars of [`GateThresholds`]. `top_k_text` / `top_k_image`: how many of
    the feature's top 30 positions over the rows are text / image (the paper's rule weights it only with 5 + 5);
    `text_mean` / `image_mean`: its mean activation on the concept's words / on the cells showing it."""

    concept: str
    feature: int
    text_rate: float
    image_rate: float
    elsewhere_rate: float
    weight: float | None
    shared: bool
    top_k_text: int = 0
    top_k_image: int = 0
    text_mean: float = 0.0
    image_mean: float = 0.0


@torch.no_grad()
def concept_features(sae, reader, rows: list[dict[str, Any]], thresholds: GateThresholds | None = None,
                     batch_size: int = 32) -> list[ConceptFeature]:
    """For each concept of [`CONCEPTS`], the feature that best fires both on the concept's word (text positions of
    the prompt) and on the image cells showing it, more than on other cells. `rows` are question rows about scenes
    (with ``"scene"``); image token `i` of a row is its scene's cell `i` (one patch per cell)."""
    from ..activations.reader import Modality
    from ..weighting.top_k import POSITION_STRIDE, FeatureTopK

    thresholds = thresholds or GateThresholds()
    delta = sae.config.cooccurrence_threshold
    tokenizer = reader.processor.tokenizer
    ids = {concept: tokenizer.convert_tokens_to_ids(concept) for concept in CONCEPTS}
    d_sae = sae.config.d_sae
    # per concept: firing counts (d_sae,) and number of positions, for its words, its cells, and the other cells
    counts = {where: {c: torch.zeros(d_sae) for c in CONCEPTS} for where in ("text", "shown", "elsewhere")}
    totals = {where: {c: 0 for c in CONCEPTS} for where in counts}
    sums = {where: {c: torch.zeros(d_sae) for c in CONCEPTS} for where in ("text", "shown")}
    top = FeatureTopK(d_sae, 30)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        acts = reader.read([{"images": r["images"], "prompt": r["prompt"]} for r in chunk], first_row=start)
        for i, row in enumerate(chunk):
            hidden, modality = acts.example(i)
            input_ids = acts.input_ids[i][acts.token_mask[i].to(acts.input_ids.device)].cpu()
            z = sae.encode(hidden.to(sae.W_enc.device)).float().cpu()
            is_image = modality.cpu() == Modality.IMAGE
            top.update(z, (start + i) * POSITION_STRIDE + torch.arange(len(z)), is_image)
            fires = (z > delta).float()
            image_z, image_fires = z[is_image], fires[is_image]
            cells = row["scene"].cell_words()
            for concept in CONCEPTS:
                said = (input_ids == ids[concept]) & ~is_image
                counts["text"][concept] += fires[said].sum(0)
                sums["text"][concept] += z[said].sum(0)
                totals["text"][concept] += int(said.sum())
                shown = torch.tensor([concept in words for words in cells])
                counts["shown"][concept] += image_fires[shown].sum(0)
                sums["shown"][concept] += image_z[shown].sum(0)
                totals["shown"][concept] += int(shown.sum())
                counts["elsewhere"][concept] += image_fires[~shown].sum(0)
                totals["elsewhere"][concept] += int((~shown).sum())
    result = []
    weights = sae.feature_weights
    in_top = top.values > 0
    top_text, top_image = (in_top & ~top.is_image).sum(0), (in_top & top.is_image).sum(0)
    for concept in CONCEPTS:
        rate = {where: counts[where][concept] / max(1, totals[where][concept]) for where in counts}
        ratio_ok = rate["shown"] >= thresholds.min_image_ratio * rate["elsewhere"]
        candidate = torch.minimum(rate["text"], rate["shown"]) * ratio_ok
        f = int(candidate.argmax())
        weight = float(weights[f])
        shared = bool(ratio_ok[f] and rate["text"][f] >= thresholds.min_text_rate
                      and rate["shown"][f] >= thresholds.min_image_rate and totals["text"][concept] > 0)
        means = {where: float(sums[where][concept][f]) / max(1, totals[where][concept]) for where in sums}
        result.append(ConceptFeature(concept, f, float(rate["text"][f]), float(rate["shown"][f]),
                                     float(rate["elsewhere"][f]), None if np.isnan(weight) else weight, shared,
                                     int(top_text[f]), int(top_image[f]), means["text"], means["shown"]))
    return result


def auroc(positive: np.ndarray, values: np.ndarray) -> float:
    """AUROC by pair counting (ties count half): the chance that a positive (clean, consistent) row outscores a
    negative one. 1 = perfect, 0.5 = chance, below 0.5 = inverted (the score prefers the negative rows)."""
    pos, neg = values[positive], values[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def absence_knowledge(model, processor, rows: list[dict[str, Any]], batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Per question kind that can name an absent object (which, colour, where, exists), what the model knows about
    absence, from its own answer log-likelihoods on question `rows` (see `scenes.question_rows`):

    - ``auroc``: how well its refusal margin (the log-likelihood of ``none`` / ``no`` minus that of its likeliest
      other answer) separates questions about absent objects from questions about present ones (1: perfectly);
    - ``accuracy``: its accuracy on the kind (it answers the likeliest candidate, i.e. refuses when the margin > 0);
    - ``best_shift_accuracy``: the accuracy if it refused when the margin exceeds the best single threshold instead
      of 0: what correcting its preference for refusing, and nothing else, could reach;
    - ``present_answer_accuracy``: on questions about present objects, how often its likeliest answer other than a
      refusal is right (what it sees, whatever it prefers);
    - ``rows`` and ``absent``: the counts.
    """
    from .grounded_llava import candidate_log_likelihoods

    scored = candidate_log_likelihoods(model, processor, rows, batch_size)
    result = {}
    for kind in ("which", "colour", "where", "exists"):
        refusal = "no" if kind == "exists" else "none"
        margins, absent, right_if_answered = [], [], []
        for row, (candidates, values) in zip(rows, scored):
            if row["kind"] != kind:
                continue
            at = candidates.index(refusal)
            others = [c for c in candidates if c != refusal]
            other_values = torch.cat([values[:at], values[at + 1:]])
            margins.append(float(values[at] - other_values.max()))
            absent.append(not row["present"])
            right_if_answered.append(others[int(other_values.argmax())] == row["response"])
        if not margins:
            continue
        margin, is_absent, right = np.array(margins), np.array(absent), np.array(right_if_answered)

        def accuracy_at(threshold: float) -> float:
            return float(np.mean(np.where(is_absent, margin > threshold, (margin <= threshold) & right)))

        result[kind] = {
            "auroc": auroc(is_absent, margin) if 0 < is_absent.sum() < len(margin) else None,
            "accuracy": accuracy_at(0.0),
            "best_shift_accuracy": max(accuracy_at(t) for t in [-np.inf, *margin]),
            "present_answer_accuracy": float(right[~is_absent].mean()) if (~is_absent).any() else None,
            "rows": len(margin), "absent": int(is_absent.sum()),
        }
    return result


def measure_gate(model, processor, sae, layer: int, scans: DigitScans, held_out_rows: list[dict[str, Any]],
                 answer_summary: dict[str, Any], num_pairs: int = 300, seed: int = 0,
                 thresholds: GateThresholds | None = None, batch_size: int = 32) -> dict[str, Any]:
    """The gate's four figures and verdicts for `model` and its SAE-V (with feature weights) on layer `layer`.

    `held_out_rows` are question rows about held-out scenes (for the concept features), `answer_summary` the model's
    [`answer_accuracy`] on held-out scenes. Returns a dict with ``weighted_features``, ``concepts`` (per concept, see
    [`ConceptFeature`]), ``auroc`` (cosine, l0 and co-occurring l0 on [`consistency_pairs`]), ``accuracy``, a
    ``passed`` verdict per condition and ``passed_all``.
    """
    import datasets

    from ..activations.reader import LayerReader
    from ..scoring.scorer import SAEVScorer

    thresholds = thresholds or GateThresholds()
    reader = LayerReader(model, processor, layer=layer)
    concepts = concept_features(sae, reader, held_out_rows, thresholds, batch_size)
    pairs = consistency_pairs(scans, num_pairs, np.random.default_rng([seed, 7]))
    scored = datasets.Dataset.from_list(pairs).map(SAEVScorer(sae, model, processor), batched=True,
                                                   batch_size=batch_size, desc="Gate: scoring image-question pairs")
    consistent = np.array(scored["consistent"], dtype=bool)
    aurocs = {name: auroc(consistent, np.array(scored[column], dtype=float))
             for name, column in (("cosine", "saev_cosine_score"), ("l0", "saev_l0"),
                                  ("cooccur_l0", "saev_cooccur_l0"))}
    weighted = int(sae.has_feature_weight.sum())
    shared = sum(c.shared for c in concepts)
    passed = {
        "a_weighted_features": weighted >= thresholds.min_weighted_features,
        "b_concept_features": shared > thresholds.min_concept_fraction * len(concepts),
        "c_auroc": aurocs["cosine"] >= thresholds.min_auroc,
        "d_accuracy": answer_summary["accuracy"] >= thresholds.min_accuracy,
    }
    return {
        "layer": layer,
        "cooccurrence_threshold": sae.config.cooccurrence_threshold,
        "d_sae": sae.config.d_sae,
        "weighted_features": weighted,
        "concepts": [asdict(c) for c in concepts],
        "shared_concepts": shared,
        "auroc": aurocs,
        "num_pairs": num_pairs,
        "accuracy": answer_summary["accuracy"],
        "accuracy_by_kind": answer_summary["by_kind"],
        "hallucination_rate": answer_summary["hallucination_rate"],
        "thresholds": asdict(thresholds),
        "passed": passed,
        "passed_all": all(passed.values()),
    }
