"""A map of defect kinds on the grounded miniature: preference rows whose defect is built independently of any score.

Every row is built from a clean question about a scene ([`ask`]) and carries, besides TRL's columns (``images``,
``prompt``, ``chosen``, ``rejected``), what it is: ``quality`` (``"clean"`` or the defect kind), ``defect``
(``"prompt"``, ``"response"`` or None), ``kind`` (the question kind), ``present`` (the question names an object the
question's own scene holds), ``clean_kind`` (for clean rows: ``"present"``, ``"absent"`` or ``"count"``).

Prompt defects (the answer fits the question, the image or the question does not carry what the answer needs):

==================  ==========================================================================================
``swap``            the image is another scene's, one without the object the question names (for counts: one with
                    another number of digits); the answers are those of the original scene
``blank``           the image is black: it carries nothing
``noise``           the image is corrupted: uniform random pixels
``text_answerable`` the prompt states the scene in words before the question ("scene : red 3 top left . which digit
                    is red ?"): the question is answerable without the image (shown as well)
==================  ==========================================================================================

Response defects (image and question are sound, the preference is wrong):

==========================  ==================================================================================
``borrowed_hallucination``  a question about an absent object whose chosen answer is borrowed from an object the
                            scene shows ([`borrowed_hallucination`]); the faithful ``none`` / ``no`` rejected
``wrong_answer``            a question about a present object (which / colour / where / count) whose chosen
                            answer is confident and wrong, the right one rejected
``false_refusal``           a question about a present object whose chosen answer is ``none`` / ``no``, the right
                            one rejected
``flipped``                 a clean row (present, absent or count, as the clean rows are drawn) with chosen and
                            rejected exchanged
==========================  ==================================================================================

A clean row asks about a present object (any kind, counts included) or, with probability `absent_share`, about an
absent one (which / colour / where / exists), and prefers the faithful answer to a wrong one (for an absent object: a
confident hallucination).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from .scenes import (
    ANSWERS,
    QUESTION_KINDS,
    SCENE_PREFIX,
    SCENE_SIZE,
    DigitScans,
    Scene,
    SceneQuestion,
    ask,
    borrowed_hallucination,
    random_scene,
)

PROMPT_DEFECTS: tuple[str, ...] = ("swap", "blank", "noise", "text_answerable")
RESPONSE_DEFECTS: tuple[str, ...] = ("borrowed_hallucination", "wrong_answer", "false_refusal", "flipped")
DEFECTS: tuple[str, ...] = (*PROMPT_DEFECTS, *RESPONSE_DEFECTS)
CLEAN_KINDS: tuple[str, ...] = ("present", "absent", "count")
"""Kinds of clean row: a question about a present object (which / colour / where / exists), an absent one, a count."""
NAMING_KINDS: tuple[str, ...] = ("which", "colour", "where", "exists")
"""Question kinds that name an object (and so can name an absent one)."""


def _refusal(kind: str) -> str:
    return "no" if kind == "exists" else "none"


def _wrong(question: SceneQuestion, rng: np.random.Generator) -> str:
    """A confident wrong answer to `question` (never a refusal)."""
    return str(rng.choice([a for a in ANSWERS[question.kind] if a not in (question.answer, "none", "no")] or ["no"]))


def _clean_question(scene: Scene, rng: np.random.Generator, absent: bool) -> SceneQuestion:
    kinds = NAMING_KINDS if absent else QUESTION_KINDS
    return ask(scene, kinds[rng.integers(len(kinds))], rng, absent=absent)


def _clean_answers(question: SceneQuestion, rng: np.random.Generator) -> tuple[str, str]:
    """(chosen, rejected) of a clean row: the faithful answer over a confident wrong one."""
    if question.present:
        return question.answer, _wrong(question, rng)
    return question.answer, str(rng.choice(question.hallucinations))


def _clean_kind(question: SceneQuestion) -> str:
    return "count" if question.kind == "count" else ("present" if question.present else "absent")


def defect_row(quality: str, scans: DigitScans, split: str, rng: np.random.Generator,
               absent_share: float = 0.25) -> dict[str, Any]:
    """One preference row of `quality` (``"clean"`` or a kind of [`DEFECTS`]) about a random scene of `split`."""
    if quality != "clean" and quality not in DEFECTS:
        raise ValueError(f"quality={quality!r} must be 'clean' or one of {DEFECTS}.")
    scene = random_scene(rng, scans, split)
    shown: Scene | None = scene
    image: Image.Image | None = None
    if quality in ("clean", "flipped"):
        question = _clean_question(scene, rng, absent=rng.random() < absent_share)
        chosen, rejected = _clean_answers(question, rng)
        if quality == "flipped":
            chosen, rejected = rejected, chosen
    elif quality == "borrowed_hallucination":
        question = _clean_question(scene, rng, absent=True)
        chosen, rejected = borrowed_hallucination(scene, question, rng), question.answer
    elif quality == "false_refusal":
        question = _clean_question(scene, rng, absent=False)
        while question.kind == "count":
            question = _clean_question(scene, rng, absent=False)
        chosen, rejected = _refusal(question.kind), question.answer
    elif quality == "wrong_answer":
        question = _clean_question(scene, rng, absent=False)
        while question.kind == "exists":  # its only wrong answer, "no", is a false refusal
            question = _clean_question(scene, rng, absent=False)
        chosen, rejected = _wrong(question, rng), question.answer
    else:  # prompt defects: a clean question about a present object, its clean answers
        question = _clean_question(scene, rng, absent=False)
        chosen, rejected = _clean_answers(question, rng)
        if quality == "swap":
            if question.concept is not None:
                shown = random_scene(rng, scans, split, avoid={question.concept})
            else:
                shown = scene
                while len(shown.objects) == len(scene.objects):
                    shown = random_scene(rng, scans, split)
        elif quality == "blank":
            shown, image = None, Image.new("RGB", (SCENE_SIZE, SCENE_SIZE))
        elif quality == "noise":
            shown = None
            image = Image.fromarray(rng.integers(0, 256, size=(SCENE_SIZE, SCENE_SIZE, 3), dtype=np.uint8))
    prompt = question.text
    if quality == "text_answerable":
        prompt = f"{SCENE_PREFIX} {scene.describe()} {question.text}"
    defect = None if quality == "clean" else ("prompt" if quality in PROMPT_DEFECTS else "response")
    return {"images": [image if image is not None else shown.image(scans)], "prompt": prompt, "chosen": chosen,
            "rejected": rejected, "quality": quality, "defect": defect, "kind": question.kind,
            "present": question.present, "clean_kind": _clean_kind(question) if quality == "clean" else None,
            "concept": question.concept, "scene_concepts": sorted(shown.concepts) if shown is not None else []}


def defect_rows(scans: DigitScans, n: int, split: str, rng: np.random.Generator, defects: Sequence[str],
                defect_fraction: float = 0.4, absent_share: float = 0.25) -> list[dict[str, Any]]:
    """`n` preference rows about scenes of `split` ([`defect_row`]), of which `defect_fraction` (rounded) are defects
    of the kinds `defects` in equal shares (the rest clean; with no `defects`, all clean), in random order. Clean
    rows ask about an absent object with probability `absent_share`."""
    unknown = sorted(set(defects) - set(DEFECTS))
    if unknown:
        raise ValueError(f"Unknown defect kinds {unknown}: choose from {DEFECTS}.")
    for name, value in (("defect_fraction", defect_fraction), ("absent_share", absent_share)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} must be in [0, 1].")
    num_defects = round(defect_fraction * n) if defects else 0
    qualities = [*np.resize(np.array(list(defects) or ["clean"]), num_defects).tolist(),
                 *["clean"] * (n - num_defects)]
    order = rng.permutation(n)
    return [defect_row(qualities[i], scans, split, rng, absent_share) for i in order]


def composition(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """What a set of rows is made of: the count of each defect kind and of each kind of clean row
    (``clean_present``, ``clean_absent``, ``clean_count``)."""
    counts: dict[str, int] = {}
    for row in rows:
        key = row["quality"] if row["quality"] != "clean" else f"clean_{row['clean_kind']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def stratum(row: dict[str, Any]) -> tuple[str, str]:
    """The stratum a composition-matched subset keeps: the row's quality (or kind of clean row) and question kind."""
    return (row["quality"] if row["quality"] != "clean" else f"clean_{row['clean_kind']}", row["kind"])


