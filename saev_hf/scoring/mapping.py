"""Running a map function over a dataset: how `datasets.map` runs it ([`MapArguments`]), where the MLLM is loaded
before worker processes fork ([`map_placement`]), and [`score_dataset`], which maps one process's dataset or, under
`torchrun` / `accelerate launch`, each process's share and assembles them in the dataset's order."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets

from ..arguments import ModelArguments
from ..data.images import undecoded_images
from ..runtime.distributed import batch_share, distributed_state
from .map_function import SAEVMapFunction

SHARDS_FOLDER = "saev-score-shards"
"""Temporary folder (inside the output folder) where the processes of a distributed [`score_dataset`] each save
their scored shard before the main process assembles them."""


def score_dataset(scorer: SAEVMapFunction, dataset: Any, *, batch_size: int = 8, num_proc: int | None = None,
                  with_rank: bool = False, output_dir: str | os.PathLike | None = None,
                  desc: str = "Scores") -> Any:
    """
    `dataset` (a `datasets.Dataset`) with `scorer`'s columns added to every row by `dataset.map(scorer, batched=True)`
    (cached by `datasets` as any map), saved to `output_dir` when given. The image column is handed to the scorer
    undecoded, so that a corrupt image names its row (or costs one null row with `on_error="null"`), and cast back.

    Under `torchrun` / `accelerate launch` with several processes (call it on every process), each process maps its
    contiguous shard on its own device: a run of whole map batches ([`saev_hf.runtime.distributed.batch_share`]), so that
    every row is scored in the same batch as by one process and gets the very same scores. Each saves its shard in a
    temporary folder in `output_dir`, and the main process assembles the shards in their order, so the saved dataset
    has the rows and order of `dataset` and equals one process's; the temporary folder is then removed. Every
    process returns the whole scored dataset, read back from `output_dir` (required then; on several nodes, a folder
    every node sees). A row that cannot be scored (with `on_error="raise"`) stops its process with a [`RowError`]
    naming its row in `dataset`, and the launcher then stops the others: the job fails, nothing is assembled.

    Args:
        scorer ([`SAEVScorer`], or any [`SAEVMapFunction`]): what adds the columns.
        batch_size (`int`): rows per map batch.
        num_proc, with_rank: as `datasets.map` (one worker per GPU, [`saev_hf.scoring.mapping.map_placement`]); not in a
            distributed run, whose processes are the workers.
        output_dir (*optional*): where to `save_to_disk` the scored dataset.

    Example:

    ```python
    scored = score_dataset(SAEVScorer(sae, model, processor), dataset, output_dir="scored")
    ```
    """
    state = distributed_state()
    # the scorer reads the image bytes itself, so that a corrupt image names its row (or costs one null row)
    dataset, image_feature = undecoded_images(dataset, scorer._reader_prompt_format().image_column)

    def scored_part(part: Any, row_offset: int) -> Any:
        scored = part.map(scorer, batched=True, batch_size=batch_size, num_proc=num_proc, with_indices=True,
                          with_rank=with_rank, fn_kwargs={"row_offset": row_offset} if row_offset else None,
                          desc=desc)
        if image_feature is not None:
            scored = scored.cast_column(scorer._reader_prompt_format().image_column, image_feature)
        return scored

    if state is None:
        scored = scored_part(dataset, 0)
        if output_dir is not None:
            scored.save_to_disk(str(output_dir))
        return scored
    if output_dir is None:
        raise ValueError(f"Scoring over {state.num_processes} processes assembles their shards in output_dir: give "
                         f"one (a folder every process sees).")
    if num_proc is not None:
        raise ValueError(f"num_proc={num_proc} starts map workers inside each of the {state.num_processes} launched "
                         f"processes; the launched processes already share the work. Leave num_proc unset.")

    shards = Path(output_dir, SHARDS_FOLDER)
    world, index = state.num_processes, state.process_index
    rows = batch_share(range(len(dataset)), batch_size, state)
    offset = rows[0] if rows else len(dataset)
    if rows:  # a process left without rows (fewer batches than processes) has nothing to save
        shard = dataset.select(range(offset, offset + len(rows)))  # contiguous: no indices mapping, maps still hit
        scored_part(shard, offset).save_to_disk(str(shards / f"process-{index:05d}"))
    else:
        shards.mkdir(parents=True, exist_ok=True)
        (shards / f"process-{index:05d}.empty").touch()
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [datasets.load_from_disk(str(shards / f"process-{i:05d}")) for i in range(world)
                 if not (shards / f"process-{i:05d}.empty").exists()]
        if not parts:  # no rows at all: the dataset as it is, with the columns one process would add
            parts = [scored_part(dataset, 0)]
        datasets.concatenate_datasets(parts).save_to_disk(str(output_dir))
        del parts
        shutil.rmtree(shards)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(output_dir))
@dataclass
class MapArguments:
    """How `datasets.map` runs a map function (the scorer, the patch filter)."""

    batch_size: int = field(default=8, metadata={"help": "Examples per batch."})
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Worker processes of datasets.map, one per GPU with GPUs: the MLLM is loaded on the CPU "
                  "and each worker moves it to its own GPU (never CUDA before the fork)."},
    )


def map_placement(model: ModelArguments, map_args: MapArguments) -> tuple[ModelArguments, bool]:
    """
    Where `saev score` and `saev patches` load the MLLM before `datasets.map`, and whether the map passes ranks:
    `(model arguments to load with, with_rank)`.

    One process (`num_proc` None): as `model` says. With `num_proc` workers: PyTorch refuses CUDA in a process
    forked after its parent initialised CUDA, so the parent loads the model on the CPU and each worker, given its
    rank, moves the model and the SAE-V to its own accelerator (`SAEVMapFunction._to_device`); the workers share
    the parent's weights until then (fork). `device="cpu"` keeps every worker on the CPU.

    Raises:
        ValueError: `device_map` or one named accelerator with `num_proc` (they place one model in one process).
    """
    if map_args.num_proc is None:
        return model, False
    if model.device_map is not None:
        raise ValueError(
            f"num_proc={map_args.num_proc} runs one worker per GPU, each with its own copy of the model, but "
            f"device_map={model.device_map!r} places one model over the devices of one process. Use num_proc "
            f"(a model that fits one GPU) or device_map (one that does not), not both."
        )
    if model.device == "cpu":
        return model, False
    if model.device != "auto":
        raise ValueError(
            f"num_proc={map_args.num_proc} puts each worker on its own GPU (by rank), so device={model.device!r} "
            f"cannot hold for all of them. Leave device at 'auto' (or 'cpu'), or drop num_proc to use that device."
        )
    return replace(model, device="cpu"), True
