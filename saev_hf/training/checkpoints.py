"""The training run's folders: its checkpoints (saved every `save_steps`, resumed exactly), its records
(`training_args.json`, `trainer_state.json`, a sweep's `sweep.json`) and which `output_dir` it may write into.

[`TrainingCheckpoints`] is the part of [`saev_hf.training.SAEVTrainer`] that reads and writes them: a mixin, so that
the trainer's loop reads top to bottom without the bookkeeping of its folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .arguments import RUN_ONLY_FIELDS
from .sweep import SWEEP_MANIFEST

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


ARGS_NAME = "training_args.json"


STATE_NAME = "trainer_state.json"


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


class TrainingCheckpoints:
    """
    Checkpoints, records and the output folder of a training run: mixed into [`SAEVTrainer`], whose `args`,
    `accelerator`, `runs`, `members`, `buffer`, `schedule`, `sae`, `global_step` and `resume_dir` it reads.
    """

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
            # the trainer state and arguments are written last: a checkpoint cut short (a killed run) lacks them, and
            # resume_from_checkpoint='latest' passes it over
            for run in self.runs:
                run.export_sae(self._training_tokens()).save_pretrained(path / run.name / "saev")
                if self.members is not None:
                    self._write_json(path / run.name / STATE_NAME, run.state_record(shared))
            self._write_json(path / ARGS_NAME, self._args_record())
            if self.members is not None:
                self._write_json(path / STATE_NAME, {**shared, "members": [run.name for run in self.runs]})
            else:
                (run,) = self.runs
                self._write_json(path / run.name / STATE_NAME, run.state_record(shared))
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
            complete = [p for p in found if (p / STATE_NAME).exists() and (p / ARGS_NAME).exists()]
            newest = found.index(complete[-1]) if complete else -1
            for cut_short in found[newest + 1:]:
                logger.warning("Skipping %s: it was cut short while being written (no %s), so it cannot be resumed "
                               "from.", cut_short, STATE_NAME)
            if not complete:  # killed while writing its first checkpoint: nothing to resume, the run starts over
                logger.warning("No complete checkpoint in %s: starting again from step 0.", self.args.output_dir)
                return None
            path = complete[-1]
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
        record: dict[str, Any] = {"args": self.args.to_dict(), "source": self.source,
                                  "num_processes": self.accelerator.num_processes}
        if self.members is not None:
            record["sweep"] = [member.record() for member in self.members]
        return record

    def _record_differences(self, saved: dict[str, Any]) -> list[str]:
        """What differs between a saved `_args_record` and this run's (run-only options aside)."""
        differences = _differences(saved["args"], self.args.to_dict())
        differences += _differences(saved.get("source", {}), self.source)
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
