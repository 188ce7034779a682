"""`saev push`: its arguments, and [`run_push`], the one function the command calls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..alignment.filtering import FILTER_RECORD, FilterArguments
from ..data.loading import load_dataset_split
from ..evaluation.report import check_metrics
from ..model.modeling import SAEV
from .push import load_saev_config, push_activation_cache, push_filtered_dataset, push_saev
from .space import push_space


@dataclass
class PushArguments:
    """
    Push an SAE-V folder with its model card (`--sae DIR --repo_id org/name [--metrics_json FILE]`), or a filtered
    dataset folder with its dataset card (`--dataset DIR --repo_id org/name --source_dataset org/data
    [--scored_dataset DIR] [--sae_repo org/saev]`), or an activation cache with its dataset card (`--cache DIR
    --repo_id org/name`), or the explorer app as a Space (`--space --sae org/saev --model org/mllm --repo_id
    org/space [--labels labels.json]`).
    """

    repo_id: str = field(metadata={"help": "Hub repo to push to, 'org/name' (created if needed)."})
    sae: str | None = field(
        default=None, metadata={"help": "Folder (or Hub repo) of the SAE-V to push (either layout)."}
    )
    metrics_json: str | None = field(
        default=None,
        metadata={"help": "With --sae: the metrics.json that `saev eval --output_dir DIR` wrote."}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "With --sae: Hub dataset the metrics were computed on (adds a model-index)."}
    )
    revision: str | None = field(default=None, metadata={"help": "With --sae: branch to push to (default main)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Folder of the filtered dataset to push (written by `saev filter`)."}
    )
    cache: str | None = field(
        default=None, metadata={"help": "Folder of an activation cache to push as a dataset (written by `saev cache`)."}
    )
    scored_dataset: str | None = field(
        default=None,
        metadata={"help": "With --dataset: folder of the scored dataset before filtering (written by `saev score`), "
                  "for the rows before and the score distribution."},
    )
    split: str = field(default="train", metadata={"help": "With --dataset: split to read from the folders and push."})
    source_dataset: str | None = field(
        default=None, metadata={"help": "With --dataset: the Hub dataset that was scored and filtered (required)."}
    )
    source_revision: str | None = field(default=None, metadata={"help": "With --dataset: revision of the source."})
    source_config: str | None = field(default=None, metadata={"help": "With --dataset: configuration of the source."})
    source_split: str | None = field(default=None, metadata={"help": "With --dataset: split of the source."})
    sae_repo: str | None = field(
        default=None,
        metadata={"help": "With --dataset: the SAE-V that scored it (Hub repo or folder); its config is read for the "
                  "card."},
    )
    score_column: str = field(
        default="saev_cosine_score",
        metadata={"help": "With --dataset: the score column it was filtered by (read from the folder instead when "
                  "`saev filter` wrote it, with the rule)."},
    )
    space: bool = field(
        default=False,
        metadata={"help": "Push the explorer app (`saev explore`) for the Hub SAE-V --sae on the Hub MLLM --model as a "
                  "Gradio Space to --repo_id."},
    )
    model: str | None = field(default=None, metadata={"help": "With --space: the Hub MLLM the SAE-V reads."})
    labels: str | None = field(
        default=None, metadata={"help": "With --space: a labels.json (`saev label`) shipped with the app."})
    license: str | None = field(default=None, metadata={"help": "Hub license id for the card, e.g. apache-2.0."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags for the card."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message (a default describes it)."})

    def __post_init__(self) -> None:
        if self.space:
            wrong = [name for name in ("dataset", "cache", "metrics_json", "eval_dataset", "revision", "scored_dataset",
                                       "source_dataset", "source_revision", "source_config", "source_split",
                                       "sae_repo") if getattr(self, name) is not None]
            if wrong:
                raise ValueError(f"{', '.join('--' + n for n in wrong)}: not options of --space (which pushes the "
                                 f"explorer app); remove {'it' if len(wrong) == 1 else 'them'}.")
            if self.sae is None or self.model is None:
                raise ValueError("--space needs --sae and --model: the Hub repos of the SAE-V and of the MLLM it "
                                 "reads, which the Space loads.")
            return
        if self.model is not None or self.labels is not None:
            raise ValueError("--model and --labels apply to --space only; remove them or add --space.")
        if sum(value is not None for value in (self.sae, self.dataset, self.cache)) != 1:
            raise ValueError("Give exactly one of --sae (an SAE-V folder), --dataset (a filtered dataset folder) and "
                             "--cache (an activation cache folder).")
        sae_only = ("metrics_json", "eval_dataset", "revision")
        dataset_only = ("scored_dataset", "source_dataset", "source_revision", "source_config", "source_split",
                        "sae_repo")
        not_for = dataset_only if self.sae else sae_only if self.dataset else sae_only + dataset_only
        wrong = [name for name in not_for if getattr(self, name) is not None]
        if wrong:
            kind = ("an SAE-V (--sae)" if self.sae else "a dataset (--dataset)" if self.dataset
                    else "an activation cache (--cache)")
            options = ", ".join("--" + name for name in wrong)
            verb, pronoun = ("does", "it") if len(wrong) == 1 else ("do", "them")
            raise ValueError(f"{options} {verb} not apply when pushing {kind}; remove {pronoun}.")
        if self.dataset is not None and not self.source_dataset:
            raise ValueError("--dataset needs --source_dataset: the Hub dataset that was scored and filtered.")


def read_metrics_json(path: str) -> dict[str, Any]:
    """The evaluation metrics in `path` (the `metrics.json` that `saev eval --output_dir DIR` writes), checked for what
    the card needs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--metrics_json {path}: no such file. Write it with `saev eval ... --output_dir DIR` "
                                f"(DIR/metrics.json).")
    try:
        metrics = json.loads(Path(path).read_text())
        check_metrics(metrics)
    except ValueError as error:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"--metrics_json {path}: {error}") from error
    return metrics


