"""Whether an SAE-V's co-occurrence bound delta can be reached: below it no feature co-occurs on image and text, and
every cosine score and co-occurring L0 would be 0. Read from the activation statistics that the feature weighting
stores in the SAE-V's config."""

from __future__ import annotations

import warnings


def check_cooccurrence(sae, where: str, error: bool = True) -> None:
    """
    Refuse (`error=True`; a warning otherwise) a delta under which no feature of `sae` can co-occur on its weighting
    data (every cosine score and co-occurring L0 would be 0), and warn when at most 1% of the features that fire on
    both modalities can.

    Reads the activation statistics that [`compute_feature_weights`] stores in `config.feature_weights_info`; an
    SAE-V without them (weights from an older version, or none) is not checked.
    """


    info = sae.config.feature_weights_info or {}
    bound, percentiles = info.get("cooccurrence_bound_max"), info.get("cooccurrence_bound_percentiles")
    if bound is None:
        return
    delta = sae.config.cooccurrence_threshold
    fix = (f"Set a delta below {bound:.4g} (SAEV.set_cooccurrence_threshold(...), or --cooccurrence_threshold in the "
           f"saev commands), or calibrate it on the weighting data (WeightingArguments(threshold_quantile=0.5), or "
           f"saev weights --threshold_quantile 0.5).")
    if delta >= bound:
        message = (
            f"While {where}: with cooccurrence_threshold (delta) = {delta:.4g}, no feature of this SAE-V can co-occur: "
            f"on the {info.get('num_examples')} weighting examples the largest activation any feature reached on "
            f"both text and image positions is {bound:.4g}, so every cosine score and co-occurring L0 would be 0. "
            f"{fix}"
        )
        if error:
            raise ValueError(message)
        warnings.warn(message, stacklevel=4)
        return
    if percentiles:
        share = sum(v > delta for v in percentiles[1:]) / (len(percentiles) - 1)
        if share <= 0.01:
            warnings.warn(
                f"While {where}: with cooccurrence_threshold (delta) = {delta:.4g}, at most 1% of the "
                f"{info.get('num_bimodal_features')} features that fire on both text and image positions reach it "
                f"on both (their median bound is {percentiles[50]:.4g}, the largest {bound:.4g}): almost every score "
                f"will be 0. {fix}",
                stacklevel=4,
            )
