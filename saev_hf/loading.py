"""Loading the pieces a command works on: a base model with its processor, and one split of a dataset.

Shared by training, evaluation, weighting and scoring, from Python and from the `saev` command line.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The dtypes a base model can be loaded in: 'auto' is transformers' `dtype="auto"`, the checkpoint's own dtype."""


def check_model_dtype(dtype: str, option: str = "model_dtype") -> None:
    """Refuse a dtype outside [`MODEL_DTYPES`], naming the option it was given to."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{option}={dtype!r} is not supported; use one of {MODEL_DTYPES}.")


def model_dtype_field(default: str = "auto", note: str = "") -> Any:
    """The `model_dtype` option of every arguments dataclass that loads a base model: one name, one help, one list
    of choices."""
    return field(default=default, metadata={
        "help": f"dtype the base model is loaded in, one of {MODEL_DTYPES}. 'auto' (the default, as transformers' "
                f"from_pretrained(dtype='auto')) keeps the checkpoint's own dtype: bfloat16 for most released MLLMs "
                f"(half the memory of float32, several times faster on a GPU), float32 for a model saved in float32."
                + (f" {note}" if note else ""),
        "choices": MODEL_DTYPES,
    })


def allow_tf32_field() -> Any:
    """The `allow_tf32` option of every step that encodes with an SAE-V (see [`sae_matmul_precision`])."""
    return field(default=True, metadata={
        "help": "Let a float32 SAE-V's matmuls use TF32 on a GPU that has it (Ampere and newer), only while it "
                "encodes (torch.set_float32_matmul_precision('high'), the previous setting restored afterwards): "
                "tensor-core speed, with products rounded to TF32's 10-bit mantissa (sums stay float32). No effect on "
                "the CPU or on a bf16 SAE-V. False keeps full float32 precision."
    })


@contextlib.contextmanager
def sae_matmul_precision(device: torch.device | str, allow_tf32: bool = True):
    """
    Within the block, float32 matmuls may use TF32 when `device` is a CUDA device and `allow_tf32` (what an SAE-V
    encode runs under); PyTorch's global setting (`torch.get_float32_matmul_precision()`) comes back afterwards.
    A no-op on other devices, where TF32 does not exist.
    """
    if not allow_tf32 or torch.device(device).type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_local_path(name_or_path: str | os.PathLike, what: str) -> None:
    """
    Refuse a local path that does not exist with a clear error, instead of the Hub lookup's "Couldn't reach ... on the
    Hub" that a missing folder would otherwise give. A name is a local path when it is a `PathLike`, starts with
    `.`, `/` or `~`, or has more than one `/` (a Hub repo id is `name` or `owner/name`).
    """
    text = os.fspath(name_or_path)
    local = (isinstance(name_or_path, os.PathLike) or text.startswith((".", "/", "~", "\\")) or text.count("/") > 1
             or os.path.isabs(text))
    if local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"The {what} folder {text!r} does not exist (looked for {os.path.abspath(os.path.expanduser(text))}). "
            f"Check the path; a Hub repo id has the form 'name' or 'owner/name'."
        )


def choose_device(device: str | torch.device | None = "auto", use_cpu: bool = False,
                  rank: int | None = None) -> torch.device:
    """
    The device a step runs on: the one way saev-hf picks it.

    `device="auto"` (or None) is accelerate's choice: the device of this process when accelerate's state is set up (an
    `Accelerator`, a launcher), otherwise the machine's accelerator as accelerate ranks them (`PartialState.
    default_device`: CUDA, XPU, MPS, NPU, ...), else the CPU. `use_cpu` forces the CPU; any other `device` is taken as
    given. With `rank` (a `datasets.map(with_rank=True)` worker), an accelerator's device number is `rank` modulo
    the number of devices, one per worker.

    The state is read, never set up here: which backend a distributed run uses stays the launcher's and
    `Accelerator`'s decision (set up too early, it would run `torchrun` processes as separate jobs).
    """
    if use_cpu:
        return torch.device("cpu")
    if device not in (None, "auto"):
        return torch.device(device)
    from accelerate import PartialState

    state = PartialState.__new__(PartialState)  # a view of accelerate's shared state that does not initialise it
    state.__dict__ = PartialState._shared_state
    chosen = torch.device(state.device if state.initialized else state.default_device)
    if rank is not None and chosen.type != "cpu":
        chosen = torch.device(chosen.type, rank % getattr(torch, chosen.type).device_count())
    return chosen


def accelerator_available() -> bool:
    """Whether [`choose_device`] finds an accelerator (GPU, MPS, ...) on this machine."""
    return choose_device().type != "cpu"


def load_model_and_processor(
    name_or_path: str, revision: str | None = None, dtype: str = "auto", device: torch.device | str | None = None,
    device_map: str | dict | None = None,
):
    """
    Load a base model for reading: an image-text-to-text model with its processor, or a causal LM with its tokenizer.

    The model is chosen by its config: architectures that `AutoModelForImageTextToText` knows load with it and
    `AutoProcessor`; every other model loads with `AutoModelForCausalLM` and `AutoTokenizer`. The model is put in
    eval mode.

    Args:
        dtype (`str`): one of [`MODEL_DTYPES`]; 'auto' (the default, as transformers') is the checkpoint's own dtype.
        device (*optional*): the device the whole model is moved to after loading (None: where it loaded, the CPU).
        device_map (*optional*): passed to `from_pretrained(device_map=...)` ('auto' spreads a large model over the
            GPUs, 'cuda:0', 'cpu', or a dict); the model is then placed while it loads. Give `device` or
            `device_map`, not both.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    check_local_path(name_or_path, "model")
    check_model_dtype(dtype, "dtype")
    if device is not None and device_map is not None:
        raise ValueError(f"Give either device={str(device)!r} (the whole model, moved after loading) or "
                         f"device_map={device_map!r} (placed while loading), not both.")
    placement = {} if device_map is None else {"device_map": device_map}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype,
                                                            **placement)
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        check_multimodal_processor(processor, name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=torch_dtype, **placement)
        processor = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if device is not None:
        model.to(device)
    return model.eval(), processor


def check_multimodal_processor(processor, name_or_path: str) -> None:
    """
    Refuse a tokenizer where an image-text model's processor was expected. `AutoProcessor` falls back to the tokenizer,
    without a word, when `processor_config.json` names a processor class it does not know (a subclass defined in user
    code and not registered in this process); the images would then never reach the model.
    """
    if hasattr(processor, "image_processor"):
        return
    raise ValueError(
        f"AutoProcessor loaded a {type(processor).__name__} (a tokenizer, with no image processor) from "
        f"{name_or_path!r}, whose model reads images: its processor class is not known to transformers in this "
        f"process. "
        f"Register it first (AutoProcessor.register(<config class>, <processor class>)); the tiny Qwen2-VL and "
        f"Chameleon folders of saev_hf.demo need saev_hf.demo.tiny_processing.register_tiny_processors()."
    )


def load_dataset_split(name_or_path: str, config: str | None = None, split: str = "train", streaming: bool = False):
    """
    One split of a dataset: a folder written by `save_to_disk` (a `Dataset` or a `DatasetDict`), or anything
    `datasets.load_dataset` reads (a Hub name, a folder of data files, ...).

    A folder holding one `Dataset` has no splits to choose from: it is read whole with the default `split="train"`
    (or the split it was saved from); any other split is refused rather than ignored.
    """
    import datasets

    check_local_path(name_or_path, "dataset")
    path = Path(name_or_path)
    if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"Split {split!r} not found in {name_or_path}; it has splits {sorted(data)}.")
            data = data[split]
        elif split not in ("train", str(data.split) if data.split is not None else "train"):
            saved = f"the {str(data.split)!r} split" if data.split is not None else "no split name"
            raise ValueError(
                f"{name_or_path} holds a single Dataset ({saved}, {len(data)} rows), not a DatasetDict, so split "
                f"{split!r} cannot be chosen from it. Drop the split option to use its rows, or save the splits as a "
                f"DatasetDict (DatasetDict({{{split!r}: ...}}).save_to_disk(...))."
            )
        return data.to_iterable_dataset() if streaming else data
    return datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)


@contextlib.contextmanager
def library_progress_bars(disable: bool):
    """
    Within the block, the progress bars that `datasets` (map, save_to_disk), `transformers` (loading and saving
    weights) and `huggingface_hub` (uploads, downloads) draw themselves are hidden when `disable`; each library's
    previous setting comes back afterwards. With saev-hf's own bars (`disable_tqdm` of each step), this is what
    `--disable_tqdm` silences.
    """
    if not disable:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    switches = [  # (was it enabled, disable, enable)
        (not datasets.are_progress_bars_disabled(), datasets.disable_progress_bars, datasets.enable_progress_bars),
        (transformers_logging.is_progress_bar_enabled(), transformers_logging.disable_progress_bar,
         transformers_logging.enable_progress_bar),
        (not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars, hub_utils.enable_progress_bars),
    ]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for was_enabled, _, on in switches:
            if was_enabled:
                on()
