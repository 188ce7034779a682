"""Several SAE-Vs trained from one pass of activations: what a sweep is and which options it may vary.

The base model's forward dominates the cost of training an SAE-V, so a sweep over the SAE's own hyper-parameters
(L1 coefficient, width, ReLU vs TopK, learning rate, ...) reads each activation batch once and steps every member's
SAE-V on it, as OSU's saev and EleutherAI's sparsify train many SAEs from one batch. Each member then ends with exactly
the SAE-V that a separate run with its arguments, the same seed and the same data gives (its initialisation is seeded
with `seed` before it is built, and it sees the same batches).

- [`SWEEP_FIELDS`]: the options a sweep may vary: those that define an SAE-V and its optimisation. Every other option
  (the base model and layer, the data, batch and buffer sizes, the seed, the number of steps, the input scale, the
  output and logging options) defines the shared activation stream or the run, and is refused.
- [`parse_sweep`]: a sweep from the command line (`saev train --sweep`): JSON text or a JSON file holding a grid
  `{"l1_coefficient": [1, 5], "expansion_factor": [8, 16]}` (every combination) or a list of overrides
  `[{"activation": "topk", "k": 32}, {"l1_coefficient": 5}]`.
- [`sweep_members`]: the members: name, overrides and full arguments ([`SweepMember`]), each written to its own folder
  `output_dir/<name>` (e.g. `l1_coefficient=5,expansion_factor=16`).
- [`SweepArguments`]: the `--sweep` option of `saev train`.

The trainer is [`saev_hf.training.SAEVTrainer`] (`sweep=`); [`saev_hf.training.train_saevs`] is the one-call form.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .arguments import SAEVTrainingArguments

SWEEP_MANIFEST = "sweep.json"
"""File a sweep writes into its `output_dir`: the base arguments, and each member's name, overrides and folder."""

SWEEP_FIELDS = (
    "l1_coefficient",
    "expansion_factor",
    "d_sae",
    "activation",
    "k",
    "learning_rate",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_warmup_steps",
    "lr_decay_steps",
    "l1_warmup_steps",
    "max_grad_norm",
    "dead_feature_window",
    "dead_feature_threshold",
)
"""Options a sweep may vary: they define an SAE-V (width, activation, k, sparsity penalty) and its optimisation (Adam,
the warm-up and decay lengths, clipping) and the dead-feature count. All other options define the activation stream
every member trains on (base model, layer, data, batch and buffer sizes, seed, number of steps, input scale) or the run
itself (output, logging, checkpoints) and are shared."""


@dataclass(frozen=True)
class SweepMember:
    """
    One SAE-V of a sweep.

    Attributes:
        name (`str`): its overrides as `field=value` joined by commas, in the order given (`"defaults"` for none): the
            name of its folder in `output_dir`, its prefix in the trackers' metrics and its key in the trained SAE-Vs.
        overrides (`dict`): the options it changes from the base arguments.
        args ([`SAEVTrainingArguments`]): its full arguments: the base ones with `overrides`, and
            `output_dir=<base output_dir>/<name>`. A separate `train_saev(member.args, ...)` gives its SAE-V.
    """

    name: str
    overrides: dict[str, Any]
    args: SAEVTrainingArguments

    def record(self) -> dict[str, Any]:
        """Its entry in the sweep manifest."""
        return {"name": self.name, "folder": self.name, "overrides": self.overrides}


@dataclass
class SweepArguments:
    """The `--sweep` option of `saev train`."""

    sweep: str | None = field(
        default=None,
        metadata={"help": (
            "Train several SAE-Vs from one pass of activations (the base model's forward runs once): JSON text or a "
            "JSON file holding a grid {\"l1_coefficient\": [1, 5], \"expansion_factor\": [8, 16]} (every "
            "combination) or a list of overrides [{\"activation\": \"topk\", \"k\": 32}, {\"l1_coefficient\": 5}]. "
            "Each member is saved to output_dir/<field=value,...>, with sweep.json listing them. Only options of the "
            f"SAE-V and its optimisation may vary: {', '.join(SWEEP_FIELDS)}."
        )},
    )


def parse_sweep(value: str | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """
    The members' overrides of a sweep, in order.

    Args:
        value: a grid `{field: [values, ...]}` (every combination; the last field varies fastest), a list of override
            dicts, or either as JSON text or the path of a JSON file.

    Example:

    ```python
    >>> parse_sweep('{"l1_coefficient": [1, 5], "activation": ["relu"]}')
    [{'l1_coefficient': 1, 'activation': 'relu'}, {'l1_coefficient': 5, 'activation': 'relu'}]

    ```
    """
    if isinstance(value, str):
        text = value
        if not value.lstrip().startswith(("{", "[")):
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"sweep={value!r} is neither JSON (a grid {{...}} or a list [...]) nor a JSON file.")
            text = path.read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"The sweep is not valid JSON ({error}): {text[:200]!r}") from None
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("The sweep grid is empty: give at least one field with a list of values, e.g. "
                             "{\"l1_coefficient\": [1, 5]}.")
        for name, values in value.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"Sweep grid field {name!r}: {values!r} must be a non-empty list of values, e.g. "
                                 f"{{{json.dumps(name)}: [{json.dumps(values)}]}}.")
        return [dict(zip(value, combination)) for combination in itertools.product(*value.values())]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value:
            raise ValueError("The sweep is an empty list: give at least one member, e.g. [{\"l1_coefficient\": 5}].")
        for entry in value:
            if not isinstance(entry, Mapping):
                raise ValueError(f"Sweep member {entry!r} must be a dict of options, e.g. {{\"l1_coefficient\": 5}}.")
        return [dict(entry) for entry in value]
    raise ValueError(f"A sweep is a grid {{field: [values]}} or a list of override dicts; got {value!r}.")