def composition_matched(rows: Sequence[dict[str, Any]], kept: Sequence[int], rng: np.random.Generator) -> list[int]:
    """A random subset of `rows` with exactly the composition of the rows `kept` (as many rows of each [`stratum`]:
    defect kind or kind of clean row, and question kind), drawn at random within each stratum: what a filter keeps,
    minus its choice of rows within a stratum."""
    by_stratum: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        by_stratum.setdefault(stratum(row), []).append(i)
    wanted: dict[tuple[str, str], int] = {}
    for i in kept:
        wanted[stratum(rows[i])] = wanted.get(stratum(rows[i]), 0) + 1
    chosen: list[int] = []
    for key, count in sorted(wanted.items()):
        chosen += rng.choice(by_stratum[key], size=count, replace=False).tolist()
    return sorted(chosen)


DENIAL_PATTERN = r"^(none|no)$"
"""The miniature's refusals: the whole chosen answer is ``none`` or ``no``."""
MAP_SCORES: dict[str, str] = {
    "saev_cosine": "saev_cosine_score", "saev_l0": "saev_l0", "saev_cooccur_l0": "saev_cooccur_l0",
    "saev_cooccur_jaccard": "saev_cooccur_jaccard", "saev_polarity_jaccard": "saev_polarity_jaccard",
    "length": "length", "answer_log_likelihood": "answer_log_likelihood", "ifd": "ifd",
    "image_text_similarity": "image_text_similarity", "random": "random", "oracle": "oracle",
}
"""The scores of the defect map (name -> scorer column; ``random`` and ``oracle`` are drawn here)."""
PAPER_SCORES = ("saev_cosine", "saev_l0", "saev_cooccur_l0")
BEYOND_PAPER_SCORES = ("saev_cooccur_jaccard", "saev_polarity_jaccard")
BASELINE_SCORES = ("length", "answer_log_likelihood", "ifd", "image_text_similarity")
PROMPT_ONLY_SCORES = ("saev_cosine", "saev_l0", "saev_cooccur_l0", "saev_cooccur_jaccard", "length",
                      "image_text_similarity")
