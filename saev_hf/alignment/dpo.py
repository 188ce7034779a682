"""The recipe after filtering: DPO (or SFT) of the same MLLM on the kept rows, with TRL, full or LoRA.

The paper (SAE-V, ICML 2025, section 5) keeps the top part of a preference dataset by an SAE-V score and fine-tunes
the MLLM on it with DPO; its hyper-parameters are the defaults of [`PaperDPOConfig`] / [`PaperSFTConfig`]:
max length 4096, per-device batch 8, gradient accumulation 4, cosine schedule, learning rate 1e-6, 10 warm-up steps,
3 epochs, bf16. Without a GPU the configs switch to the CPU (``use_cpu=True``, ``bf16=False``, no gradient
checkpointing) so the same recipe runs on a laptop with a tiny model.

Python:

```python
from saev_hf.alignment.dpo import paper_dpo_config, train_dpo

kept = filter_by_score(scored, FilterArguments(column="saev_cosine_score", fraction=0.5))
trainer = train_dpo(model, processor, kept, paper_dpo_config("dpo-out"), lora=True)
```

Command line (the same dataclasses): ``saev dpo --model_name_or_path M --dataset_name KEPT --output_dir OUT --lora``
(any `DPOConfig` option, e.g. ``--max_steps 100``; ``--method sft`` trains on the chosen answers with SFT).

The dataset is the one the scorer read and `filter_by_score` kept: ``images``, ``prompt``, ``chosen``, ``rejected``
with the prompt in any layout the scorer takes (plain text beside the images, conversational, or TRL's plain format
with image tokens already in it). [`trl_dataset`] converts it the way the scorer does (`prompts.build_messages`), so
that TRL's trainers get the same example the SAE-V scored; other columns (the scores) are dropped before training.
TRL is imported by this module only, so ``import saev_hf`` stays light.
"""

import copy
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import datasets
import torch.nn as nn
from peft import LoraConfig
from trl import DPOConfig, SFTConfig

from ..activations.reader import find_decoder_layers
from ..arguments import DataArguments, ModelArguments
from ..data.images import load_image
from ..data.prompts import conversational_example, format_text
from ..runtime.devices import accelerator_available
from ..runtime.progress import library_progress_bars

# The paper's DPO/SFT hyper-parameters (docs/method.md, section 3)
PAPER_HYPERPARAMETERS: dict[str, Any] = {
    "max_length": 4096,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "lr_scheduler_type": "cosine",
    "learning_rate": 1e-6,
    "warmup_steps": 10,
    "num_train_epochs": 3.0,
    "bf16": True,
}
# Projections of a language-model decoder layer (Llama / Mistral / Qwen naming) that LoRA adapts
LANGUAGE_MODEL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")


def _cpu_fallback(config) -> None:
    """Without a GPU: train on the CPU in float32 (TRL defaults to bf16 and fails on a CPU without `use_cpu`)."""

    if not accelerator_available():
        config.use_cpu = True
        config.bf16 = False
        config.gradient_checkpointing = False
        config.activation_checkpointing = False


def _paper_field(name: str) -> Any:
    """A dataclass field defaulting to the paper's value of `name`."""
    value = PAPER_HYPERPARAMETERS[name]
    return field(default=value, metadata={"help": f"The paper's value: {value}."})


@dataclass
class _PaperDefaults:
    """The paper's hyper-parameters as defaults. Listed before TRL's config in the bases, so that its fields override
    TRL's defaults (keeping their places) and its `__post_init__` applies the CPU fallback before TRL's runs."""

    max_length: int | None = _paper_field("max_length")
    per_device_train_batch_size: int = _paper_field("per_device_train_batch_size")
    gradient_accumulation_steps: int = _paper_field("gradient_accumulation_steps")
    lr_scheduler_type: str = _paper_field("lr_scheduler_type")
    learning_rate: float = _paper_field("learning_rate")
    warmup_steps: float = _paper_field("warmup_steps")
    num_train_epochs: float = _paper_field("num_train_epochs")
    bf16: bool | None = _paper_field("bf16")

    def __post_init__(self) -> None:
        _cpu_fallback(self)
        super().__post_init__()


