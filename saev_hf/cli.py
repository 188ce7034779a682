"""The `saev` command line.

Each command parses a dataclass with transformers' `HfArgumentParser`, the same dataclass the Python API takes, so
every option is defined once. `saev COMMAND --help` lists a command's options.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import HfArgumentParser


@dataclass
class ConvertArguments:
    """Convert an SAE-V checkpoint between saev-hf's layout and SAELens'."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint to read (either layout)."})
    output_dir: str = field(metadata={"help": "Folder to write to."})
    to: str = field(default="saev", metadata={"help": "Layout to write: 'saev' (transformers) or 'saelens'."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that `saev convert` did not write."},
    )

    def __post_init__(self) -> None:
        if self.to not in ("saev", "saelens"):
            raise ValueError(f"--to {self.to!r} is not a layout; use 'saev' or 'saelens'.")


@dataclass
class InfoArguments:
    """Print an SAE-V checkpoint's configuration and feature-weight summary as JSON."""

    source: str = field(metadata={"help": "Folder or Hub repo id of the checkpoint (either layout)."})
    subfolder: str | None = field(default=None, metadata={"help": "Subfolder of `source` holding the checkpoint."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `source` on the Hub."})


def _load(args: ConvertArguments | InfoArguments):
    from . import SAEV

    return SAEV.from_pretrained(args.source, subfolder=args.subfolder, revision=args.revision)


def convert(args: ConvertArguments) -> None:
    from .outputs import prepare_output_dir

    prepare_output_dir(args.output_dir, "saev convert", args.overwrite_output_dir)
    sae = _load(args)
    if args.to == "saelens":
        sae.save_saelens(args.output_dir)
    else:
        sae.save_pretrained(args.output_dir)
    print(f"Wrote {args.source} as {args.to} layout to {args.output_dir}")


def info(args: InfoArguments) -> None:
    sae = _load(args)
    summary = {
        "config": sae.config.to_diff_dict(),
        "num_weighted_features": int(sae.has_feature_weight.sum()),
        "num_features": sae.config.d_sae,
    }
    print(json.dumps(summary, indent=2, default=str))


def demo(args) -> None:
    from .demo import run_demo

    run_demo(args)


def _demo_arguments() -> type:
    from .demo import DemoArguments

    return DemoArguments


@dataclass
class SourceArguments:
    """Where the SAE-V, the MLLM and the dataset come from, and where results go (names as in `saev train`)."""

    sae_name_or_path: str = field(metadata={"help": "Folder or Hub repo of the SAE-V (either layout)."})
    model_name_or_path: str = field(metadata={"help": "Folder or Hub repo of the MLLM the SAE-V reads."})
    dataset_name: str = field(metadata={"help": "Hub dataset name, or a folder written by Dataset.save_to_disk."})
    output_dir: str = field(metadata={"help": "Folder to write the result to."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    sae_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of the SAE-V repo."})
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the MLLM on the Hub."})
    device: str = field(default="auto", metadata={"help": "'auto' (GPU if any), 'cpu', 'cuda:0'..."})
    cooccurrence_threshold: float | None = field(
        default=None,
        metadata={"help": "Set the SAE-V's co-occurrence bound delta (recorded in its config; `saev weights` saves "
                  "it with the SAE-V). Default: the SAE-V's own (the paper's 1.0 unless set or calibrated)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that this command did not write (they may be "
                  "replaced)."},
    )


@dataclass
class MapArguments:
    """How `datasets.map` runs the scorer."""

    batch_size: int = field(default=8, metadata={"help": "Examples per batch."})
    num_proc: int | None = field(default=None, metadata={"help": "Worker processes (one per GPU with GPUs)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (datasets' map and save)."})


def load_sources(source: SourceArguments, command: str | None = None):
    """The SAE-V, the MLLM (with its processor, on the chosen device) and the dataset named by `source`; with
    `command`, first checks that it may write into `source.output_dir` (before anything heavy is loaded)."""
    import torch

    from .outputs import prepare_output_dir

    if command is not None:
        prepare_output_dir(source.output_dir, command, source.overwrite_output_dir)
    from . import SAEV
    from .loading import load_dataset_split, load_model_and_processor

    device = source.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = SAEV.from_pretrained(source.sae_name_or_path, subfolder=source.sae_subfolder).to(device)
    if source.cooccurrence_threshold is not None:
        sae.set_cooccurrence_threshold(source.cooccurrence_threshold,
                                       info={"method": "set with --cooccurrence_threshold"})
    model, processor = load_model_and_processor(source.model_name_or_path, revision=source.model_revision, device=device)
    return sae, model, processor, load_dataset_split(source.dataset_name, source.dataset_config, source.dataset_split)


def weights(source: SourceArguments, prompt_format, weighting) -> None:
    from .activations import LayerReader
    from .weighting import compute_feature_weights

    if source.cooccurrence_threshold is not None and weighting.threshold_quantile is not None:
        raise ValueError(
            f"Give either --cooccurrence_threshold {source.cooccurrence_threshold} (set delta) or --threshold_quantile "
            f"{weighting.threshold_quantile} (calibrate it on the data), not both."
        )
    from .prompts import undecoded_images

    sae, model, processor, dataset = load_sources(source, "saev weights")
    dataset, _ = undecoded_images(dataset, prompt_format.image_column)  # a corrupt image names its row
    reader = LayerReader(model, processor, layer=sae.config.hook_layer, prompt_format=prompt_format)
    compute_feature_weights(sae, reader, dataset, weighting)
    sae.save_pretrained(source.output_dir)
    info = sae.config.feature_weights_info
    print(f"{info['num_weighted_features']} of {sae.config.d_sae} features weighted over {info['num_examples']} "
          f"examples; delta (cooccurrence_threshold) = {sae.config.cooccurrence_threshold:.4g}; SAE-V with weights "
          f"saved to {source.output_dir}")


def score(source: SourceArguments, prompt_format, scorer_args, map_args: MapArguments) -> None:
    from .scoring import SAEVScorer

    from .prompts import undecoded_images

    sae, model, processor, dataset = load_sources(source, "saev score")
    scorer = SAEVScorer(sae, model, processor, prompt_format=prompt_format, args=scorer_args)
    # the scorer reads the image bytes itself, so that a corrupt image names its row (or costs one null row)
    dataset, image_feature = undecoded_images(dataset, prompt_format.image_column)
    scored = dataset.map(scorer, batched=True, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                         with_indices=True, with_rank=map_args.num_proc is not None, desc="SAE-V scores")
    if image_feature is not None:
        scored = scored.cast_column(prompt_format.image_column, image_feature)
    scored.save_to_disk(source.output_dir)
    print(f"Scored {len(scored)} examples ({', '.join(scorer.columns)}); saved to {source.output_dir}")


@dataclass
class FilterIOArguments:
    """The scored dataset to filter and where to write the kept rows."""

    dataset_name: str = field(metadata={"help": "Folder of a scored dataset (save_to_disk), or a Hub dataset."})
    output_dir: str = field(metadata={"help": "Folder to save the filtered dataset to."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that `saev filter` did not write."},
    )


def filter_command(io: FilterIOArguments, filter_args) -> None:
    from .filtering import FILTER_RECORD, filter_by_score
    from .loading import load_dataset_split
    from .outputs import prepare_output_dir

    prepare_output_dir(io.output_dir, "saev filter", io.overwrite_output_dir)
    dataset = load_dataset_split(io.dataset_name, split=io.dataset_split)
    kept = filter_by_score(dataset, filter_args)
    kept.save_to_disk(io.output_dir)
    (Path(io.output_dir) / FILTER_RECORD).write_text(json.dumps(asdict(filter_args), indent=2))
    print(f"Kept {len(kept)} of {len(dataset)} examples by {filter_args.column}; saved to {io.output_dir}")


def _weights_arguments() -> tuple[type, ...]:
    from .prompts import PromptFormat
    from .weighting import WeightingArguments

    return SourceArguments, PromptFormat, WeightingArguments


def _score_arguments() -> tuple[type, ...]:
    from .prompts import PromptFormat
    from .scoring import ScorerArguments

    return SourceArguments, PromptFormat, ScorerArguments, MapArguments


def _filter_arguments() -> tuple[type, ...]:
    from .filtering import FilterArguments

    return FilterIOArguments, FilterArguments


def inspect_command(source: SourceArguments, prompt_format, inspection_args) -> None:
    """Inspect an SAE-V on a dataset: feature pages (top examples with highlighted tokens and patch heatmaps, weight,
    modality profile) and explanations of the lowest-scored rows, as a static HTML report in --output_dir."""
    from .activations import LayerReader
    from .feature_browser import write_feature_browser
    from .inspection import inspect_saev

    from .outputs import prepare_output_dir

    # the report is write_feature_browser's output, whether written from Python or from here
    prepare_output_dir(source.output_dir, "write_feature_browser", source.overwrite_output_dir)
    from .prompts import undecoded_images

    sae, model, processor, dataset = load_sources(source)
    dataset, _ = undecoded_images(dataset, prompt_format.image_column)  # a corrupt image names its row
    reader = LayerReader(model, processor, layer=sae.config.hook_layer, prompt_format=prompt_format)
    inspection = inspect_saev(sae, reader, dataset, inspection_args)
    index = write_feature_browser(inspection, source.output_dir, overwrite=source.overwrite_output_dir)
    print(f"Inspected {len(inspection.features)} features and explained {len(inspection.explanations)} rows of "
          f"{len(inspection.scanned_rows)} scanned; open {index}")


def _inspect_arguments() -> tuple[type, ...]:
    from .inspection import InspectionArguments
    from .prompts import PromptFormat

    return SourceArguments, PromptFormat, InspectionArguments


def patches(source: SourceArguments, prompt_format, patch_args, map_args: MapArguments) -> None:
    """Patch filter (Algorithms 4-7): score each image patch from SAE-V activations (--score l0, l1, cooccur_l0,
    cosine, or random), keep the top --keep_fraction of each image's patches and black out the rest; saves the dataset
    with masked images and patch scores to --output_dir, with preview.png (originals above, masked below)."""
    from .patches import PatchFilter, save_patch_preview

    from .prompts import undecoded_images

    sae, model, processor, dataset = load_sources(source, "saev patches")
    patch_filter = PatchFilter(sae, model, processor, prompt_format=prompt_format, args=patch_args)
    # the filter reads the image bytes itself, so that a corrupt image names its row (or costs one null row)
    dataset, image_feature = undecoded_images(dataset, prompt_format.image_column)
    masked = dataset.map(patch_filter, batched=True, batch_size=map_args.batch_size, num_proc=map_args.num_proc,
                         with_indices=True, with_rank=map_args.num_proc is not None,
                         desc=f"Patch filter ({patch_args.score})")
    if image_feature is not None:
        masked = masked.cast_column(prompt_format.image_column, image_feature)
    masked.save_to_disk(source.output_dir)
    preview = save_patch_preview(dataset, masked, Path(source.output_dir) / "preview.png",
                                 image_column=prompt_format.image_column,
                                 title=f"{patch_args.score}: top {patch_args.keep_fraction:.0%} of patches kept")
    print(f"Masked the images of {len(masked)} examples (kept the top {patch_args.keep_fraction:.0%} of patches by "
          f"{patch_args.score}); saved to {source.output_dir}, preview in {preview}")


def _patches_arguments() -> tuple[type, ...]:
    from .patches import PatchFilterArguments
    from .prompts import PromptFormat

    return SourceArguments, PromptFormat, PatchFilterArguments, MapArguments


def train(args) -> None:
    """Train an SAE-V on decoder layer L of an MLLM (or a plain SAE on a text-only LM); saves it to --output_dir."""
    from .training import train_saev

    sae = train_saev(args)
    print(f"Trained an SAE-V with {sae.config.d_sae} features on {sae.config.training_tokens} tokens of layer "
          f"{sae.config.hook_layer}; saved to {args.output_dir}")


def _train_arguments() -> type:
    from .training import SAEVTrainingArguments

    return SAEVTrainingArguments


def evaluate(args) -> None:
    """Evaluate an SAE-V: L0, MSE, explained variance, dead/dense features, CE-loss-recovered (all/text/image)."""
    from .evaluation import run_evaluation

    run_evaluation(args)


def _eval_arguments() -> type:
    from .evaluation import SAEVEvaluationArguments

    return SAEVEvaluationArguments


def push(args) -> None:
    """Push an SAE-V folder with its model card, or a filtered dataset folder with its dataset card, to the Hub."""
    from .hub import run_push

    run_push(args)


def _push_arguments() -> type:
    from .hub import PushArguments

    return PushArguments


def dpo(script, args) -> None:
    """DPO (or --method sft) of an MLLM on a filtered preference dataset with TRL; the paper's hyper-parameters are
    the defaults (CPU settings without a GPU); --lora adapts only the language model's projections."""
    from .dpo import run_dpo

    trainer = run_dpo(script, args)
    print(f"{script.method.upper()}: {trainer.state.global_step} steps on {script.dataset_name}; saved to "
          f"{args.output_dir}")


def _dpo_arguments() -> tuple[type, ...]:
    from .dpo import DPOScriptArguments, PaperDPOConfig

    return DPOScriptArguments, PaperDPOConfig


# command -> (its argument dataclass(es), or a function returning them so heavy modules load only when used; run)
COMMANDS: dict[str, tuple[Any, Callable[..., None]]] = {
    "convert": (ConvertArguments, convert),
    "info": (InfoArguments, info),
    "demo": (_demo_arguments, demo),
    "weights": (_weights_arguments, weights),
    "score": (_score_arguments, score),
    "filter": (_filter_arguments, filter_command),
    "inspect": (_inspect_arguments, inspect_command),
    "patches": (_patches_arguments, patches),
    "train": (_train_arguments, train),
    "eval": (_eval_arguments, evaluate),
    "push": (_push_arguments, push),
    "dpo": (_dpo_arguments, dpo),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `saev` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: saev COMMAND [options]   (commands: {names}; `saev COMMAND --help` for options)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"saev: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    classes, run = COMMANDS[argv[0]]
    if not isinstance(classes, (type, tuple)):
        classes = classes()
    classes = classes if isinstance(classes, tuple) else (classes,)
    parser = HfArgumentParser(classes, prog=f"saev {argv[0]}", description=run.__doc__ or classes[0].__doc__)
    try:
        arguments = parser.parse_args_into_dataclasses(argv[1:])
    except ValueError as error:
        parser.error(str(error))
    from .loading import library_progress_bars

    # --disable_tqdm (an option of every command with a long step) also hides the bars datasets, transformers and
    # huggingface_hub draw themselves while the command loads, maps, saves and uploads.
    with library_progress_bars(disable=any(getattr(a, "disable_tqdm", False) for a in arguments)):
        run(*arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