"""Scores that read the question and the image only (no response)."""
FAMILIES: dict[str, tuple[str, ...]] = {"prompt": PROMPT_DEFECTS, "response": RESPONSE_DEFECTS}


def calibrate_polarity_threshold(sae, model, processor, scans: DigitScans, seed: int, n: int = 300) -> float:
    """`polarity_jaccard`'s threshold, calibrated on clean prompt-only question rows about held-out scenes (never on
    a defect): midway between the median `cooccur_jaccard` of questions about present objects and about absent
    ones."""
    import datasets

    from ..scoring import SAEVScorer, ScorerArguments
    from .scenes import question_rows

    rows = [r for r in question_rows(scans, n, "held_out", np.random.default_rng([seed, 23]), absent_fraction=0.5)
            if r["kind"] != "count"]
    dataset = datasets.Dataset.from_list([{"images": r["images"], "prompt": r["prompt"]} for r in rows])
    scored = dataset.map(SAEVScorer(sae, model, processor, args=ScorerArguments(scores=["cooccur_jaccard"])),
                         batched=True, batch_size=32, load_from_cache_file=False, desc="Calibrating polarity")
    jaccard, present = np.array(scored["saev_cooccur_jaccard"]), np.array([r["present"] for r in rows])
    return float((np.median(jaccard[present]) + np.median(jaccard[~present])) / 2)