@dataclass
class PaperDPOConfig(_PaperDefaults, DPOConfig):
    """
    TRL's `DPOConfig` with the SAE-V paper's defaults, for DPO on an SAE-V-filtered preference dataset.

    Paper hyper-parameters (defaults): `max_length=4096`, `per_device_train_batch_size=8`,
    `gradient_accumulation_steps=4`, `lr_scheduler_type="cosine"`, `learning_rate=1e-6`, `warmup_steps=10`,
    `num_train_epochs=3`, `bf16=True`.

    Devices: without a GPU, `use_cpu=True`, `bf16=False` and gradient checkpointing off are set for you.
    """


@dataclass
class PaperSFTConfig(_PaperDefaults, SFTConfig):
    """TRL's `SFTConfig` with the SAE-V paper's defaults (the same as [`PaperDPOConfig`]); CPU fallback alike."""


def paper_dpo_config(output_dir: str, **overrides: Any) -> PaperDPOConfig:
    """A `DPOConfig` with the paper's hyper-parameters, CPU settings when there is no GPU, and `overrides` on top."""
    return PaperDPOConfig(output_dir=output_dir, **overrides)


def paper_sft_config(output_dir: str, **overrides: Any) -> PaperSFTConfig:
    """An `SFTConfig` with the paper's hyper-parameters, CPU settings when there is no GPU, and `overrides` on top."""
    return PaperSFTConfig(output_dir=output_dir, **overrides)


def language_model_target_modules(model, projections: tuple[str, ...] = LANGUAGE_MODEL_PROJECTIONS,
                                  layers: Any = None) -> list[str]:
    """
    Full names of the language model's projections (`projections`) in every decoder layer of `model`.

    The decoder layers are found with [`~saev_hf.activations.find_decoder_layers`], so the vision tower and the
    projector are never included (LoRA with `target_modules="all-linear"` would wrap them too).
    """

    decoder = find_decoder_layers(model, layers)
    layer_ids = {id(layer) for layer in decoder}
    prefixes = [name + "." for name, module in model.named_modules() if id(module) in layer_ids]
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in projections
        and any(name.startswith(prefix) for prefix in prefixes)
    ]
    if not names:
        raise ValueError(f"No {list(projections)} modules in the decoder layers of {type(model).__name__}; pass "
                         "`projections=` with the names of its language model's linear layers.")
    return names


def lora_config(model, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs: Any):
    """A PEFT `LoraConfig` adapting only the language model's projections of `model` (no vision tower)."""

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=language_model_target_modules(model), task_type="CAUSAL_LM", **kwargs)


def _images_need_conversion(feature: Any) -> bool:
    """Whether an `images` column must be rewritten for TRL, which wants a list of PIL images per row: a list of
    `datasets.Image` values decodes to that already; a single image, paths or bytes do not."""

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    return not (isinstance(feature, (list, datasets.List)) and isinstance(inner, datasets.Image))


def _trl_example(example: dict[str, Any], index: int, responses: tuple[str, ...], image_token: str | None,
                 convert_images: bool) -> dict[str, Any]:
    values = example.get("images")
    values = list(values) if isinstance(values, (list, tuple)) else ([] if values is None else [values])
    prompt, converted = conversational_example(example["prompt"], {name: example[name] for name in responses},
                                               len(values), image_token, index)
    out = {"prompt": prompt, **converted}
    if convert_images:
        out["images"] = [load_image(value, index) for value in values]
    return out


