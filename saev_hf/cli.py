"""The `saev` command line.

One convention, as TRL's commands: each command parses its dataclasses with transformers' `HfArgumentParser` (the
same dataclasses the Python API takes, so every option is defined once), calls ONE library function, and prints what
it did. `saev COMMAND --help` opens with what the command does, then lists its options.

| command | library function |
|---|---|
| `convert`, `info` | `saev_hf.checkpoints.convert_checkpoint`, `checkpoint_info` |
| `demo` | `saev_hf.demo.run_demo` |
| `weights` | `saev_hf.weighting.run_weights` |
| `score` | `saev_hf.scoring.run_scoring` |
| `filter` | `saev_hf.filtering.run_filter` |
| `inspect` | `saev_hf.feature_browser.run_inspection` |
| `patches` | `saev_hf.patches.run_patch_filter` |
| `cache` | `saev_hf.cache.cache_activations` |
| `train` | `saev_hf.training.train_saev` (`train_saevs` with `--sweep`) |
| `eval` | `saev_hf.evaluation.run_evaluation` |
| `push` | `saev_hf.hub.run_push` |
| `dpo` | `saev_hf.dpo.run_dpo` |

Argument classes are imported only by the command that uses them, so `saev --help` stays fast and `saev info` never
imports TRL.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

from transformers import HfArgumentParser


@dataclass(frozen=True)
class Command:
    """A `saev` command: what it does (the opening of its `--help`), its argument dataclasses, and its body."""

    description: str
    arguments: Callable[[], tuple[type, ...]]
    run: Callable[..., None]


def _convert_arguments():
    from .checkpoints import ConvertArguments

    return (ConvertArguments,)


def convert(args) -> None:
    from .checkpoints import convert_checkpoint

    print(f"Wrote {args.source} as {args.to} layout to {convert_checkpoint(args)}")


def _info_arguments():
    from .checkpoints import InfoArguments

    return (InfoArguments,)


def info(args) -> None:
    from .checkpoints import checkpoint_info

    print(json.dumps(checkpoint_info(args), indent=2, default=str))


def _demo_arguments():
    from .demo import DemoArguments

    return (DemoArguments,)


def demo(args) -> None:
    from .demo import run_demo

    run_demo(args)  # the demo reports as it goes, and writes its report


def _shared_data_arguments():
    """What every data command reads (`SourceArguments`), its columns (`PromptFormat`), and how a map runs."""
    from .prompts import PromptFormat
    from .sources import MapArguments, SourceArguments

    return SourceArguments, PromptFormat, MapArguments


def _weights_arguments():
    from .weighting import WeightingArguments

    source, prompt_format, _ = _shared_data_arguments()
    return source, prompt_format, WeightingArguments


def weights(source, prompt_format, weighting) -> None:
    from .training import end_distributed
    from .weighting import run_weights

    sae = run_weights(source, prompt_format, weighting)
    end_distributed()  # under torchrun / accelerate launch: every process has the weights, the main one saved them
    info = sae.config.feature_weights_info
    if _is_main_process():
        print(f"{info['num_weighted_features']} of {sae.config.d_sae} features weighted over {info['num_examples']} "
              f"examples; delta (cooccurrence_threshold) = {sae.config.cooccurrence_threshold:.4g}; SAE-V with "
              f"weights saved to {source.output_dir}")


def _score_arguments():
    from .scoring import ScorerArguments

    source, prompt_format, map_arguments = _shared_data_arguments()
    return source, prompt_format, ScorerArguments, map_arguments


def score(source, prompt_format, scorer_args, map_args) -> None:
    from .scoring import run_scoring
    from .training import end_distributed

    scored, columns = run_scoring(source, prompt_format, scorer_args, map_args)
    end_distributed()  # under torchrun / accelerate launch: the main process wrote the assembled dataset
    if _is_main_process():
        print(f"Scored {len(scored)} examples ({', '.join(columns)}); saved to {source.output_dir}")


def _is_main_process() -> bool:
    """Whether this process reports (the first of a `torchrun` / `accelerate launch` run, or the only one)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _filter_arguments():
    from .filtering import FilterArguments, FilterIOArguments

    return FilterIOArguments, FilterArguments


def filter_command(io, filter_args) -> None:
    from .filtering import run_filter

    kept, rows_before = run_filter(io, filter_args)
    print(f"Kept {len(kept)} of {rows_before} examples by {filter_args.column}; saved to {io.output_dir}")


def _inspect_arguments():
    from .inspection import InspectionArguments

    source, prompt_format, _ = _shared_data_arguments()
    return source, prompt_format, InspectionArguments


def inspect_command(source, prompt_format, inspection_args) -> None:
    from .feature_browser import run_inspection

    inspection, index = run_inspection(source, prompt_format, inspection_args)
    print(f"Inspected {len(inspection.features)} features and explained {len(inspection.explanations)} rows of "
          f"{len(inspection.scanned_rows)} scanned; open {index}")


def _patches_arguments():
    from .patches import PatchFilterArguments

    source, prompt_format, map_arguments = _shared_data_arguments()
    return source, prompt_format, PatchFilterArguments, map_arguments


def patches(source, prompt_format, patch_args, map_args) -> None:
    from .patches import run_patch_filter

    masked, preview = run_patch_filter(source, prompt_format, patch_args, map_args)
    print(f"Masked the images of {len(masked)} examples (kept the top {patch_args.keep_fraction:.0%} of patches by "
          f"{patch_args.score}); saved to {source.output_dir}, preview in {preview}")


def _cache_arguments():
    from .cache import CacheArguments
    from .prompts import PromptFormat

    return CacheArguments, PromptFormat