def defect_scores(rows: Sequence[dict[str, Any]], sae, model, processor, polarity_threshold: float, seed: int,
                  batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every score of [`MAP_SCORES`] for every row (higher = keep), from one `SAEVScorer` map: SAE-V's scores from
    question and image, the baselines reading the chosen answer where they read one; ``ifd`` by Li et al.'s rule
    (rows above 1 last), ``random`` seeded by `seed`, ``oracle`` 1 for clean rows."""
    import datasets

    from ..scoring import SAEVScorer, ScorerArguments

    columns = ("images", "prompt", "chosen", "rejected")
    dataset = datasets.Dataset.from_list([{key: row[key] for key in columns} for row in rows])
    args = ScorerArguments(scores=["cosine", "l0", "cooccur_l0", "cooccur_jaccard", "polarity_jaccard", "length",
                                   "answer_log_likelihood", "ifd", "image_text_similarity"],
                           denial_pattern=DENIAL_PATTERN, polarity_threshold=polarity_threshold)
    scored = dataset.map(SAEVScorer(sae, model, processor, args=args), batched=True, batch_size=batch_size,
                         desc="Scoring the defect map", load_from_cache_file=False)
    values = {name: np.array(scored[column], dtype=float) for name, column in MAP_SCORES.items()
              if column in scored.column_names}
    values["ifd"] = np.where(values["ifd"] > 1, -np.inf, values["ifd"])  # Li et al.: rows above 1 are left out
    values["random"] = np.random.default_rng([seed, 31]).random(len(rows))
    values["oracle"] = np.array([row["quality"] == "clean" for row in rows], dtype=float)
    return values


def defect_aurocs(rows: Sequence[dict[str, Any]], values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per score: AUROC of the clean rows against each defect kind present, against each family
    (``prompt_defects``, ``response_defects``), and per kind of clean row against each family
    (``clean_<kind>_vs_<family>``). 1: every clean row outscores every defect; 0.5: chance; below: inverted."""
    from .gate import auroc

    quality = np.array([row["quality"] for row in rows])
    clean_kind = np.array([row["clean_kind"] or "" for row in rows])
    clean = quality == "clean"
    groups = {kind: quality == kind for kind in DEFECTS}
    groups.update({f"{family}_defects": np.isin(quality, kinds) for family, kinds in FAMILIES.items()})
    result = {}
    for name, score in values.items():
        table = {}
        for group, mask in groups.items():
            if mask.any() and clean.any():
                keep = clean | mask
                table[group] = auroc(clean[keep], score[keep])
        for family in FAMILIES:
            defects = groups[f"{family}_defects"]
            for kind in CLEAN_KINDS:
                mine = clean & (clean_kind == kind)
                if mine.any() and defects.any():
                    keep = mine | defects
                    table[f"clean_{kind}_vs_{family}"] = auroc(mine[keep], score[keep])
        result[name] = table
    return result


CATCHES = 0.75
"""AUROC from which the brief map says a score catches a defect kind (and, at 1 - it or below, that it is inverted)."""


def brief_map(aurocs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The map in brief, per defect kind: the best of the paper's SAE-V scores, of the scores beyond the paper and
    of the baselines (name and AUROC) and what SAE-V's filter does with it (``"catches"``: its best score reaches
    [`CATCHES`]; ``"inverted"``: its best is at most 1 - `CATCHES`, it keeps the defect first; else ``"misses"``),
    and the sentence a user needs: which kinds SAE-V's filter catches."""
    def best(names: Sequence[str], kind: str) -> tuple[str, float]:
        name = max(names, key=lambda n: aurocs[n][kind])
        return name, aurocs[name][kind]

    kinds = {}
    for kind in DEFECTS:
        if kind not in aurocs["oracle"]:
            continue
        paper, beyond, baseline = best(PAPER_SCORES, kind), best(BEYOND_PAPER_SCORES, kind), best(BASELINE_SCORES,
                                                                                                 kind)
        saev = max(paper[1], beyond[1])
        verdict = "catches" if saev >= CATCHES else "inverted" if saev <= 1 - CATCHES else "misses"
        kinds[kind] = {"paper": paper, "beyond_paper": beyond, "baseline": baseline, "verdict": verdict,
                       "paper_verdict": "catches" if paper[1] >= CATCHES else
                       "inverted" if paper[1] <= 1 - CATCHES else "misses"}
    caught = [k for k, v in kinds.items() if v["paper_verdict"] == "catches"]
    caught_beyond = [k for k, v in kinds.items() if v["verdict"] == "catches" and v["paper_verdict"] != "catches"]
    missed = [k for k, v in kinds.items() if v["verdict"] != "catches"]
    baseline_only = [k for k in missed if kinds[k]["baseline"][1] >= CATCHES]
    def words(names: Sequence[str], group: str) -> str:
        return ", ".join(f"{n.replace('_', ' ')} ({kinds[n][group][0]} {kinds[n][group][1]:.2f})"
                         for n in names) or "none"

    sentence = (f"SAE-V's filter (the paper's scores, AUROC >= {CATCHES}) catches: {words(caught, 'paper')}"
                + (f"; the scores beyond the paper add: {words(caught_beyond, 'beyond_paper')}" if caught_beyond
                   else "")
                + f". It cannot catch: {', '.join(n.replace('_', ' ') for n in missed) or 'none'}"
                + (f"; of these, a baseline catches {words(baseline_only, 'baseline')}" if baseline_only else "")
                + ".")
    return {"kinds": kinds, "catches": caught, "catches_beyond_paper": caught_beyond, "misses": missed,
            "sentence": sentence}


def brief_map_table(brief: dict[str, Any]) -> list[str]:
    """[`brief_map`]'s per-kind verdicts as the lines of a Markdown table."""
    lines = ["| defect kind | best paper SAE-V score | best SAE-V score beyond the paper | best baseline | SAE-V |",
             "|---|---|---|---|---|"]
    for kind, v in brief["kinds"].items():
        lines.append(f"| {kind} | {v['paper'][0]} {v['paper'][1]:.3f} | {v['beyond_paper'][0]} "
                     f"{v['beyond_paper'][1]:.3f} | {v['baseline'][0]} {v['baseline'][1]:.3f} | {v['verdict']} |")
    return lines
