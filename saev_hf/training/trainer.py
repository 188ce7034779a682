"""[`SAEVTrainer`]: training an SAE-V (or, on a text-only causal LM and text data, a plain SAE: the paper's baseline).

Data flows one way: dataset rows -> [`LayerReader`] (the base model up to layer L) -> [`ActivationBuffer`] (real
tokens only, shuffled) -> [`SAEV`] trained with the paper's recipe -> a checkpoint that reads raw hidden states.

The rooms of this stage: [`SAEVTrainingArguments`] (`arguments`: every option, the paper's recipe as defaults),
[`TrainingSchedule`] and [`FeatureFiringCounter`] (`schedule`: what changes with the step), [`ActivationBuffer`]
(`buffer`: the shuffled stream of activations), [`SAEVRun`] (`run`: one SAE-V under training and what is its own), the
sweep (`sweep`: several SAE-Vs from one pass), checkpoints and records (`checkpoints`), and the loop (this module).

[`SAEVTrainer`] trains one SAE-V, or several on the same batches: a sweep reads each activation batch once and steps
every member's SAE-V on it; a single run is a sweep of one. The loop runs on `accelerate.Accelerator`: devices,
data-parallel processes (`torchrun` or `accelerate launch` run the same code on several processes; each reads its own
shard of the dataset and gradients are averaged), checkpoints (`save_state`/`load_state` plus the activation buffer of
every process), and the `report_to` trackers. [`train_saev`] and [`train_saevs`] (a sweep) are one call each.

Why `Accelerator` and not `transformers.Trainer`: the training data is not a dataset of examples but a stream that
the base model produces on the fly, one shuffling buffer per process, whose state must be checkpointed with the
optimizer for an exact resume; and the input scale is estimated before the first step and reduced over the processes.
`Trainer` would need its data loader, sampler, loss, schedule and checkpoint code overridden (and by default steps a
prepared scheduler once per process); an explicit loop on `Accelerator` is shorter and keeps each of these visible,
as EleutherAI's sparsify does.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from datasets.distributed import split_dataset_by_node

from ..activations.reader import LayerReader, image_token_id_of, layer_device
from ..arguments import DataArguments, ModelArguments
from ..cache.activation_cache import ActivationCache
from ..cache.reader import CacheReader, cached_rows
from ..data.prompts import PromptFormat
from ..model.config import SAEVConfig
from ..model.modeling import SAEV
from ..runtime.devices import accelerator_available
from ..runtime.progress import progress_bar
from .arguments import SAEVTrainingArguments
from .buffer import ActivationBuffer, activation_norm_statistics, input_scale_from_norms
from .checkpoints import ARGS_NAME, STATE_NAME, TrainingCheckpoints
from .run import SAEVRun
from .sweep import SWEEP_MANIFEST, SweepMember, sweep_members

logger = logging.getLogger(__name__)


class SAEVTrainer(TrainingCheckpoints):
    """
    Trains an [`SAEV`] on activations streamed from a base model, with `accelerate`; or, with `sweep=`, several
    SAE-Vs on the same activations, read once.

    Example:

    ```python
    args = SAEVTrainingArguments(layer=16, output_dir="saev-llava-next")
    model = ModelArguments("llava-hf/llava-v1.6-mistral-7b-hf")
    data = DataArguments("my-org/image-text-pairs")  # columns "images" and "prompt" (see PromptFormat)
    sae = SAEVTrainer(args, model=model, train_dataset=data).train()  # or objects: model=..., processor=..., ...
    saes = SAEVTrainer(args, model, train_dataset=data, sweep={"l1_coefficient": [1, 5]}).train()  # 2 SAE-Vs
    ```

    Args:
        args ([`SAEVTrainingArguments`]): the run's options (a sweep's base options).
        model (*optional*): the base model, or the [`ModelArguments`] to load it with (on the accelerator this process
            trains on). With an activation cache, none (or `ModelArguments` without a name, for its `device`).
        processor (*optional*): the model's processor or tokenizer; required with a loaded `model`.
        train_dataset (*optional*): the rows to read (a `datasets.Dataset` or `IterableDataset`, a list of rows), the
            [`DataArguments`] to load them with, or an [`ActivationCache`] (also named by
            `DataArguments.activation_cache`) to train from instead of the base model. In a distributed run each
            process reads its own shard of it.
        prompt_format ([`PromptFormat`], *optional*): the dataset's columns (TRL's `images`/`prompt` by default).
        sweep (*optional*): train one SAE-V per member of this sweep instead of one (see `saev_hf.training.sweep`): a
            grid `{"l1_coefficient": [1, 5], "expansion_factor": [8, 16]}` (every combination), a list of overrides
            `[{"activation": "topk", "k": 32}, {"l1_coefficient": 5}]`, JSON text or a JSON file holding either. Only
            the options in `SWEEP_FIELDS` may vary. Each batch is read once and every member steps on it; each member
            ends with the SAE-V a separate run with its arguments gives, in `output_dir/<member name>` with the files
            a single run writes, and `output_dir/sweep.json` lists them.

    Devices: the SAE-V trains where the layer it reads runs: on the CPU for a model given on the CPU or
    `ModelArguments(device="cpu")`, else on the accelerator `accelerate` gives this process. From an activation cache,
    neither a model nor a dataset is loaded: the buffer reads the cache's rows through a [`CacheReader`] (the
    `reader`), the same procedure, so a float32 cache made with the run's `read_batch_size` gives the run that reading
    the model gives.

    Attributes:
        runs (`list[SAEVRun]`): the SAE-Vs being trained, one per sweep member (one for a single run), each with its
            optimizer, scheduler, schedule, firing counter and log history.
        members (`list[SweepMember]` or `None`): the sweep's members (None for a single run).
        sae ([`SAEV`]): the SAE being trained (unwrapped; `config.input_scale` is the training scale). In a sweep,
            this and the next four are the first member's: see `runs` for the others.
        prepared_sae: the same SAE-V as `accelerator.prepare` returns it (DDP-wrapped in a distributed run): what the
            loop calls. (The constructor's `model` is the base MLLM; the trainer keeps it in `reader.model`.)
        optimizer, lr_scheduler: as `accelerator.prepare` returns them.
        firing_counter ([`FeatureFiringCounter`]): how often each feature fired in the current window (dead features
            and the saved sparsity); not to be confused with `args.report_to`'s trackers (the loggers).
        log_history (`list[dict]`): the logged metrics.
        accelerator (`accelerate.Accelerator`), reader ([`LayerReader`] or [`CacheReader`]), schedule
        ([`TrainingSchedule`]), global_step (`int`), source (`dict`: the model, data and columns read, as recorded).
    """

    def __init__(self, args: SAEVTrainingArguments, model=None, processor=None, train_dataset=None,
                 prompt_format: PromptFormat | None = None, sweep: Any = None) -> None:
        self.args = args
        self.members: list[SweepMember] | None = sweep_members(args, sweep) if sweep is not None else None
        cache = _activation_cache(train_dataset)
        self.accelerator = Accelerator(
            cpu=_trains_on_cpu(model, args.layer),
            log_with=args.trackers,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
            ),
            # The schedule counts global optimizer steps; a prepared scheduler would otherwise step once per process.
            step_scheduler_with_optimizer=False,
        )
        set_seed(args.seed)
        self.schedule = args.schedule(self.accelerator.num_processes)
        prompt_format = prompt_format or PromptFormat()
        self.source = _source_record(model, train_dataset, cache, prompt_format)
        self.resume_dir = self._resolve_checkpoint()
        self._check_output_dir()  # before anything heavy is loaded
        if cache is not None:
            self.reader, self.train_dataset = self._cache_reader(cache, model, processor)
        else:
            model, processor, self.train_dataset = self._model_and_data(model, processor, train_dataset, prompt_format)
            self.reader = self._layer_reader(model, processor, prompt_format)
        members = [(args, "")] if self.members is None else [(m.args, m.name) for m in self.members]
        self.runs = [SAEVRun(run_args, self._sae_config(run_args), self.accelerator, name)
                     for run_args, name in members]
        self.global_step = 0
        self.buffer: ActivationBuffer | None = None

    # The single run's SAE-V and its state (the first member's in a sweep), as attributes of the trainer.
    sae = property(lambda self: self.runs[0].sae)
    prepared_sae = property(lambda self: self.runs[0].prepared_sae)
    optimizer = property(lambda self: self.runs[0].optimizer)
    lr_scheduler = property(lambda self: self.runs[0].lr_scheduler)
    firing_counter = property(lambda self: self.runs[0].firing_counter)
    log_history = property(lambda self: self.runs[0].log_history)

    def _model_and_data(self, model, processor, train_dataset, prompt_format: PromptFormat):
        """The base model (eval mode) with its processor, and the training rows: those given, or loaded from the
        arguments given (the model on this process's device)."""
        if isinstance(model, ModelArguments):
            model, processor = model.load(self.accelerator.device)
        elif model is None:
            raise ValueError("No base model: pass model= and processor= (or model=ModelArguments(...)), or train "
                             "from an activation cache (train_dataset=ActivationCache(...)).")
        elif processor is None:
            raise ValueError("A model was passed without its processor (or tokenizer): pass processor= too.")
        model.eval()  # activations are read without dropout
        if isinstance(train_dataset, DataArguments):
            train_dataset = train_dataset.load(prompt_format.image_column)
        elif train_dataset is None:
            raise ValueError("No training data: pass train_dataset= (a dataset, or DataArguments(...)).")
        return model, processor, train_dataset

    def _cache_reader(self, cache: ActivationCache, model, processor):
        """A [`CacheReader`] of the activation cache in place of the base model, and the rows it holds
        ([`cached_rows`]), after checking that the cache holds what this run trains on."""
        if (model is not None and not isinstance(model, ModelArguments)) or processor is not None or (
                isinstance(model, ModelArguments) and model.model_name_or_path is not None):
            raise ValueError(f"The activation cache {str(cache.path)!r} replaces the base model: pass no model= or "
                             f"processor= (ModelArguments without a name only sets the device), or train from the "
                             f"model without the cache.")
        if cache.layer != self.args.layer:
            raise ValueError(f"The activation cache {str(cache.path)!r} holds layer {cache.layer}, but layer="
                             f"{self.args.layer}. Train with --layer {cache.layer}, or cache layer {self.args.layer}.")
        if self.args.include_special_tokens and not cache.manifest["include_special_tokens"]:
            raise ValueError(f"The activation cache {str(cache.path)!r} was made without special tokens, but "
                             f"include_special_tokens=True. Pass include_special_tokens=False, or make the cache "
                             f"with them.")
        return CacheReader(cache), cached_rows(cache)

    def _layer_reader(self, model, processor, prompt_format: PromptFormat) -> LayerReader:
        """The reader of layer `args.layer`; a text-only causal LM reads text only (the image column is not used)."""
        if image_token_id_of(model, processor) is None and prompt_format.image_column is not None:
            # A text-only causal LM reads text only (the paper's SAE baseline); the image column is not used.
            prompt_format = replace(prompt_format, image_column=None)
        return LayerReader(model, processor, layer=self.args.layer, prompt_format=prompt_format)

    def _sae_config(self, args: SAEVTrainingArguments) -> SAEVConfig:
        """The configuration of a fresh SAE-V with options `args`, sized for the reader, with its provenance."""
        return SAEVConfig(
            d_in=self.reader.hidden_size,
            d_sae=args.d_sae,
            expansion_factor=args.expansion_factor,
            activation=args.activation,
            k=args.k,
            hook_layer=args.layer,
            base_model_name_or_path=self.source["model_name_or_path"],
            base_model_revision=self.source["model_revision"],
            l1_coefficient=args.l1_coefficient,
            dataset_name=self.source["dataset_name"],
            training_tokens=0,
        )

    # --- data ----------------------------------------------------------------------------------------------------

    def activation_buffer(self, process_index: int | None = None, num_processes: int | None = None) -> ActivationBuffer:
        """
        A fresh activation buffer over the shard of the training data that process `process_index` of
        `num_processes` reads (default: this process of this run). Its shuffle is seeded with `seed + process_index`.
        """

        index = self.accelerator.process_index if process_index is None else process_index
        world = self.accelerator.num_processes if num_processes is None else num_processes
        data = self.train_dataset
        if world > 1:
            data = split_dataset_by_node(data, rank=index, world_size=world)
        return ActivationBuffer(
            self.reader,
            data,
            batch_size_tokens=self.args.train_batch_size_tokens,
            buffer_size_tokens=self.args.buffer_size_tokens,
            read_batch_size=self.args.read_batch_size,
            include_special_tokens=self.args.include_special_tokens,
            shuffle_dataset=self.args.shuffle_dataset,
            seed=self.args.seed + index,
            device=self.accelerator.device,
            progress=self.accelerator.is_local_main_process and not self.args.disable_tqdm,
        )

    @torch.no_grad()
    def estimate_input_scale(self) -> float:
        """
        The paper's `s = sqrt(d_in) / E||x||` over the first `input_scale_estimation_tokens` tokens of the data
        (each process reads its share from the start of its shard; the mean is taken over all of them).
        """
        world = self.accelerator.num_processes
        per_process = math.ceil(self.args.input_scale_estimation_tokens / world)
        norm_sum, count = activation_norm_statistics(self.activation_buffer(), per_process)
        totals = torch.tensor([norm_sum, float(count)], dtype=torch.float64, device=self.accelerator.device)
        if world > 1:
            totals = self.accelerator.reduce(totals, "sum")
        return input_scale_from_norms(self.reader.hidden_size, float(totals[0]), int(totals[1]))

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self, batches: Iterable[torch.Tensor] | None = None) -> SAEV | dict[str, SAEV]:
        """
        Train, save the SAE-V to `output_dir` (input scale folded into the weights) and return it; in a sweep, train
        every member on each batch and save each to `output_dir/<member name>`.

        The loop is in named steps, as SAELens' `fit`: [`_start`] (resume or estimate the input scale, open the data
        and the trackers), then per step [`_next_batch`], [`SAEVRun.train_step`] of each run, [`_log`] and
        [`_checkpoint_if_needed`], and [`_finish`] (save the SAE-Vs and the trainer state).

        Args:
            batches (iterable of `torch.Tensor` `(tokens, d_in)`, *optional*): train on these activation batches
                (e.g. cached activations) instead of the base model's stream; one per step. Checkpoints then hold no
                data position: resuming is up to the caller.

        Returns:
            [`SAEV`]: a copy of the trained SAE-V that reads raw hidden states (`config.input_scale == 1`), with
            `feature_log_sparsity` filled from the last `dead_feature_window` steps. On every process. In a sweep, a
            dict of them by member name, in the sweep's order.
        """
        batch_iterator = self._start(batches)
        what = "SAE-V" if self.members is None else f"{len(self.runs)} SAE-Vs"
        progress = progress_bar(total=self.schedule.max_steps, initial=self.global_step, desc=f"Training {what}",
                                unit="step", disable=self.args.disable_tqdm or not self.accelerator.is_local_main_process)
        for run in self.runs:
            run.prepared_sae.train()
        while self.global_step < self.schedule.max_steps:
            batch = self._next_batch(batch_iterator)
            for run in self.runs:  # one read of the activations, one step of every SAE-V that has not diverged
                if run.diverged is None:
                    run.train_step(batch, self.global_step)
            self.global_step += 1
            progress.update(1)
            self._log(progress)
            if all(run.diverged is not None for run in self.runs):
                break  # nothing left to train
            self._checkpoint_if_needed()
        progress.close()
        return self._finish()

    def _start(self, batches: Iterable[torch.Tensor] | None) -> Iterator[torch.Tensor]:
        """Resume from the checkpoint, or set the input scale (estimated once, the same for every run); open the
        batches (the activation buffer by default), record the arguments and start the trackers. Returns the batch
        iterator."""
        args, accelerator = self.args, self.accelerator
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir, own_batches=batches is not None)
        else:
            if args.input_scale is not None:
                input_scale = float(args.input_scale)
            else:
                input_scale = self.estimate_input_scale()
                logger.info("Input scale sqrt(d_in) / E||x|| = %.6g", input_scale)
            for run in self.runs:
                run.sae.config.input_scale = input_scale
        if batches is None:
            if self.buffer is None:
                self.buffer = self.activation_buffer()
            batches = self.buffer
        if accelerator.is_main_process:
            output = Path(args.output_dir)
            output.mkdir(parents=True, exist_ok=True)
            if self.members is not None:
                self._write_json(output / SWEEP_MANIFEST, {**self._args_record(), "finished": False})
            for run in self.runs:
                self._write_json(output / run.name / ARGS_NAME, run.args_record(self.source))
        accelerator.init_trackers(args.run_name or "saev", config=self._tracker_config())
        return iter(batches)

    def _next_batch(self, batch_iterator: Iterator[torch.Tensor]) -> torch.Tensor:
        """The next `(tokens, d_in)` batch, in float32 on this process's device; an error when they run out early or
        have the wrong shape."""
        try:
            batch = next(batch_iterator)
        except StopIteration:
            raise ValueError(
                f"The batches ran out after {self.global_step} steps, before max_steps={self.schedule.max_steps}. "
                f"Pass more batches or fewer steps."
            ) from None
        batch = batch.to(self.accelerator.device, torch.float32)
        if batch.dim() != 2 or batch.shape[1] != self.sae.config.d_in:
            raise ValueError(
                f"Training batches must be (tokens, d_in={self.sae.config.d_in}) activations; got shape "
                f"{tuple(batch.shape)}."
            )
        return batch

    def _log(self, progress: Any) -> None:
        """After a step: each run's logs ([`SAEVRun.log`]) to the trackers (a sweep member's prefixed with its
        name), in one call."""
        logs: dict[str, float] = {}
        for run in self.runs:
            logs.update({run.metric_prefix + name: value for name, value in run.log(self.global_step).items()})
        if self.members is None and "loss" in logs:
            progress.set_postfix(loss=f"{logs['loss']:.4g}", l0=f"{logs['l0']:.1f}")
        if logs:
            self.accelerator.log(logs, step=self.global_step)

    def _checkpoint_if_needed(self) -> None:
        """Save a checkpoint every `save_steps` steps, except at the last step (the final model is saved instead)."""
        last = self.global_step == self.schedule.max_steps
        if self.args.save_steps and self.global_step % self.args.save_steps == 0 and not last:
            self.save_checkpoint()

    def _finish(self) -> SAEV | dict[str, SAEV]:
        """Save the trained SAE-Vs and their trainer states to their folders, finish the trackers; return the SAE-V
        (a dict of them by member name in a sweep)."""
        for run in self.runs:  # the last steps too: no NaN is ever saved as trained
            run.check_divergence(self.global_step, {}, self.global_step)
        healthy = [run for run in self.runs if run.diverged is None]
        saes = [run.export_sae(self._training_tokens()) for run in healthy]
        shared = self._shared_state()  # gathers from every process
        if self.accelerator.is_main_process:
            output = Path(self.args.output_dir)
            for run, sae in zip(healthy, saes):
                sae.save_pretrained(output / run.name)
                self._write_json(output / run.name / STATE_NAME, run.state_record(shared))
            if self.members is not None:
                finals = [{name: value for name, value in run.log_history[-1].items() if name != "step"}
                          if run.log_history else {} for run in self.runs]
                record = self._args_record()
                for member, run, final in zip(record["sweep"], self.runs, finals):
                    member["final_metrics"] = final
                    member["diverged"] = run.diverged  # None for a member that trained to the end
                self._write_json(output / SWEEP_MANIFEST, {**record, "finished": True, "global_step": self.global_step})
        self.accelerator.wait_for_everyone()
        # Finish the trackers but leave the process group to whoever started it, as transformers' Trainer does.
        # accelerate's end_training() destroys it; the DDP reducer freed afterwards then tears gloo down while holding
        # the GIL, which deadlocks when gloo's worker thread is still releasing the last collective's tensors.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        diverged = [run for run in self.runs if run.diverged is not None]
        if diverged:
            fix = ("Lower learning_rate or l1_coefficient, raise lr_warmup_steps, or check the activations (saev eval "
                   "on a few rows).")
            if self.members is None:
                raise ValueError(f"Training diverged: {diverged[0].diverged}. Nothing was saved to "
                                 f"{self.args.output_dir}. {fix}")
            raise ValueError(
                f"{len(diverged)} of {len(self.runs)} sweep members diverged and were not saved: "
                + "; ".join(f"{run.name}: {run.diverged}" for run in diverged)
                + f". The others are saved in {self.args.output_dir} (sweep.json marks each member). {fix}")
        if self.members is None:
            return saes[0]
        return {run.name: sae for run, sae in zip(self.runs, saes)}

    def export_sae(self) -> SAEV:
        """A copy of the SAE as it would be saved: provenance recorded, sparsity filled, input scale folded (the
        first member's in a sweep: see [`SAEVRun.export_sae`])."""
        return self.runs[0].export_sae(self._training_tokens())