def sweep_members(args: SAEVTrainingArguments, sweep: Any) -> list[SweepMember]:
    """
    The members of a sweep over the base arguments `args`, after checking it.

    Args:
        args ([`SAEVTrainingArguments`]): the base arguments, shared by every member except for its overrides.
        sweep: what [`parse_sweep`] reads (a grid, a list of overrides, JSON text or a JSON file).

    Raises:
        ValueError: the sweep is empty, names an unknown option or one that every member must share (naming it and
            the fix), two members would train the same SAE-V, or a member's arguments are invalid.
    """
    overrides_list = parse_sweep(sweep)
    known = {f.name for f in dataclasses.fields(SAEVTrainingArguments)}
    members: list[SweepMember] = []
    for raw in overrides_list:
        for name in raw:
            if name not in known:
                raise ValueError(f"Sweep option {name!r} is not a training option. Options a sweep may vary: "
                                 f"{', '.join(SWEEP_FIELDS)}.")
            if name not in SWEEP_FIELDS:
                raise ValueError(
                    f"Sweep option {name!r} cannot vary within a sweep: every member trains on the same activation "
                    f"stream and run settings, which {name!r} defines. Set it once (--{name}) for the whole sweep, "
                    f"or run separate sweeps for each value. Options a sweep may vary: {', '.join(SWEEP_FIELDS)}."
                )
        for name, value in raw.items():
            _check_type(name, value, raw)
        overrides = {name: _coerce(args, name, value) for name, value in raw.items()}
        name = ",".join(f"{key}={_format(value)}" for key, value in overrides.items()) or "defaults"
        members.append(SweepMember(name, overrides, _member_args(args, name, overrides)))
    seen: dict[str, str] = {}
    for member in members:
        defining = json.dumps({k: v for k, v in member.args.to_dict().items() if k in SWEEP_FIELDS}, sort_keys=True)
        if member.name in seen.values() or defining in seen:
            other = seen.get(defining, member.name)
            raise ValueError(f"Sweep members {other!r} and {member.name!r} train the same SAE-V. Remove one of them.")
        seen[defining] = member.name
    return members


def _member_args(args: SAEVTrainingArguments, name: str, overrides: dict[str, Any]) -> SAEVTrainingArguments:
    """The base arguments with a member's overrides, in its own folder. Giving one of the exclusive pairs (d_sae /
    expansion_factor; activation 'relu' / k) replaces the other."""
    values = dict(overrides)
    if "d_sae" in values and "expansion_factor" not in values:
        values["expansion_factor"] = None
    if "expansion_factor" in values and "d_sae" not in values:
        values["d_sae"] = None
    if values.get("activation", args.activation) != "topk" and "k" not in values:
        values["k"] = None
    try:
        return dataclasses.replace(args, **values, output_dir=str(Path(args.output_dir) / name))
    except ValueError as error:
        raise ValueError(f"Sweep member {name!r}: {error}") from None


def _check_type(name: str, value: Any, member: Mapping[str, Any]) -> None:
    """Refuse a sweep value of the wrong type (a string for a number, a bool for a rate), naming the member, the
    option and the type it takes."""
    hint = typing.get_type_hints(SAEVTrainingArguments)[name]
    types = [t for t in typing.get_args(hint) or (hint,)]
    if value is None and type(None) in types:
        return
    if isinstance(value, bool) or not any(
            isinstance(value, t) or (t is float and isinstance(value, int)) for t in types if t is not type(None)):
        wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"Sweep member {dict(member)}: {name}={value!r} must be {wanted}, not "
                         f"{type(value).__name__}.")


def _coerce(args: SAEVTrainingArguments, name: str, value: Any) -> Any:
    """JSON's `5` for a float option is `5.0`, so that a member's arguments equal those of a separate run."""
    if isinstance(getattr(args, name), float) or name in ("l1_coefficient", "learning_rate", "adam_beta1",
                                                          "adam_beta2", "adam_epsilon", "dead_feature_threshold"):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _format(value: Any) -> str:
    """A value as it appears in a member's name: `5`, `0.0001`, `1e-05`, `topk`, `None`."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)
