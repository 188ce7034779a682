"""DPO on scene preference rows and what it does to the model: held-out accuracy and hallucination rate."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .grounded_llava import answer_accuracy

PREFERENCE_COLUMNS = ("images", "prompt", "chosen", "rejected")


@dataclass
class SceneDPOArguments:
    """The DPO set-up of the miniature (the same for every subset it compares)."""

    steps: int = field(default=150, metadata={"help": "DPO steps for every subset."})
    batch_size: int = field(default=8, metadata={"help": "Preference rows per step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Constant learning rate (full fine-tuning)."})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of TRL's 'sft' loss (the chosen answer's "
                                                     "likelihood) added to DPO's sigmoid loss, as in RPO; 0 is plain "
                                                     "DPO."})
    lora: bool = field(default=False, metadata={"help": "LoRA on the language model's projections instead of full "
                                                "fine-tuning."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order."})


def dpo_and_evaluate(model, processor, rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
                     args: SceneDPOArguments, output_dir: str | Path, progress: bool = False,
                     return_model: bool = False) -> dict[str, Any]:
    """DPO of a copy of `model` (left unchanged) on preference `rows` (see [`preference_rows`]), then its
    [`answer_accuracy`] on `eval_rows`: ``{"accuracy", "hallucination_rate", "by_kind", "rows", "final_loss"}``
    (with `return_model`, also ``"model"``: the trained copy)."""
    import datasets

    from ..alignment.dpo import paper_dpo_config, train_dpo

    policy = copy.deepcopy(model)
    dataset = datasets.Dataset.from_list([{key: row[key] for key in PREFERENCE_COLUMNS} for row in rows])
    config = paper_dpo_config(
        str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_steps=0,
        lr_scheduler_type="constant", beta=args.beta, max_length=64,
        **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, args.sft_weight]} if args.sft_weight else {}), logging_steps=max(1, args.steps // 5),
        save_strategy="no", seed=args.seed, report_to="none", disable_tqdm=not progress)
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        trainer = train_dpo(policy, processor, dataset, config, lora=args.lora)
    finally:
        logging.getLogger("transformers").setLevel(level)
    trained = trainer.model.merge_and_unload() if args.lora else trainer.model
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    result = {**answer_accuracy(trained, processor, eval_rows), "final_loss": losses[-1] if losses else None,
              "train_rows": len(rows)}
    return {**result, "model": trained} if return_model else result