def run_push(args: PushArguments):
    """Load what `args` name (an SAE-V, a filtered dataset or an activation cache) and push it with its card; returns
    what was pushed where, ending with the commit URL."""
    if args.space:
        commit = push_space(args.repo_id, args.sae, args.model, labels_file=args.labels,
                            private=args.private, commit_message=args.commit_message)
        return f"Pushed the explorer for {args.sae} on {args.model} as the Space {args.repo_id}: {commit.commit_url}"
    if args.sae is not None:
        sae = SAEV.from_pretrained(args.sae)
        metrics = read_metrics_json(args.metrics_json) if args.metrics_json else None
        commit = push_saev(sae, args.repo_id, metrics=metrics, license=args.license, eval_dataset=args.eval_dataset,
                           tags=args.tags, private=args.private, revision=args.revision,
                           commit_message=args.commit_message)
        return f"Pushed the SAE-V in {args.sae} with its model card to {args.repo_id}: {commit.commit_url}"
    if args.cache is not None:

        commit = push_activation_cache(args.cache, args.repo_id, license=args.license, tags=args.tags,
                                       private=args.private, commit_message=args.commit_message)
        return (f"Pushed the activation cache in {args.cache} with its dataset card to {args.repo_id}: "
                f"{commit.commit_url}")

    kept = load_dataset_split(args.dataset, split=args.split)
    scored = load_dataset_split(args.scored_dataset, split=args.split) if args.scored_dataset else None
    record = Path(args.dataset) / FILTER_RECORD  # the rule, when `saev filter` wrote the folder
    filter_args = FilterArguments(**json.loads(record.read_text())) if record.is_file() else None
    sae_config = load_saev_config(args.sae_repo) if args.sae_repo else None
    commit = push_filtered_dataset(
        kept, args.repo_id, source_dataset=args.source_dataset, scored=scored, filter_args=filter_args,
        column=None if filter_args is not None else args.score_column,
        source_revision=args.source_revision, source_config=args.source_config, source_split=args.source_split,
        sae_repo=args.sae_repo, sae_config=sae_config, license=args.license, tags=args.tags, split=args.split,
        private=args.private, commit_message=args.commit_message,
    )
    return f"Pushed {len(kept)} rows of {args.dataset} with their dataset card to {args.repo_id}: {commit.commit_url}"
