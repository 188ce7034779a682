"""Training an SAE-V (or, on a text-only causal LM and text data, a plain SAE: the paper's baseline).

Data flows one way: dataset rows -> [`LayerReader`] (the base model up to layer L) -> [`ActivationBuffer`] (real
tokens only, shuffled) -> [`SAEV`] trained with the paper's recipe -> a checkpoint that reads raw hidden states.

- [`SAEVTrainingArguments`] (`saev_hf.training_args`): every option, shared by the Python API and `saev train` (the
  paper's recipe as defaults); [`TrainingSchedule`] and [`FeatureFiringCounter`] (`saev_hf.schedule`): what changes
  with the step; [`ActivationBuffer`] (`saev_hf.activation_buffer`): the shuffled stream of activations.
- [`SAEVRun`] (this module): one SAE-V under training and what is its own (optimizer, LR schedule, firing counter,
  metrics, folder). [`SAEVTrainer`] trains one, or several on the same batches: a sweep (`saev_hf.sweep`) reads each
  activation batch once and steps every member's SAE-V on it; a single run is a sweep of one.
- [`SAEVTrainer`] (this module): the loop, on `accelerate.Accelerator`: devices, data-parallel processes (`torchrun` or
  `accelerate launch` run the same code on several processes; each reads its own shard of the dataset and gradients
  are averaged), checkpoints (`save_state`/`load_state` plus the activation buffer of every process), and the
  `report_to` trackers.
- [`train_saev`] and [`train_saevs`] (a sweep): one call, for scripts and the CLI.

Why `Accelerator` and not `transformers.Trainer`: the training data is not a dataset of examples but a stream that
the base model produces on the fly, one shuffling buffer per process, whose state must be checkpointed with the
optimizer for an exact resume; and the input scale is estimated before the first step and reduced over the processes.
`Trainer` would need its data loader, sampler, loss, schedule and checkpoint code overridden (and by default steps a
prepared scheduler once per process); an explicit loop on `Accelerator` is shorter and keeps each of these visible,
as EleutherAI's sparsify does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .activation_buffer import ActivationBuffer, activation_norm_statistics, input_scale_from_norms
from .activations import LayerReader, image_token_id_of
from .cache import ActivationCache, CacheReader, cached_rows
from .config import SAEVConfig
from .loading import accelerator_available, load_dataset_split, load_model_and_processor
from .model import SAEV
from .prompts import PromptFormat, undecoded_images
from .schedule import FeatureFiringCounter, TrainingSchedule  # noqa: F401  (TrainingSchedule: importable from here)
from .sweep import SWEEP_MANIFEST, SweepMember, sweep_members
from .training_args import RUN_ONLY_FIELDS, SAEVTrainingArguments

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ARGS_NAME = "training_args.json"
STATE_NAME = "trainer_state.json"
LOG_SPARSITY_EPS = 1e-10  # SAELens' epsilon: a feature that never fired gets log10 sparsity -10


class SAEVRun:
    """
    One SAE-V under training and everything that is its own: the SAE-V, Adam and the LR scheduler (as
    `accelerator.prepare` returns them), its [`TrainingSchedule`], its [`FeatureFiringCounter`], its metric sums and
    log history. [`SAEVTrainer`] holds one (a single run) or one per sweep member, and steps each on the same batch.

    Args:
        args ([`SAEVTrainingArguments`]): this SAE-V's arguments (a sweep member's: the base ones with its overrides).
        config ([`SAEVConfig`]): the SAE-V to build. It is initialised right after `torch.manual_seed(args.seed)`, so
            a sweep member starts from the weights a separate run with its arguments starts from.
        accelerator (`accelerate.Accelerator`): prepares the SAE-V, the optimizer and the scheduler.
        name (`str`, *optional*, defaults to `""`): the sweep member's name: its folder under `output_dir` (and in
            checkpoints), the prefix `name/` of its metrics in the trackers and of its counters in checkpoints. `""`
            for a single run, whose folder is `output_dir` itself.

    Attributes:
        sae ([`SAEV`]), prepared_sae, optimizer, lr_scheduler, schedule ([`TrainingSchedule`]), firing_counter
        ([`FeatureFiringCounter`]), log_history (`list[dict]`): as described on [`SAEVTrainer`].
    """

    def __init__(self, args: SAEVTrainingArguments, config: SAEVConfig, accelerator, name: str = "") -> None:
        self.args, self.name, self.accelerator = args, name, accelerator
        self.schedule = args.schedule(accelerator.num_processes)
        torch.manual_seed(args.seed)  # the same initialisation on every process, for every data order, in a sweep
        self.sae = SAEV(config).to(accelerator.device)
        optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.lr_factor)
        self.prepared_sae, self.optimizer, self.lr_scheduler = accelerator.prepare(self.sae, optimizer, scheduler)
        self.firing_counter = FeatureFiringCounter(
            config.d_sae, args.dead_feature_window, self.schedule.max_steps, accelerator.device
        )
        self.log_history: list[dict[str, Any]] = []
        self._log_sums: dict[str, torch.Tensor] = {}
        self._steps_in_log = 0
        self._last_rates = (float(args.learning_rate), float(args.l1_coefficient))

    @property
    def metric_prefix(self) -> str:
        """Prefix of this SAE-V's metrics in the trackers: `name/` in a sweep, nothing in a single run."""
        return f"{self.name}/" if self.name else ""

    def train_step(self, batch: torch.Tensor, step: int) -> None:
        """Optimizer step `step` (0-based) on `batch`; counts firing features and adds the step's metrics to the
        running sums."""
        args, accelerator = self.args, self.accelerator
        l1 = self.schedule.l1_coefficient(step, args.l1_coefficient)
        output = self.prepared_sae(batch, l1_coefficient=l1)
        accelerator.backward(output.loss)
        grad_norm = (
            accelerator.clip_grad_norm_(self.prepared_sae.parameters(), args.max_grad_norm)
            if args.max_grad_norm  # None or 0: no clipping (and no norm to log)
            else None
        )
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.firing_counter.update(output.feature_acts)
            step_metrics = {
                "loss": output.loss.detach(),
                "mse_loss": output.mse_loss.detach(),
                "sparsity_loss": output.sparsity_loss.detach(),
                "l0": output.l0.detach(),
                "explained_variance": _explained_variance(batch * self.sae.config.input_scale, output, self.sae),
            }
            if grad_norm is not None:
                step_metrics["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32).detach()
            for name, value in step_metrics.items():
                self._log_sums[name] = self._log_sums.get(name, 0) + value.float().to(accelerator.device)
        self._steps_in_log += 1
        self._last_rates = (lr, l1)

    def log(self, steps_done: int) -> dict[str, float]:
        """After `steps_done` steps: the dead features when a firing window closes, the metrics' means every
        `logging_steps` (averaged over processes) and at the last step. Added to `log_history`; returned."""
        args, accelerator = self.args, self.accelerator
        logs: dict[str, float] = {}
        if self.firing_counter.window_ends_at(steps_done - 1):
            frequency = self.firing_counter.close_window(accelerator.reduce if accelerator.num_processes > 1 else None)
            logs["dead_features"] = int((frequency < args.dead_feature_threshold).sum())
        if steps_done % args.logging_steps == 0 or steps_done == self.schedule.max_steps:
            sums = self._log_sums
            means = torch.stack([sums[name] for name in sums]) / self._steps_in_log
            if accelerator.num_processes > 1:
                means = accelerator.reduce(means, "mean")
            logs.update({name: float(value) for name, value in zip(sums, means)})
            lr, l1 = self._last_rates
            logs.update({"learning_rate": lr, "l1_coefficient": l1})
            self._log_sums, self._steps_in_log = {}, 0
        if logs:
            self.log_history.append({"step": steps_done, **logs})
        return logs

    @torch.no_grad()
    def export_sae(self, training_tokens: int) -> SAEV:
        """A copy of the SAE as it would be saved: provenance recorded, sparsity filled, input scale folded."""
        sae = copy.deepcopy(self.sae)
        sae.config.training_tokens = training_tokens
        if self.firing_counter.frequency is not None:
            log_sparsity = torch.log10(self.firing_counter.frequency + LOG_SPARSITY_EPS)
            sae.feature_log_sparsity.copy_(log_sparsity.to(sae.feature_log_sparsity))
        return sae.fold_input_scale()

    def args_record(self) -> dict[str, Any]:
        """Its `training_args.json`: what a single run with these arguments writes."""
        return {"args": self.args.to_dict(), "num_processes": self.accelerator.num_processes}

    def state_record(self, shared: dict[str, Any]) -> dict[str, Any]:
        """Its `trainer_state.json`: the run's shared record (steps, tokens, input scale, processes) with its own
        dead features and log history."""
        frequency = self.firing_counter.frequency
        return {
            **shared,
            "dead_features": None if frequency is None else int((frequency < self.args.dead_feature_threshold).sum()),
            "log_history": self.log_history,
        }

    def counter_state(self) -> dict[str, torch.Tensor]:
        """The firing counter's tensors for a checkpoint, under keys prefixed with `name/` in a sweep."""
        prefix = self.metric_prefix
        return {prefix + key: value for key, value in self.firing_counter.state_dict().items()}

    def load_counter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the firing counter from a checkpoint's tensors ([`counter_state`])."""
        prefix = self.metric_prefix
        self.firing_counter.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                             if key.startswith(prefix) and "/" not in key[len(prefix):]})