def trl_dataset(dataset, processor, responses: tuple[str, ...] = ("chosen", "rejected")):
    """
    `dataset` in the layout TRL's trainers read: `images` (a list of images per row), `prompt` and the `responses`
    columns, converted as the scorer converts a row (see [`~saev_hf.data.prompts.conversational_example`]), every other
    column dropped.

    So the dataset the scorer read, and what `filter_by_score` kept of it, trains as it is: a plain-text prompt beside
    an `images` column (TRL would find no image token in it) becomes a user turn with the image placeholders, and the
    responses become assistant turns. Conversational prompts, TRL's plain format with image tokens in the prompt,
    and text-only data are passed through with their placeholders checked.

    Args:
        dataset (`datasets.Dataset`): rows with `prompt`, the `responses` columns and, for an MLLM, `images`.
        processor: the model's processor (its `image_token` tells an already formatted prompt) or tokenizer.
        responses: the response columns (`("chosen", "rejected")` for DPO, `("completion",)` for SFT).
    """

    needed = ("prompt", *responses)
    missing = [name for name in needed if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Training needs the columns {', '.join(needed)} (and images for an MLLM); missing {missing} in "
            f"{dataset.column_names}. Rename the dataset's columns to these names (Dataset.rename_column)."
        )
    keep = [name for name in ("images", *needed) if name in dataset.column_names]
    dataset = dataset.select_columns(keep)  # score columns, and any `label` column TRL would read as KTO, go
    convert_images = "images" in keep and _images_need_conversion(dataset.features["images"])
    # Only names go into fn_kwargs (not the processor), so that datasets fingerprints the map cheaply and stably.
    converted = dataset.map(
        _trl_example, with_indices=True, desc="Preparing rows for TRL",
        fn_kwargs={"responses": tuple(responses), "image_token": getattr(processor, "image_token", None),
                   "convert_images": convert_images},
        remove_columns=["images"] if convert_images else None,
    )
    if convert_images:  # the rewritten column is stored as encoded images: make it decode to PIL images again
        converted = converted.cast_column("images", datasets.List(datasets.Image()))
    return converted


def _preference_rows(dataset, processor):
    """The TRL preference rows of `dataset`, converted as the scorer reads them (score columns dropped)."""
    return trl_dataset(dataset, processor, ("chosen", "rejected"))


def _sft_rows(dataset, processor):
    """Prompt-completion rows for SFT: the `completion` column, or a preference dataset's `chosen` answers."""
    if "completion" not in dataset.column_names:
        if "chosen" not in dataset.column_names:
            raise ValueError(f"SFT needs prompt + completion (or chosen) columns; got {dataset.column_names}.")
        dataset = dataset.rename_column("chosen", "completion")
    return trl_dataset(dataset, processor, ("completion",))


