"""What the features are and why a row scored what it did: top examples and modality profiles ([`inspect_saev`],
`inspection`), explanations of a row's score (`explanations`), the rows a report re-reads (`rows`), and the static HTML
report ([`write_feature_browser`], `feature_browser`), what a feature writes ([`feature_logits`], `logit_lens`) and
steering the model with features ([`steer`], `steering`), scored labels ([`label_features`], `labels`) and the
interactive explorer ([`Explorer`], `explorer`: `saev explore`)."""

from .explanations import ExampleExplanation, FeatureContribution
from .explorer import ExploreArguments, Explorer, build_explorer
from .feature_browser import run_inspection, write_feature_browser
from .inspection import FeatureSummary, Inspection, InspectionArguments, explain_rows, inspect_saev
from .labels import (
    FeatureLabel,
    LabelArguments,
    OpenAIChatExplainer,
    TransformersExplainer,
    label_features,
    read_labels,
    write_labels,
)
from .logit_lens import FeatureLogits, feature_logits
from .steering import SteerArguments, steer, steering_delta

__all__ = ["ExampleExplanation", "ExploreArguments", "Explorer", "FeatureContribution", "FeatureLabel", "FeatureLogits",
           "FeatureSummary", "Inspection", "InspectionArguments", "LabelArguments", "OpenAIChatExplainer",
           "SteerArguments", "TransformersExplainer", "build_explorer", "explain_rows", "feature_logits",
           "inspect_saev", "label_features", "read_labels", "run_inspection", "steer", "steering_delta",
           "write_feature_browser", "write_labels"]