def train_saev(
    args: SAEVTrainingArguments, model=None, processor=None, dataset=None, prompt_format: PromptFormat | None = None,
    batches: Iterable[torch.Tensor] | None = None,
) -> SAEV:
    """
    Train an SAE-V as `args` say and save it to `args.output_dir`; see [`SAEVTrainer`].

    `model` is a loaded model (with its `processor`) or the [`ModelArguments`] to load it with; `dataset` the rows (a
    `datasets.Dataset`, a stream), the [`DataArguments`] to load them with, or an [`ActivationCache`]. Run the same
    script with `torchrun --nproc_per_node N` or `accelerate launch` to train data-parallel on N processes.

    Returns the trained [`SAEV`], reading raw hidden states (input scale folded into the weights). Like transformers'
    Trainer it leaves the process group to the script: end a distributed script with [`end_distributed`].
    """
    return SAEVTrainer(args, model=model, processor=processor, train_dataset=dataset,
                       prompt_format=prompt_format).train(batches)


def train_saevs(
    args: SAEVTrainingArguments, sweep: Any, model=None, processor=None, dataset=None,
    prompt_format: PromptFormat | None = None, batches: Iterable[torch.Tensor] | None = None,
) -> dict[str, SAEV]:
    """
    Train several SAE-Vs from one pass of activations: one per member of `sweep`, each step reading one batch and
    stepping every member on it; see [`SAEVTrainer`] and `saev_hf.training.sweep`.

    Example:

    ```python
    saes = train_saevs(args, {"l1_coefficient": [1, 5], "activation": ["relu"]}, model=model, processor=processor,
                       dataset=dataset)
    saes["l1_coefficient=5,activation=relu"]  # also saved in args.output_dir/l1_coefficient=5,activation=relu
    ```

    Args:
        args ([`SAEVTrainingArguments`]): the base options, shared by every member except for its overrides.
        sweep: a grid `{field: [values]}` (every combination), a list of override dicts, or JSON text or a JSON file
            holding either; only options of the SAE-V and its optimisation (`SWEEP_FIELDS`) may vary.
        model, processor, dataset, prompt_format, batches: as for [`train_saev`].

    Returns:
        `dict[str, SAEV]`: the trained SAE-Vs by member name (`field=value,...`), in the sweep's order. Each equals
        what `train_saev` gives with that member's arguments (`SAEVTrainer(args, sweep=sweep).members[i].args`).
    """
    return SAEVTrainer(args, model=model, processor=processor, train_dataset=dataset, prompt_format=prompt_format,
                       sweep=sweep).train(batches)


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def _activation_cache(train_dataset: Any) -> ActivationCache | None:
    """The activation cache to train from: the one given, or the one `DataArguments.activation_cache` names."""
    if isinstance(train_dataset, ActivationCache):
        return train_dataset
    if isinstance(train_dataset, DataArguments) and train_dataset.activation_cache is not None:
        return ActivationCache(train_dataset.activation_cache)
    return None