def check_bos_for_trl(processor) -> bool:
    """
    Warn when TRL would train on other tokens than the model reads: TRL tokenizes the chat template's text without
    adding special tokens, so a tokenizer that puts a BOS token first on its own (LLaVA-1.5's Llama tokenizer) under
    a template that does not write it loses that BOS in DPO and SFT, while the scorer, the processor and generation
    keep it. Returns whether TRL's tokens match (True also when the tokenizer has no BOS to add).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return True
    rendered = format_text(processor, [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                           getattr(processor, "image_token", None), has_response=False)
    if rendered.startswith(bos):
        return True
    warnings.warn(
        f"TRL will train without the BOS token {bos!r}: its trainers tokenize the chat template's text without adding "
        f"special tokens, and this template does not write {bos!r} while the tokenizer (and so the scorer and the "
        f"model's processor) puts it first. The model would learn on sequences it never reads. Make the template write "
        f"it: processor.chat_template = '{{{{ bos_token }}}}' + processor.chat_template (and the same for "
        f"processor.tokenizer.chat_template if it has one).", stacklevel=3)
    return False


def _peft(model, peft_config, lora: bool):
    if peft_config is None and lora:
        peft_config = lora_config(model)
    return peft_config


def train_dpo(model, processor, dataset, args: DPOConfig | None = None, *, lora: bool = False, peft_config=None,
              ref_model=None, output_dir: str = "saev-dpo"):
    """
    DPO-train `model` (in place; or a LoRA adapter on it) on the preference rows of `dataset` with TRL's DPOTrainer.

    Args:
        model: the MLLM (the same one the SAE-V read to score the data).
        processor: its processor.
        dataset: a `datasets.Dataset` with `images`, `prompt`, `chosen`, `rejected`, the prompt in any layout the
            scorer reads (converted by [`trl_dataset`]); score columns are dropped.
        args: a `DPOConfig`; default [`paper_dpo_config`]`(output_dir)` (the paper's hyper-parameters).
        lora: adapt only the language model's projections with LoRA ([`lora_config`]) instead of full fine-tuning.
        peft_config: a PEFT config of your own (overrides `lora`).
        ref_model: the reference model (default: a frozen copy of `model` as passed, or the adapter-free model
            with LoRA).

    Returns:
        The `DPOTrainer` after training (`trainer.model` is the trained model, `trainer.state.log_history` its logs).
    """
    from trl import DPOTrainer

    check_bos_for_trl(processor)
    peft_config = _peft(model, peft_config, lora)
    if ref_model is None and peft_config is None:
        # TRL would reload the reference from the model's path, losing in-memory weights: use a frozen copy instead
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    args = args or paper_dpo_config(output_dir)
    with library_progress_bars(disable=args.disable_tqdm):  # one switch for the Trainer's bar and the data preparation
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=_preference_rows(dataset, processor), processing_class=processor,
                             peft_config=peft_config)
        trainer.train()
    return trainer


def train_sft(model, processor, dataset, args: SFTConfig | None = None, *, lora: bool = False, peft_config=None,
              output_dir: str = "saev-sft"):
    """SFT-train `model` on `dataset` (prompt + completion, or a preference dataset's chosen answers) with TRL."""
    from trl import SFTTrainer

    check_bos_for_trl(processor)
    args = args or paper_sft_config(output_dir)
    with library_progress_bars(disable=args.disable_tqdm):
        trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_rows(dataset, processor),
                             processing_class=processor, peft_config=_peft(model, peft_config, lora))
        trainer.train()
    return trainer


@dataclass
class DPOScriptArguments:
    """How `saev dpo` trains (the MLLM and the filtered dataset are [`ModelArguments`] and [`DataArguments`]): DPO or
    SFT, full or LoRA."""

    method: str = field(default="dpo", metadata={"help": "'dpo' (chosen vs rejected) or 'sft' (chosen answers).",
                                                 "choices": ("dpo", "sft")})
    lora: bool = field(default=False, metadata={"help": "LoRA on the language model's projections only."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "sft"):
            raise ValueError(f"--method {self.method!r} must be 'dpo' or 'sft'.")


# options carried over from the parsed DPO config when `--method sft`
_SHARED_FIELDS = ("output_dir", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "learning_rate", "warmup_steps", "num_train_epochs", "max_steps", "bf16", "use_cpu",
                  "logging_steps", "save_strategy", "seed", "report_to", "disable_tqdm")


def run_dpo(model_args: ModelArguments, data_args: DataArguments, script: DPOScriptArguments, args: DPOConfig) -> Any:
    """`saev dpo`: load the MLLM and the dataset, train as `args` say, save to `args.output_dir`.

    The model's weights train in float32 unless `model_args.model_dtype` names another dtype (mixed precision is the
    config's `bf16`); `model_args.device="cpu"` trains on the CPU (the config's `use_cpu`); the Trainer places the
    model otherwise, so a named device or a `device_map` is refused."""
    if model_args.device_map is not None or model_args.device not in ("auto", "cpu"):
        raise ValueError(f"`saev dpo` trains where the Trainer puts the model: device={model_args.device!r} and "
                         f"device_map={model_args.device_map!r} cannot be honoured. Use --device cpu (or --use_cpu) "
                         f"for the CPU, CUDA_VISIBLE_DEVICES for a GPU, accelerate launch for several.")
    if model_args.device == "cpu":
        args.use_cpu = True
    dtype = "float32" if model_args.model_dtype == "auto" else model_args.model_dtype
    model, processor = replace(model_args, model_dtype=dtype, device="cpu" if args.use_cpu else "auto").load()
    dataset = data_args.load()
    peft_config = lora_config(model, r=script.lora_r, lora_alpha=script.lora_alpha) if script.lora else None
    if script.method == "sft":
        sft_args = PaperSFTConfig(**{name: getattr(args, name) for name in _SHARED_FIELDS})
        trainer = train_sft(model, processor, dataset, sft_args, peft_config=peft_config)
    else:
        trainer = train_dpo(model, processor, dataset, args, peft_config=peft_config)
    trainer.save_model(args.output_dir)
    processor.save_pretrained(args.output_dir)
    data_args.write_fetch_report(args.output_dir)
    return trainer