def cache(args, prompt_format) -> None:
    from .cache import ActivationCache, cache_activations

    cached = ActivationCache(cache_activations(args, prompt_format))
    print(f"Cached {cached.num_tokens} tokens of layer {cached.layer} ({cached.num_rows} rows) in "
          f"{len(cached.shards)} shards; saved to {args.output_dir}")


def _train_arguments():
    from .sweep import SweepArguments
    from .training import SAEVTrainingArguments

    return SAEVTrainingArguments, SweepArguments


def train(args, sweep_args) -> None:
    from .training import end_distributed, train_saev, train_saevs

    if sweep_args.sweep is None:
        sae = train_saev(args)
        end_distributed()
        print(f"Trained an SAE-V with {sae.config.d_sae} features on {sae.config.training_tokens} tokens of layer "
              f"{sae.config.hook_layer}; saved to {args.output_dir}")
        return
    saes = train_saevs(args, sweep_args.sweep)
    end_distributed()
    tokens = next(iter(saes.values())).config.training_tokens
    print(f"Trained {len(saes)} SAE-Vs on the same {tokens} tokens of layer {args.layer} (one pass); saved to "
          f"{args.output_dir}/<member>, listed in {args.output_dir}/sweep.json:")
    for name, sae in saes.items():
        print(f"  {name}: {sae.config.d_sae} features")


def _eval_arguments():
    from .evaluation import SAEVEvaluationArguments

    return (SAEVEvaluationArguments,)


def evaluate(args) -> None:
    from .evaluation import format_metrics_table, run_evaluation

    print(format_metrics_table(run_evaluation(args)))


def _push_arguments():
    from .hub import PushArguments

    return (PushArguments,)


def push(args) -> None:
    from .hub import run_push

    print(run_push(args))


def _dpo_arguments():
    from .dpo import DPOScriptArguments, PaperDPOConfig

    return DPOScriptArguments, PaperDPOConfig


def dpo(script, args) -> None:
    from .dpo import run_dpo

    trainer = run_dpo(script, args)
    print(f"{script.method.upper()}: {trainer.state.global_step} steps on {script.dataset_name}; saved to "
          f"{args.output_dir}")


COMMANDS: dict[str, Command] = {
    "convert": Command("Convert an SAE-V checkpoint between saev-hf's layout and SAELens'.", _convert_arguments,
                       convert),
    "info": Command("Print an SAE-V checkpoint's configuration and feature-weight summary as JSON.", _info_arguments,
                    info),
    "demo": Command("Run SAE-V's data filter end to end on the grounded miniature (offline, CPU): train an SAE-V, "
                    "score and filter a preference dataset, DPO on each subset, write a report.", _demo_arguments,
                    demo),
    "weights": Command("Compute an SAE-V's cross-modal feature weights on a dataset (Algorithm 1, stages 1-2), "
                       "optionally calibrate delta, and save the SAE-V with them.",
                       _weights_arguments, weights),
    "score": Command("Add the SAE-V scores (cosine, L0, co-occurring L0) to every row of a dataset and save it.",
                     _score_arguments, score),
    "filter": Command("Keep the best-scored rows of a scored dataset (a top fraction, or a threshold) and save them "
                      "with the rule.", _filter_arguments, filter_command),
    "inspect": Command("Inspect an SAE-V on a dataset: feature pages (top examples with highlighted tokens and patch "
                       "heatmaps, weight, modality profile) and explanations of the lowest-scored rows, as a static "
                       "HTML report in --output_dir.", _inspect_arguments,
                       inspect_command),
    "patches": Command("Patch filter (Algorithms 4-7): score each image patch from SAE-V activations (--score l0, l1, "
                       "cooccur_l0, cosine, or random), keep the top --keep_fraction of each image's patches and "
                       "black out the rest; saves the dataset with masked images and patch scores to --output_dir, "
                       "with preview.png (originals above, masked below).",
                       _patches_arguments, patches),
    "cache": Command("Run the MLLM to decoder layer L once over a dataset and save the activations (with each token's "
                     "modality, row and position) in safetensors shards, for `saev train --activation_cache`; "
                     "resumes an interrupted run.", _cache_arguments, cache),
    "train": Command("Train an SAE-V on decoder layer L of an MLLM (or a plain SAE on a text-only LM); saves it to "
                     "--output_dir. With --sweep, train several SAE-Vs (e.g. over l1_coefficient, expansion_factor, "
                     "activation) from one pass of activations, each saved to its own folder in --output_dir.",
                     _train_arguments, train),
    "eval": Command("Evaluate an SAE-V: L0, MSE, explained variance, dead/dense features, CE-loss-recovered (all/"
                    "text/image).", _eval_arguments, evaluate),
    "push": Command("Push an SAE-V folder with its model card, a filtered dataset folder or an activation cache "
                    "(`saev cache`) with its dataset card, to the Hub.", _push_arguments, push),
    "dpo": Command("DPO (or --method sft) of an MLLM on a filtered preference dataset with TRL; the paper's "
                   "hyper-parameters are the defaults (CPU settings without a GPU); --lora adapts only the language "
                   "model's projections.", _dpo_arguments, dpo),
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
    command = COMMANDS[argv[0]]
    parser = HfArgumentParser(command.arguments(), prog=f"saev {argv[0]}", description=command.description)
    try:
        arguments = parser.parse_args_into_dataclasses(argv[1:])
    except ValueError as error:
        parser.error(str(error))
    from .loading import library_progress_bars

    # --disable_tqdm (an option of every command with a long step) also hides the bars datasets, transformers and
    # huggingface_hub draw themselves while the command loads, maps, saves and uploads.
    with library_progress_bars(disable=any(getattr(a, "disable_tqdm", False) for a in arguments)):
        command.run(*arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