def _trains_on_cpu(model: Any, layer: int) -> bool:
    """Whether the SAE-V trains on the CPU: where the layer it reads runs (a model given, or `ModelArguments.device`),
    or on a machine without an accelerator. (A launched `torchrun` process on such a machine must be told so, or
    accelerate silently runs each process as a separate single-process job.)"""
    if not accelerator_available():
        return True
    if isinstance(model, ModelArguments):
        if model.device not in ("auto", "cpu"):
            raise ValueError(f"device={model.device!r}: an SAE-V trains on 'auto' (the accelerator accelerate gives "
                             f"this process) or 'cpu'. Choose the GPU with CUDA_VISIBLE_DEVICES, or several with "
                             f"torchrun / accelerate launch.")
        return model.device == "cpu"
    if model is not None:
        return layer_device(model, layer).type == "cpu"
    return False


def _source_record(model: Any, dataset: Any, cache: ActivationCache | None, prompt_format: PromptFormat):
    """What the run reads, as the SAE-V's config and the run's records name it (a resumed run must read the same):
    the model and its revision, the dataset, the activation cache and the columns."""
    if cache is not None:
        manifest = cache.manifest
        return {"model_name_or_path": manifest.get("model_name_or_path"), "model_revision": None,
                "dataset_name": manifest.get("dataset_name"),
                "activation_cache": getattr(dataset, "activation_cache", None) or str(cache.path),
                "prompt_format": manifest["arguments"]["prompt_format"]}
    if isinstance(model, ModelArguments):
        name, revision = model.model_name_or_path, model.model_revision
    else:
        name, revision = getattr(getattr(model, "config", None), "_name_or_path", None) or None, None
    if isinstance(dataset, DataArguments):
        dataset_name = dataset.description
    else:
        dataset_name = getattr(getattr(dataset, "info", None), "dataset_name", None) or None
    return {"model_name_or_path": name, "model_revision": revision, "dataset_name": dataset_name,
            "activation_cache": None, "prompt_format": asdict(prompt_format)}
