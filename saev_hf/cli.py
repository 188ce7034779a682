"""The `saev` command line.

One convention, as TRL's commands: each command parses its dataclasses with transformers' `HfArgumentParser` (the
same dataclasses the Python API takes, so every option is declared once: the shared ones in
[`saev_hf.arguments`]), calls ONE library function, and prints what it did. `saev COMMAND --help` opens with what the
command does, then lists its options.

| command | arguments | library function |
|---|---|---|
| `convert`, `info` | SAE, convert, output | `saev_hf.model.convert.convert_checkpoint`, `checkpoint_info` |
| `cache` | model, data, columns, cache | `saev_hf.cache.cache_activations` |
| `train` | model, data, columns, training, sweep | `saev_hf.training.train_saev` (`train_saevs` with `--sweep`) |
| `eval` | SAE, model, data, columns, evaluation, output | `saev_hf.evaluation.run_evaluation` |
| `weights` | SAE, model, data, columns, weighting, output | `saev_hf.weighting.run_weights` |
| `score` | SAE, model, data, columns, scorer, map, output | `saev_hf.scoring.run_scoring` |
| `filter` | data, filter, output | `saev_hf.alignment.run_filter` |
| `dpo` | model, data, DPO script, `PaperDPOConfig` | `saev_hf.alignment.dpo.run_dpo` |
| `inspect` | SAE, model, data, columns, inspection, output | `saev_hf.interpret.run_inspection` |
| `label` | SAE, model, data, columns, explainer, labels, output | `saev_hf.interpret.labels.run_labels` |
| `patches` | SAE, model, data, columns, patch filter, map, output | `saev_hf.patches.run_patch_filter` |
| `steer` | SAE, model, steer | `saev_hf.interpret.steering.run_steering` |
| `explore` | SAE, model, explore | `saev_hf.interpret.explorer.run_explorer` |
| `push` | push | `saev_hf.hub.run_push` |
| `demo` | demo | `saev_hf.demo.run_demo` |

Two commands import their code when they run: `dpo` (TRL costs about 5 s to import: `saev info` must not pay it) and
`demo` (the miniature is never imported on the path a real model takes); `explore` imports the demo only when no model
is named (it then shows the embedded one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import HfArgumentParser

from .alignment.filtering import FilterArguments, run_filter
from .arguments import DataArguments, ModelArguments, SAEArguments
from .cache.activation_cache import ActivationCache
from .cache.writer import CacheArguments, cache_activations
from .data.errors import RowError
from .data.prompts import PromptFormat
from .evaluation.metrics import SAEVEvaluationArguments
from .evaluation.report import format_metrics_table, run_evaluation
from .hub.push_command import PushArguments, run_push
from .interpret.explorer import ExploreArguments, check_explorer_sources, run_explorer
from .interpret.feature_browser import run_inspection
from .interpret.inspection import InspectionArguments
from .interpret.labels import ExplainerArguments, LabelArguments, run_labels
from .interpret.steering import SteerArguments, run_steering
from .model.convert import ConvertArguments, checkpoint_info, convert_checkpoint
from .patches.filter import PatchFilterArguments, run_patch_filter
from .runtime.distributed import end_distributed
from .runtime.folders import OutputArguments
from .runtime.progress import progress_bars
from .scoring.mapping import MapArguments
from .scoring.scorer import ScorerArguments, run_scoring
from .training.arguments import SAEVTrainingArguments
from .training.sweep import SweepArguments
from .training.trainer import train_saev, train_saevs
from .weighting.weights import WeightingArguments, run_weights

SOURCES = (SAEArguments, ModelArguments, DataArguments, PromptFormat)
"""What the commands that run an SAE-V over data read: the SAE-V, the MLLM, the dataset and its columns."""


@dataclass(frozen=True)
class Command:
    """A `saev` command: what it does (the opening of its `--help`), its argument dataclasses (a callable, so that a
    command whose code is imported when it runs can name them then), its body, and the checks across its dataclasses
    that run right after parsing (a `ValueError` there is a usage error: the parser prints it and exits with 2)."""

    description: str
    arguments: Callable[[], tuple[type, ...]]
    run: Callable[..., None]
    check: Callable[..., None] | None = None


def _sources_check(command: str, cache_allowed: bool = False) -> Callable[..., None]:
    """The check of a command that reads an MLLM and a dataset (or, where `cache_allowed`, an activation cache)."""

    def check(*arguments) -> None:
        model = next(a for a in arguments if isinstance(a, ModelArguments))
        data = next(a for a in arguments if isinstance(a, DataArguments))
        prompt_format = next((a for a in arguments if isinstance(a, PromptFormat)), None)
        if prompt_format is not None:
            data.check_columns(prompt_format.image_column, prompt_format.prompt_column)
        evaluation = next((a for a in arguments if isinstance(a, SAEVEvaluationArguments)), None)
        if evaluation is not None:
            evaluation.check_source(model, data)
        else:
            data.check_source(model, command, cache_allowed)

    return check


def convert(sae_args, args, output) -> None:
    output.prepare("saev convert")  # before loading: a refused folder costs no download
    folder = convert_checkpoint(sae_args.load(), args, output)
    print(f"Wrote {sae_args.sae_name_or_path} as {args.to} layout to {folder}")


def info(sae_args) -> None:
    print(json.dumps(checkpoint_info(sae_args.load()), indent=2, default=str))


def cache(model_args, data_args, prompt_format, args) -> None:
    cached = ActivationCache(cache_activations(args, prompt_format, model=model_args, dataset=data_args))
    data_args.write_fetch_report(args.output_dir)
    print(f"Cached {cached.num_tokens} tokens of layer {cached.layer} ({cached.num_rows} rows) in "
          f"{len(cached.shards)} shards; saved to {args.output_dir}")


def train(model_args, data_args, prompt_format, args, sweep_args) -> None:
    sources = dict(model=model_args, dataset=data_args, prompt_format=prompt_format)
    if sweep_args.sweep is None:
        sae = train_saev(args, **sources)
        data_args.write_fetch_report(args.output_dir)
        end_distributed()
        print(f"Trained an SAE-V with {sae.config.d_sae} features on {sae.config.training_tokens} tokens of layer "
              f"{sae.config.hook_layer}; saved to {args.output_dir}")
        return
    saes = train_saevs(args, sweep_args.sweep, **sources)
    data_args.write_fetch_report(args.output_dir)
    end_distributed()
    tokens = next(iter(saes.values())).config.training_tokens
    print(f"Trained {len(saes)} SAE-Vs on the same {tokens} tokens of layer {args.layer} (one pass); saved to "
          f"{args.output_dir}/<member>, listed in {args.output_dir}/sweep.json:")
    for name, sae in saes.items():
        print(f"  {name}: {sae.config.d_sae} features")


def evaluate(sae_args, model_args, data_args, prompt_format, args, output) -> None:
    print(format_metrics_table(run_evaluation(sae_args, model_args, data_args, prompt_format, args, output)))


def weights(sae_args, model_args, data_args, prompt_format, weighting, output) -> None:
    sae = run_weights(sae_args, model_args, data_args, prompt_format, weighting, output)
    end_distributed()  # under torchrun / accelerate launch: every process has the weights, the main one saved them
    info = sae.config.feature_weights_info
    if _is_main_process():
        mean = info.get("mean_cosine_score")
        print(f"{info['num_weighted_features']} of {sae.config.d_sae} features weighted over {info['num_examples']} "
              f"examples" + (f" (mean cosine score {mean:.4f}: the model-level score)" if mean is not None else "")
              + f"; delta (cooccurrence_threshold) = {sae.config.cooccurrence_threshold:.4g}; SAE-V with "
              f"weights saved to {output.output_dir}")


def score(sae_args, model_args, data_args, prompt_format, scorer_args, map_args, output) -> None:
    scored, columns = run_scoring(sae_args, model_args, data_args, prompt_format, scorer_args, map_args, output)
    end_distributed()  # under torchrun / accelerate launch: the main process wrote the assembled dataset
    if _is_main_process():
        print(f"Scored {len(scored)} examples ({', '.join(columns)}); saved to {output.output_dir}")


def _is_main_process() -> bool:
    """Whether this process reports (the first of a `torchrun` / `accelerate launch` run, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def filter_command(data_args, filter_args, output) -> None:
    kept, rows_before = run_filter(data_args, filter_args, output)
    print(f"Kept {len(kept)} of {rows_before} examples by {filter_args.column}; saved to {output.output_dir}")


def _dpo_arguments():
    from .alignment.dpo import DPOScriptArguments, PaperDPOConfig

    return ModelArguments, DataArguments, DPOScriptArguments, PaperDPOConfig


def dpo(model_args, data_args, script, args) -> None:
    from .alignment.dpo import run_dpo

    trainer = run_dpo(model_args, data_args, script, args)
    print(f"{script.method.upper()}: {trainer.state.global_step} steps on {data_args.dataset_name}; saved to "
          f"{args.output_dir}")


def inspect_command(sae_args, model_args, data_args, prompt_format, inspection_args, output) -> None:
    inspection, index = run_inspection(sae_args, model_args, data_args, prompt_format, inspection_args, output)
    print(f"Inspected {len(inspection.features)} features and explained {len(inspection.explanations)} rows of "
          f"{len(inspection.scanned_rows)} scanned; open {index}")


def label_command(sae_args, model_args, data_args, prompt_format, explainer_args, label_args, output) -> None:
    labels, path = run_labels(sae_args, model_args, data_args, prompt_format, explainer_args, label_args, output)
    scored = sum(label.detection is not None for label in labels.values())
    print(f"Labelled {len(labels)} of {len(explainer_args.features)} features ({scored} with a detection score); "
          f"wrote {path} and {path.with_name('labels.md')}")


def steer_command(sae_args, model_args, args) -> None:
    texts = run_steering(sae_args, model_args, args)
    print(f"Without steering: {texts['plain']}")
    print(f"With {args.features or 'no feature'} clamped ({args.positions} positions): {texts['steered']}")


def explore(sae_args, model_args, args) -> None:
    sources = None
    if sae_args.sae_name_or_path is None:  # neither named (checked at parse time): the embedded demo model
        from .demo.explorer_default import demo_explorer_sources

        sources = demo_explorer_sources(args.demo_saev_steps)
    run_explorer(sae_args, model_args, args, sources=sources)  # serves until Ctrl-C


def patches(sae_args, model_args, data_args, prompt_format, patch_args, map_args, output) -> None:
    masked, preview = run_patch_filter(sae_args, model_args, data_args, prompt_format, patch_args, map_args, output)
    print(f"Masked the images of {len(masked)} examples (kept the top {patch_args.keep_fraction:.0%} of patches by "
          f"{patch_args.score}); saved to {output.output_dir}, preview in {preview}")


def push(args) -> None:
    print(run_push(args))


def _demo_arguments():
    from .demo import DemoArguments

    return (DemoArguments,)


def demo(args) -> None:
    from .demo import run_demo

    run_demo(args)  # the demo reports as it goes, and writes its report


COMMANDS: dict[str, Command] = {
    "convert": Command(
        "Convert an SAE-V checkpoint between saev-hf's layout and SAELens'.",
        lambda: (SAEArguments, ConvertArguments, OutputArguments), convert),
    "info": Command(
        "Print an SAE-V checkpoint's configuration and feature-weight summary as JSON.",
        lambda: (SAEArguments,), info),
    "cache": Command(
        "Run the MLLM to decoder layer L once over a dataset and save the activations (with each token's modality, row "
        "and position) in safetensors shards, for `saev train --activation_cache`; resumes an interrupted run.",
        lambda: (ModelArguments, DataArguments, PromptFormat, CacheArguments), cache, _sources_check("saev cache")),
    "train": Command(
        "Train an SAE-V on decoder layer L of an MLLM (or a plain SAE on a text-only LM); saves it to --output_dir. "
        "With --sweep, train several SAE-Vs (e.g. over l1_coefficient, expansion_factor, activation) from one pass of "
        "activations, each saved to its own folder in --output_dir.",
        lambda: (ModelArguments, DataArguments, PromptFormat, SAEVTrainingArguments, SweepArguments), train,
        _sources_check("saev train", cache_allowed=True)),
    "eval": Command(
        "Evaluate an SAE-V: L0, MSE, explained variance, dead/dense features, CE-loss-recovered, SAEBench's KL, L2 "
        "ratio and feature density (all/text/image), and with --probe_label_column sparse probing; with --output_dir, "
        "also written to metrics.json (what `saev push --metrics_json` reads).",
        lambda: (*SOURCES, SAEVEvaluationArguments, OutputArguments), evaluate,
        _sources_check("saev eval", cache_allowed=True)),
    "weights": Command(
        "Compute an SAE-V's cross-modal feature weights on a dataset (Algorithm 1, stages 1-2), optionally calibrate "
        "delta, and save the SAE-V with them.",
        lambda: (*SOURCES, WeightingArguments, OutputArguments), weights,
        _sources_check("saev weights", cache_allowed=True)),
    "score": Command(
        "Add the SAE-V scores (cosine, L0, co-occurring L0) and any baselines (--scores: length, "
        "answer_log_likelihood, ifd, image_text_similarity, clip_score) to every row of a dataset and save it.",
        lambda: (*SOURCES, ScorerArguments, MapArguments, OutputArguments), score, _sources_check("saev score")),
    "filter": Command(
        "Keep the best-scored rows of a scored dataset (a top fraction, or a threshold) and save them with the rule.",
        lambda: (DataArguments, FilterArguments, OutputArguments), filter_command),
    "dpo": Command(
        "DPO (or --method sft) of an MLLM on a filtered preference dataset with TRL; the paper's hyper-parameters are "
        "the defaults (CPU settings without a GPU); --lora adapts only the language model's projections.",
        _dpo_arguments, dpo),
    "inspect": Command(
        "Inspect an SAE-V on a dataset: feature pages (top examples with highlighted tokens and patch heatmaps, "
        "weight, modality profile) and explanations of the lowest-scored rows, as a static HTML report in "
        "--output_dir.",
        lambda: (*SOURCES, InspectionArguments, OutputArguments), inspect_command, _sources_check("saev inspect")),
    "label": Command(
        "Label SAE-V features with an explainer (a local chat model, or an OpenAI-compatible endpoint) from their top "
        "text contexts and image patches, and score each label by detection on held-out rows (accuracy, precision, "
        "recall, F1); writes labels.json and labels.md to --output_dir.",
        lambda: (*SOURCES, ExplainerArguments, LabelArguments, OutputArguments), label_command,
        _sources_check("saev label")),
    "patches": Command(
        "Patch filter (Algorithms 4-7): score each image patch from SAE-V activations (--score l0, l1, cooccur_l0, "
        "cosine, or random), keep the top --keep_fraction of each image's patches and black out the rest; saves the "
        "dataset with masked images and patch scores to --output_dir, with preview.png (originals above, masked "
        "below).",
        lambda: (*SOURCES, PatchFilterArguments, MapArguments, OutputArguments), patches,
        _sources_check("saev patches")),
    "steer": Command(
        "Generate from an image and a prompt with SAE-V features clamped at layer L (FEATURE=VALUE; 0 ablates) and "
        "without, and print both: the causal test of what a feature does.",
        lambda: (SAEArguments, ModelArguments, SteerArguments), steer_command),
    "explore": Command(
        "Start the interactive explorer (a Gradio app): upload an image and type a prompt to see which features fire "
        "where, the SAE-V scores and why, each feature's page (logit lens, label, top examples), and steer the model. "
        "With no --sae_name_or_path and --model_name_or_path: the embedded demo model and its SAE-V.",
        lambda: (SAEArguments, ModelArguments, ExploreArguments), explore, check_explorer_sources),
    "push": Command(
        "Push an SAE-V folder with its model card, a filtered dataset folder or an activation cache (`saev cache`) "
        "with its dataset card, to the Hub; or, with --space, the explorer app for a Hub SAE-V and model as a Space.",
        lambda: (PushArguments,), push),
    "demo": Command(
        "Run SAE-V's data filter end to end on the grounded miniature (offline, CPU): train an SAE-V, score and "
        "filter a preference dataset, DPO on each subset, write a report.",
        _demo_arguments, demo),
}


CONFIG_HELP = ("--config FILE: read options from a YAML or JSON file (the option names as keys; a recipe's section named "
               "after the command, and its top-level options that the command has); options given on the command "
               "line override the file's.")


def load_config(path: str) -> dict[str, Any]:
    """A config file's mapping (YAML, or JSON, which YAML reads too)."""
    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except OSError as error:
        raise ValueError(f"--config {path}: cannot be read ({error.strerror}).") from error
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML or JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values, not {type(config).__name__}.")
    return config


def apply_config(parser: Any, command: str, argv: list[str]) -> list[str]:
    """
    `argv` without its `--config FILE`, the file's options set as the parser's defaults (so that the command line
    overrides them, as TRL's CLI does; an option the file gives is no longer required on the command line).

    A config is flat (every key an option of this command) or a recipe: sections named after commands (`train:`,
    `score:`, ...) and shared top-level options. The command reads its own section, which must hold only its options,
    and the shared options it has; a shared option that no section's command has is an error (a typo would
    otherwise pass unnoticed), as is a flat key this command lacks.
    """
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise ValueError("--config needs a file: --config recipe.yaml")
    path, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    config = load_config(path)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    sections = {name: value for name, value in config.items() if name in COMMANDS and isinstance(value, dict)}
    shared = {name: value for name, value in config.items() if name not in sections}
    if sections:
        if command not in sections:
            raise ValueError(f"--config {path} has sections for {sorted(sections)} but none for {command!r}.")
        own = sections[command]
        unknown = sorted(set(own) - set(actions))
        if unknown:
            raise ValueError(f"--config {path}: section {command!r} has options `saev {command}` does not take: "
                             f"{unknown}. See `saev {command} --help`.")
        known_anywhere = set(actions) | {option for name in sections for option in _option_names(name)}
        stray = sorted(set(shared) - known_anywhere)
        if stray:
            raise ValueError(f"--config {path}: the shared options {stray} are options of none of its commands "
                             f"({sorted(sections)}).")
        values = {**{k: v for k, v in shared.items() if k in actions}, **own}
    else:
        unknown = sorted(set(shared) - set(actions))
        if unknown:
            raise ValueError(f"--config {path}: `saev {command}` takes no options {unknown}. See `saev {command} "
                             f"--help`.")
        values = shared
    parser.set_defaults(**values)  # every action of an option (a bool's --no_ twin too) gets the file's value
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    return argv


def _option_names(command: str) -> set[str]:
    """The option names of a command (its dataclasses' fields)."""
    return {f.name for cls in COMMANDS[command].arguments() for f in dataclasses.fields(cls)}


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
    parser = HfArgumentParser(command.arguments(), prog=f"saev {argv[0]}", description=command.description,
                              epilog=CONFIG_HELP)
    try:
        options = apply_config(parser, argv[0], argv[1:])
        arguments = parser.parse_args_into_dataclasses(options)
        if command.check is not None:
            command.check(*arguments)
    except ValueError as error:
        parser.error(str(error))
    # --disable_tqdm (an option of every command with a long step) hides saev-hf's bars and those datasets,
    # transformers and huggingface_hub draw themselves while the command loads, maps, saves and uploads.
    with progress_bars(disable=any(getattr(a, "disable_tqdm", False) for a in arguments)):
        command.run(*arguments)
    return 0


PACKAGE = Path(__file__).resolve().parent
"""The saev_hf package folder: errors raised from its code carry messages written for the user."""
DEBUG_ENV = "SAEV_HF_DEBUG"
"""Set to 1 (or pass `--debug`) to see the full traceback of an error that is the user's to fix."""
_HUB_USER_ERRORS = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError,
                    LocalEntryNotFoundError)


def is_user_error(error: BaseException) -> bool:
    """
    Whether `error` is the user's to fix (a bad row, a missing file or column, a refused folder, a wrong option or
    setting), so that its message alone is what to show: a [`RowError`]; a file or Hub repo that does not exist; or a
    `ValueError`, `KeyError`, `TypeError` or `OSError` that saev-hf raised itself with a message that names the fix.
    Anything else is a bug, shown with its traceback.
    """
    if isinstance(error, (RowError, FileExistsError, FileNotFoundError, *_HUB_USER_ERRORS)):
        return True
    if not isinstance(error, (ValueError, KeyError, TypeError, OSError)):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def console(argv: list[str] | None = None) -> int:
    """
    The `saev` console script: [`main`], with an error that is the user's to fix ([`is_user_error`]) printed as
    `saev COMMAND: error: message` alone (exit status 1), and a bug's full traceback kept. `--debug` (anywhere on the
    command line) or `SAEV_HF_DEBUG=1` shows every traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    command = f"saev {argv[0]}" if argv else "saev"
    try:
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (sorted into the user's errors and bugs right here)
        if debug or not is_user_error(error):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"{command}: error: {message}\n(the full traceback: rerun with --debug, or {DEBUG_ENV}=1)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(console())
