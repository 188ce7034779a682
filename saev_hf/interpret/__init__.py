"""What the features are and why a row scored what it did: top examples and modality profiles ([`inspect_saev`],
`inspection`), explanations of a row's score (`explanations`), the rows a report re-reads (`rows`), and the static HTML
report ([`write_feature_browser`], `feature_browser`), what a feature writes ([`feature_logits`], `logit_lens`) and
steering the model with features ([`steer`], `steering`)."""

from .explanations import ExampleExplanation, FeatureContribution
from .feature_browser import run_inspection, write_feature_browser
from .inspection import FeatureSummary, Inspection, InspectionArguments, explain_rows, inspect_saev
from .logit_lens import FeatureLogits, feature_logits
from .steering import SteerArguments, steer, steering_delta

__all__ = ["ExampleExplanation", "FeatureContribution", "FeatureLogits", "FeatureSummary", "Inspection",
           "InspectionArguments", "SteerArguments", "explain_rows", "feature_logits", "inspect_saev",
           "run_inspection", "steer", "steering_delta", "write_feature_browser"]