class SAEVTrainer:
    """
    Trains an [`SAEV`] on activations streamed from a base model, with `accelerate`; or, with `sweep=`, several
    SAE-Vs on the same activations, read once.

    Example:

    ```python
    args = SAEVTrainingArguments(
        layer=16,
        output_dir="saev-llava-next",
        model_name_or_path="llava-hf/llava-v1.6-mistral-7b-hf",
        dataset_name="my-org/image-text-pairs",  # columns "images" and "prompt" (see PromptFormat)
    )
    sae = SAEVTrainer(args).train()  # or: train_saev(args, model=model, processor=processor, dataset=dataset)
    saes = SAEVTrainer(args, sweep={"l1_coefficient": [1, 5], "expansion_factor": [8, 16]}).train()  # 4 SAE-Vs
    ```

    Args:
        args ([`SAEVTrainingArguments`]): the run's options (a sweep's base options).
        model (*optional*): the base model; loaded from `args.model_name_or_path` when not given.
        processor (*optional*): its processor or tokenizer; required with `model`.
        train_dataset (`datasets.Dataset` or `IterableDataset`, *optional*): the rows to read; loaded from
            `args.dataset_name` when not given. In a distributed run each process reads its own shard of it.
        sweep (*optional*): train one SAE-V per member of this sweep instead of one (see `saev_hf.sweep`): a grid
            `{"l1_coefficient": [1, 5], "expansion_factor": [8, 16]}` (every combination), a list of overrides
            `[{"activation": "topk", "k": 32}, {"l1_coefficient": 5}]`, JSON text or a JSON file holding either. Only
            the options in `saev_hf.sweep.SWEEP_FIELDS` may vary. Each batch is read once and every member steps on
            it; each member ends with the SAE-V a separate run with its arguments gives, in
            `output_dir/<member name>` with the files a single run writes, and `output_dir/sweep.json` lists them.

    With `args.activation_cache`, neither a model nor a dataset is loaded: the buffer reads the cache's rows through a
    [`saev_hf.cache.CacheReader`] (the `reader`), the same procedure, so a float32 cache made with the run's
    `read_batch_size` gives the run that reading the model gives.

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
        accelerator (`accelerate.Accelerator`), reader ([`LayerReader`]), schedule ([`TrainingSchedule`]),
        global_step (`int`).
    """

    def __init__(self, args: SAEVTrainingArguments, model=None, processor=None, train_dataset=None,
                 sweep: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args = args
        self.members: list[SweepMember] | None = sweep_members(args, sweep) if sweep is not None else None
        # On a machine without an accelerator, `torchrun`/`accelerate launch` processes must be told to use the CPU
        # backend (gloo) or accelerate silently runs each of them as a separate single-process job.
        use_cpu = args.use_cpu or not accelerator_available()
        self.accelerator = Accelerator(
            cpu=use_cpu,
            log_with=args.trackers,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
            ),
            # The schedule counts global optimizer steps; a prepared scheduler would otherwise step once per process.
            step_scheduler_with_optimizer=False,
        )
        set_seed(args.seed)
        self.schedule = args.schedule(self.accelerator.num_processes)
        self.resume_dir = self._resolve_checkpoint()
        self._check_output_dir()
        if args.activation_cache is not None:
            self.reader, self.train_dataset = self._cache_reader(model, train_dataset)
        else:
            model, processor, self.train_dataset = self._model_and_data(model, processor, train_dataset)
            self.reader = self._layer_reader(model, processor)
        members = [(args, "")] if self.members is None else [(m.args, m.name) for m in self.members]
        self.runs = [SAEVRun(run_args, self._sae_config(run_args, model), self.accelerator, name)
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

    def _model_and_data(self, model, processor, train_dataset):
        """The base model (eval mode) with its processor, and the training rows: those given, or loaded from the
        names in the arguments."""
        args = self.args
        if model is None:
            if args.model_name_or_path is None:
                raise ValueError("No base model: pass model= and processor=, or set model_name_or_path.")
            model, processor = load_model_and_processor(
                args.model_name_or_path, args.model_revision, args.model_dtype, self.accelerator.device
            )
        elif processor is None:
            raise ValueError("A model was passed without its processor (or tokenizer): pass processor= too.")
        model.eval()  # activations are read without dropout
        if train_dataset is None:
            if args.dataset_name is None:
                raise ValueError("No training data: pass train_dataset=, or set dataset_name.")
            train_dataset = load_dataset_split(
                args.dataset_name, args.dataset_config, args.dataset_split, args.streaming
            )
            # read image bytes ourselves, so that a corrupt image is an error naming its row
            train_dataset, _ = undecoded_images(train_dataset, args.image_column)
        return model, processor, train_dataset

    def _cache_reader(self, model, train_dataset):
        """With `activation_cache`: a [`CacheReader`] of the cache in place of the base model, and the rows it
        holds ([`cached_rows`]), after checking that the cache holds what this run trains on."""
        args = self.args
        if model is not None or train_dataset is not None:
            raise ValueError(f"activation_cache={args.activation_cache!r} replaces the base model and the dataset: "
                             f"pass neither model= nor dataset=, or drop activation_cache.")
        cache = ActivationCache(args.activation_cache)
        if cache.layer != args.layer:
            raise ValueError(f"The activation cache {args.activation_cache!r} holds layer {cache.layer}, but "
                             f"layer={args.layer}. Train with --layer {cache.layer}, or cache layer {args.layer}.")
        if args.include_special_tokens and not cache.manifest["include_special_tokens"]:
            raise ValueError(f"The activation cache {args.activation_cache!r} was made without special tokens, but "
                             f"include_special_tokens=True. Pass include_special_tokens=False, or make the cache "
                             f"with them.")
        return CacheReader(cache), cached_rows(cache)

    def _layer_reader(self, model, processor) -> LayerReader:
        """The reader of layer `args.layer`; a text-only causal LM reads text only (the image column is not used)."""
        prompt_format = self.args.prompt_format
        if image_token_id_of(model, processor) is None and prompt_format.image_column is not None:
            # A text-only causal LM reads text only (the paper's SAE baseline); the image column is not used.
            prompt_format = PromptFormat(image_column=None, prompt_column=prompt_format.prompt_column,
                                         response_column=prompt_format.response_column,
                                         max_length=prompt_format.max_length)
        return LayerReader(model, processor, layer=self.args.layer, prompt_format=prompt_format)

    def _sae_config(self, args: SAEVTrainingArguments, model) -> SAEVConfig:
        """The configuration of a fresh SAE-V with options `args`, sized for the reader, with its provenance."""
        return SAEVConfig(
            d_in=self.reader.hidden_size,
            d_sae=args.d_sae,
            expansion_factor=args.expansion_factor,
            activation=args.activation,
            k=args.k,
            hook_layer=args.layer,
            base_model_name_or_path=(args.model_name_or_path
                                     or getattr(getattr(model, "config", None), "_name_or_path", None)
                                     or self._cache_record("model_name_or_path")),
            base_model_revision=args.model_revision,
            l1_coefficient=args.l1_coefficient,
            dataset_name=_dataset_description(args, self.train_dataset) or self._cache_record("dataset_name"),
            training_tokens=0,
        )

    def _cache_record(self, name: str) -> Any:
        """Entry `name` of the activation cache's manifest (None without a cache)."""
        return self.reader.cache.manifest.get(name) if self.args.activation_cache is not None else None

    # --- data ----------------------------------------------------------------------------------------------------

    def activation_buffer(self, process_index: int | None = None, num_processes: int | None = None) -> ActivationBuffer:
        """
        A fresh activation buffer over the shard of the training data that process `process_index` of
        `num_processes` reads (default: this process of this run). Its shuffle is seeded with `seed + process_index`.
        """
        from datasets.distributed import split_dataset_by_node

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
            progress=not self.args.disable_tqdm and self.accelerator.is_local_main_process,
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
        from tqdm.auto import tqdm

        batch_iterator = self._start(batches)
        what = "SAE-V" if self.members is None else f"{len(self.runs)} SAE-Vs"
        progress = tqdm(total=self.schedule.max_steps, initial=self.global_step, desc=f"Training {what}", unit="step",
                        disable=self.args.disable_tqdm or not self.accelerator.is_local_main_process)
        for run in self.runs:
            run.prepared_sae.train()
        while self.global_step < self.schedule.max_steps:
            batch = self._next_batch(batch_iterator)
            for run in self.runs:  # one read of the activations, one step of every SAE-V
                run.train_step(batch, self.global_step)
            self.global_step += 1
            progress.update(1)
            self._log(progress)
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
                self._write_json(output / run.name / ARGS_NAME, run.args_record())
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
        saes = [run.export_sae(self._training_tokens()) for run in self.runs]
        shared = self._shared_state()  # gathers from every process
        if self.accelerator.is_main_process:
            output = Path(self.args.output_dir)
            for run, sae in zip(self.runs, saes):
                sae.save_pretrained(output / run.name)
                self._write_json(output / run.name / STATE_NAME, run.state_record(shared))
            if self.members is not None:
                finals = [{name: value for name, value in run.log_history[-1].items() if name != "step"}
                          if run.log_history else {} for run in self.runs]
                record = self._args_record()
                for member, final in zip(record["sweep"], finals):
                    member["final_metrics"] = final
                self._write_json(output / SWEEP_MANIFEST, {**record, "finished": True, "global_step": self.global_step})
        self.accelerator.wait_for_everyone()
        # Finish the trackers but leave the process group to whoever started it, as transformers' Trainer does.
        # accelerate's end_training() destroys it; the DDP reducer freed afterwards then tears gloo down while holding
        # the GIL, which deadlocks when gloo's worker thread is still releasing the last collective's tensors.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.members is None:
            return saes[0]
        return {run.name: sae for run, sae in zip(self.runs, saes)}

    def export_sae(self) -> SAEV:
        """A copy of the SAE as it would be saved: provenance recorded, sparsity filled, input scale folded (the
        first member's in a sweep: see [`SAEVRun.export_sae`])."""
        return self.runs[0].export_sae(self._training_tokens())

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """
        Save everything needed to resume at this step to `output_dir/checkpoint-<step>` and return the folder: every
        run's SAE-V, optimizer and scheduler (`accelerator.save_state`), firing counters and the activation buffer
        (once, in `data_state_<process>.safetensors`), the arguments and the trainer state; each run's state and
        loadable SAE-V in its folder (`checkpoint-<step>/<member name>/` in a sweep).
        """
        accelerator = self.accelerator
        path = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.global_step}"
        accelerator.save_state(str(path))  # models, optimizers, schedulers, RNG states of every process
        data_state: dict[str, torch.Tensor] = {}
        for run in self.runs:
            data_state.update(run.counter_state())
        metadata = {}
        if self.buffer is not None:
            buffer_state = self.buffer.state_dict(include_tokens=self.args.save_buffer_in_checkpoint)
            if buffer_state["tokens"] is not None:
                data_state["buffer_tokens"] = buffer_state["tokens"]
            data_state["buffer_generator"] = buffer_state["generator"]
            metadata = {name: str(value) for name, value in buffer_state.items() if name not in ("tokens", "generator")}
        save_file(
            {name: tensor.contiguous() for name, tensor in data_state.items()},
            str(path / f"data_state_{accelerator.process_index}.safetensors"),
            metadata=metadata,
        )
        shared = self._shared_state()  # gathers from every process
        if accelerator.is_main_process:
            self._write_json(path / ARGS_NAME, self._args_record())
            if self.members is not None:
                self._write_json(path / STATE_NAME, {**shared, "members": [run.name for run in self.runs]})
            for run in self.runs:
                self._write_json(path / run.name / STATE_NAME, run.state_record(shared))
                run.export_sae(self._training_tokens()).save_pretrained(path / run.name / "saev")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.args.save_total_limit:
            for old in _checkpoints(self.args.output_dir)[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path, own_batches: bool) -> None:
        accelerator = self.accelerator
        state = json.loads((path / STATE_NAME).read_text())
        if state["num_processes"] != accelerator.num_processes:
            raise ValueError(
                f"Checkpoint {path} was written by {state['num_processes']} processes but this run has "
                f"{accelerator.num_processes}. Each process resumes its own data shard and buffer: resume with "
                f"{state['num_processes']} processes."
            )
        accelerator.load_state(str(path))
        self.global_step = int(state["global_step"])
        data_file = path / f"data_state_{accelerator.process_index}.safetensors"
        data_state = load_file(str(data_file))
        for run in self.runs:
            run.sae.config.input_scale = float(state["input_scale"])
            run_state = json.loads((path / run.name / STATE_NAME).read_text())
            run.log_history[:] = run_state.get("log_history", [])
            run.load_counter_state(data_state)
        from safetensors import safe_open

        with safe_open(str(data_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if not own_batches and "buffer_generator" in data_state:
            self.buffer = self.activation_buffer()
            self.buffer.load_state_dict(
                {
                    "tokens": data_state.get("buffer_tokens"),
                    "generator": data_state["buffer_generator"],
                    **{name: int(value) for name, value in metadata.items()},
                }
            )
        logger.info("Resumed from %s at step %d", path, self.global_step)

    def _resolve_checkpoint(self) -> Path | None:
        """The checkpoint folder to resume from (None for a fresh run), after checking that it matches the args."""
        value = self.args.resume_from_checkpoint
        if value is None:
            return None
        if value == "latest":
            found = _checkpoints(self.args.output_dir)
            if not found:
                raise ValueError(
                    f"resume_from_checkpoint='latest' but {self.args.output_dir} holds no {CHECKPOINT_PREFIX}* folder. "
                    f"Point it at a checkpoint folder, or drop it to start a new run."
                )
            path = found[-1]
        else:
            path = Path(value)
        if not (path / STATE_NAME).exists() or not (path / ARGS_NAME).exists():
            raise ValueError(
                f"resume_from_checkpoint={value!r}: {path} is not an SAE-V training checkpoint (no {STATE_NAME} and "
                f"{ARGS_NAME}). Use a {CHECKPOINT_PREFIX}<step> folder written by SAEVTrainer, or 'latest'."
            )
        differences = self._record_differences(json.loads((path / ARGS_NAME).read_text()))
        if differences:
            raise ValueError(
                f"Cannot resume from {path}: it was trained with different settings: {'; '.join(differences)}. "
                f"Resume with the checkpoint's settings, or start a new run in another output_dir."
            )
        return path

    def _check_output_dir(self) -> None:
        """Refuse an output_dir holding anything but this run's own earlier output (its `training_args.json`, or a
        sweep's `sweep.json`, with the same settings), unless `overwrite_output_dir` or resuming."""
        output = Path(self.args.output_dir)
        saved_file = output / (ARGS_NAME if self.members is None else SWEEP_MANIFEST)
        what = "training run" if self.members is None else "sweep"
        if self.resume_dir is not None or self.args.overwrite_output_dir:
            return
        if not saved_file.exists():
            # not an earlier run of this kind (its record is saved_file): anything there is someone else's
            entries = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
            if entries:
                shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
                raise FileExistsError(
                    f"output_dir {self.args.output_dir} already holds files that no {what} wrote ({shown}); "
                    f"saving the SAE-V there would replace them (e.g. a model's config.json and model.safetensors). "
                    f"Choose a new or empty folder, or pass overwrite_output_dir=True (--overwrite_output_dir) to "
                    f"write into it anyway."
                )
            if output.exists() and not output.is_dir():
                raise FileExistsError(f"output_dir {self.args.output_dir} is a file; name a folder.")
            return
        differences = self._record_differences(json.loads(saved_file.read_text()))
        if differences:
            raise ValueError(
                f"output_dir {self.args.output_dir} holds a different {what} ({'; '.join(differences)}). "
                f"Choose another output_dir, pass overwrite_output_dir=True to replace it, or resume it with "
                f"resume_from_checkpoint='latest' and its settings."
            )
        if _checkpoints(self.args.output_dir):
            logger.warning(
                "%s holds checkpoints of this same %s; starting again from step 0. Pass "
                "resume_from_checkpoint='latest' to continue it instead.", self.args.output_dir, what
            )

    # --- records -------------------------------------------------------------------------------------------------

    def _args_record(self) -> dict[str, Any]:
        """The arguments (and a sweep's members) as `training_args.json` / `sweep.json` record them."""
        record: dict[str, Any] = {"args": self.args.to_dict(), "num_processes": self.accelerator.num_processes}
        if self.members is not None:
            record["sweep"] = [member.record() for member in self.members]
        return record

    def _record_differences(self, saved: dict[str, Any]) -> list[str]:
        """What differs between a saved `_args_record` and this run's (run-only options aside)."""
        differences = _differences(saved["args"], self.args.to_dict())
        current = json.loads(json.dumps(self._args_record().get("sweep"), default=str))
        if saved.get("sweep") is not None:
            saved_sweep = [{k: m.get(k) for k in ("name", "folder", "overrides")} for m in saved["sweep"]]
        else:
            saved_sweep = None
        if saved_sweep != current:
            names = (lambda sweep: [m["name"] for m in sweep] if sweep is not None else "no sweep (a single run)")
            differences.append(f"sweep: {names(saved_sweep)} (saved) vs {names(current)} (now)")
        return differences

    def _shared_state(self) -> dict[str, Any]:
        """What every run's `trainer_state.json` shares: steps, tokens, input scale and each process's position in
        the data (gathered from every process: every process must call it)."""
        accelerator = self.accelerator
        data = self.buffer.state_dict(include_tokens=False) if self.buffer is not None else {}
        counters = [data.get(name, -1) for name in ("rows_read", "tokens_read", "data_pass")]
        per_process = torch.tensor([accelerator.process_index, *counters], dtype=torch.long, device=accelerator.device)
        gathered = accelerator.gather(per_process[None]) if accelerator.num_processes > 1 else per_process[None]
        return {
            "global_step": self.global_step,
            "max_steps": self.schedule.max_steps,
            "training_tokens": self._training_tokens(),
            "input_scale": self.sae.config.input_scale,
            "num_processes": accelerator.num_processes,
            "processes": [
                {"process_index": int(p), "rows_read": int(r), "tokens_read": int(t), "data_passes": int(d) + 1}
                for p, r, t, d in gathered.tolist()
            ],
        }

    def _tracker_config(self) -> dict[str, Any]:
        # TensorBoard's hparams and some trackers accept only scalars.
        record = self.args.to_dict()
        if self.members is not None:
            record["sweep"] = json.dumps({member.name: member.overrides for member in self.members})
        return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
                for name, value in record.items()}

    def _training_tokens(self) -> int:
        return self.global_step * self.args.train_batch_size_tokens * self.accelerator.num_processes

    def _write_json(self, path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def train_saev(
    args: SAEVTrainingArguments, model=None, processor=None, dataset=None, batches: Iterable[torch.Tensor] | None = None
) -> SAEV:
    """
    Train an SAE-V as `args` say and save it to `args.output_dir`; see [`SAEVTrainer`].

    Pass `model`, `processor` and `dataset` to use objects already in memory; otherwise they are loaded from
    `args.model_name_or_path` and `args.dataset_name`. Run the same script with `torchrun --nproc_per_node N` or
    `accelerate launch` to train data-parallel on N processes.

    Returns the trained [`SAEV`], reading raw hidden states (input scale folded into the weights). Like transformers'
    Trainer it leaves the process group to the script: end a distributed script with [`end_distributed`].
    """
    return SAEVTrainer(args, model=model, processor=processor, train_dataset=dataset).train(batches)


def train_saevs(
    args: SAEVTrainingArguments, sweep: Any, model=None, processor=None, dataset=None,
    batches: Iterable[torch.Tensor] | None = None,
) -> dict[str, SAEV]:
    """
    Train several SAE-Vs from one pass of activations: one per member of `sweep`, each step reading one batch and
    stepping every member on it; see [`SAEVTrainer`] and `saev_hf.sweep`.

    Example:

    ```python
    saes = train_saevs(args, {"l1_coefficient": [1, 5], "activation": ["relu"]}, model=model, processor=processor,
                       dataset=dataset)
    saes["l1_coefficient=5,activation=relu"]  # also saved in args.output_dir/l1_coefficient=5,activation=relu
    ```

    Args:
        args ([`SAEVTrainingArguments`]): the base options, shared by every member except for its overrides.
        sweep: a grid `{field: [values]}` (every combination), a list of override dicts, or JSON text or a JSON file
            holding either; only options of the SAE-V and its optimisation (`saev_hf.sweep.SWEEP_FIELDS`) may vary.
        model, processor, dataset, batches: as for [`train_saev`].

    Returns:
        `dict[str, SAEV]`: the trained SAE-Vs by member name (`field=value,...`), in the sweep's order. Each equals
        what `train_saev` gives with that member's arguments (`SAEVTrainer(args, sweep=sweep).members[i].args`).
    """
    return SAEVTrainer(args, model=model, processor=processor, train_dataset=dataset, sweep=sweep).train(batches)


def end_distributed() -> None:
    """Destroy the process group that a launcher (`torchrun`, `accelerate launch`) had this process join, as PyTorch
    asks every trainer process to do at the end of its script; a no-op outside a distributed run.

    Left to interpreter exit, gloo's worker threads can abort the process (`terminate called without an active
    exception`) after the work is done. Call it once nothing uses the DDP-wrapped SAE-V any more: the trainer is
    collected first, so that no DDP reducer is torn down after the group it reduces over.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    names = sorted((set(saved) | set(current)) - RUN_ONLY_FIELDS)
    return [
        f"{name}: {saved.get(name)!r} (saved) vs {current.get(name)!r} (now)"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def _dataset_description(args: SAEVTrainingArguments, dataset: Any) -> str | None:
    if args.dataset_name is not None:
        name = args.dataset_name
        if args.dataset_config:
            name += f":{args.dataset_config}"
        return name
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or None


def _explained_variance(scaled_batch: torch.Tensor, output, sae: SAEV) -> torch.Tensor:
    """1 - residual variance / total variance of a batch, on scaled inputs."""
    residual = (output.reconstruction * sae.config.input_scale - scaled_batch).pow(2).sum()
    total = (scaled_batch - scaled_batch.mean(0)).pow(2).sum()
    return 1 - residual / total.clamp_min(torch.finfo(total.dtype).tiny)
