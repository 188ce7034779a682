"""Why an example scored what it did: [`ExampleExplanation`] lists the co-occurring features C(x) of the example with
their cross-modal weights, whose sum is the cosine score [`saev_hf.SAEVScorer`] gives it, computed the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..scoring.activity import example_activity


@dataclass
class FeatureContribution:
    """
    One co-occurring feature's part in an example's cosine score.

    Args:
        feature (`int`): the feature, a member of C(x).
        weight (`float`): its cross-modal weight w_f, NaN when it has none.
        contribution (`float`): what it adds to the cosine score: w_f, or 0 without a weight.
        max_text_activation (`float`): its largest activation over the example's text positions.
        max_image_activation (`float`): its largest activation over the example's image positions.
    """

    feature: int
    weight: float
    contribution: float
    max_text_activation: float
    max_image_activation: float


@dataclass
class ExampleExplanation:
    """
    Why an example scored what it did: its co-occurring features and their contributions to the cosine score.

    Args:
        row (`int`): the dataset row.
        cosine_score (`float`): the scorer's `saev_cosine_score`, the sum of the contributions.
        cooccur_l0 (`int`): |C(x)|, the scorer's `saev_cooccur_l0`.
        l0 (`float`): the scorer's `saev_l0`.
        contributions (`list[FeatureContribution]`): every member of C(x), largest |w_f| first, unweighted ones last.
        num_text_positions (`int`), num_image_positions (`int`): positions counted as text and as image.
        num_text_only (`int`), num_image_only (`int`): features above delta on text only, on image only.
        delta (`float`): the activation bound used.
    """

    row: int
    cosine_score: float
    cooccur_l0: int
    l0: float
    contributions: list[FeatureContribution]
    num_text_positions: int
    num_image_positions: int
    num_text_only: int
    num_image_only: int
    delta: float

    @property
    def num_weighted(self) -> int:
        """Members of C(x) that have a weight (the only ones that move the score)."""
        return sum(not math.isnan(c.weight) for c in self.contributions)

    @property
    def positive_total(self) -> float:
        """Sum of the positive contributions."""
        return sum(c.contribution for c in self.contributions if c.contribution > 0)

    @property
    def negative_total(self) -> float:
        """Sum of the negative contributions."""
        return sum(c.contribution for c in self.contributions if c.contribution < 0)

    def reasons(self, typical_cooccur: float | None = None) -> list[str]:
        """Plain-language reasons for the cosine score; `typical_cooccur`, the median |C(x)| of comparable rows, where
        known, says whether this row has few co-occurring features."""
        delta = f"delta={self.delta:g}"
        out = []
        if self.cooccur_l0 == 0:
            out.append(f"No feature exceeds {delta} at both a text and an image position: text and image share no "
                       f"concept the SAE-V sees, so the score is 0.")
        elif typical_cooccur is not None and self.cooccur_l0 < typical_cooccur:
            out.append(f"Few co-occurring features: {self.cooccur_l0}, where the median scanned row has "
                       f"{typical_cooccur:g}.")
        else:
            out.append(f"{self.cooccur_l0} co-occurring features (text and image both above {delta})"
                       + (f"; the median scanned row has {typical_cooccur:g}." if typical_cooccur is not None else "."))
        negative = [c for c in self.contributions if c.contribution < 0]
        if negative:
            many = len(negative) > 1
            what = "features have negative weights" if many else "feature has a negative weight"
            out.append(f"{len(negative)} co-occurring {what} ({'together ' if many else ''}{self.negative_total:.4g}); "
                       f"the positive ones add {self.positive_total:.4g}.")
        unweighted = self.cooccur_l0 - self.num_weighted
        if unweighted:
            verb = "has no cross-modal weight and adds" if unweighted == 1 else "have no cross-modal weight and add"
            out.append(f"{unweighted} of the {self.cooccur_l0} co-occurring features {verb} 0.")
        if self.num_text_only + self.num_image_only > self.cooccur_l0:
            out.append(f"Many features fire above {delta} on one modality only: {self.num_text_only} on text only, "
                       f"{self.num_image_only} on image only.")
        return out


@torch.no_grad()
def _explain(sae: Any, hidden: torch.Tensor, modality: torch.Tensor, row: int, special_as_text: bool,
             token_chunk: int, allow_tf32: bool = True) -> ExampleExplanation:
    """C(x) and its contributions for one example, computed as `SAEVScorer.score_rows` computes the score."""
    activity = example_activity(sae, hidden, modality, row, special_as_text, token_chunk, maxima=True,
                                allow_tf32=allow_tf32)
    return explanation_of(sae, activity, row)


def explanation_of(sae: Any, activity: Any, row: int) -> ExampleExplanation:
    """The [`ExampleExplanation`] of an example's [`ExampleActivity`] (computed with `maxima=True`)."""
    fires_text, fires_image, cooccur = activity.fires_text, activity.fires_image, activity.cooccurring
    weights = sae.feature_weights
    contributions = []
    for f in cooccur.nonzero().flatten().tolist():
        w = float(weights[f])
        contributions.append(FeatureContribution(f, w, 0.0 if math.isnan(w) else w, float(activity.max_text[f]),
                                                 float(activity.max_image[f])))
    contributions.sort(key=lambda c: (math.isnan(c.weight), -abs(c.contribution), c.feature))
    return ExampleExplanation(
        row=row,
        cosine_score=activity.cosine(weights),
        cooccur_l0=int(cooccur.sum()),
        l0=activity.l0,
        contributions=contributions,
        num_text_positions=activity.num_text,
        num_image_positions=activity.num_image,
        num_text_only=int((fires_text & ~fires_image).sum()),
        num_image_only=int((fires_image & ~fires_text).sum()),
        delta=sae.config.cooccurrence_threshold,
    )
