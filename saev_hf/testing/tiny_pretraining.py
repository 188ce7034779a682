"""Teaching a tiny MLLM the handwritten digits: the answer-token loss, the digit accuracy, the text-model start and
the training loop the benchmarks and the demo share.

[`response_inputs`] and [`response_log_likelihoods`] are the two measurements every experiment builds on (the
scene demo's accuracy, the benchmarks' DPO and filtering experiments): the inputs with labels on the assistant's
tokens only, and each row's summed answer log-likelihood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .digit_data import DIGIT_CAPTIONS, _format
from .tiny_processing import ROLE_TOKEN_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = ["answer_loss", "digit_accuracy", "load_text_model_weights", "pretrain_tiny_model", "response_inputs",
           "response_log_likelihoods"]


def response_inputs(model, processor, rows: list[dict[str, Any]]):
    """Right-padded inputs for rows with a response, and labels that are -100 except on the assistant's tokens."""
    import torch

    from ..activations.reader import image_token_id_of
    from ..data.prompts import PromptFormat, prepare_inputs

    has_images = bool(rows[0].get("images"))
    if has_images and image_token_id_of(model, processor) is None:
        raise ValueError(f"Rows with images were given to the text-only model {type(model).__name__}: give it rows "
                         f"without an 'images' column (e.g. digit_text_examples).")
    prompt_format = PromptFormat(image_column="images" if has_images else None, response_column="response")
    inputs = prepare_inputs(processor, rows, prompt_format)
    tokenizer = getattr(processor, "tokenizer", processor)
    assistant_id = tokenizer.convert_tokens_to_ids(ROLE_TOKEN_NAMES["assistant_token"])
    input_ids = inputs["input_ids"]
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    # the response starts after the last <|assistant|> marker; its closing <|end|> is learned too
    response_start = torch.where(input_ids == assistant_id, positions, -1).max(dim=1, keepdim=True).values + 1
    if (response_start == 0).any():
        raise ValueError("A row rendered without an <|assistant|> turn: every row needs a 'response'.")
    keep = (positions >= response_start) & (inputs["attention_mask"] == 1)
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, -100))
    return inputs, labels


def response_log_likelihoods(model, processor, rows: list[dict[str, Any]]):
    """Per row: summed log-probability of its response tokens and their count (model in its current mode)."""
    import torch.nn.functional as F

    inputs, labels = response_inputs(model, processor, rows)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (log_probs * mask).sum(1), mask.sum(1)


def _group_by_modality(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows with images and rows without, as separate groups (a batch holds one kind only)."""
    groups = ([row for row in rows if row.get("images")], [row for row in rows if not row.get("images")])
    return [group for group in groups if group]


def answer_loss(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    rows: list[dict[str, Any]],
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy of ``model`` on the answer tokens of ``rows`` (what [`pretrain_tiny_model`] fits).

    ``rows`` are conversations ``{"prompt", "response"}`` plus ``"images"`` for image rows (e.g. from
    [`digit_caption_examples`]); the answer tokens are the response and its closing ``<|end|>``. The model is run as
    it is (call ``model.eval()`` first; forward hooks on it apply, e.g. an SAE spliced into a layer).
    """
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for group in _group_by_modality(rows):
            for start in range(0, len(group), batch_size):
                log_likelihood, tokens = response_log_likelihoods(model, processor, group[start : start + batch_size])
                total -= float(log_likelihood.double().sum())
                count += int(tokens.sum())
    return total / max(count, 1)


def digit_accuracy(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    digits: list[tuple[Image.Image | None, int]],
    batch_size: int = 8,
) -> float:
    """Fraction of ``digits`` the model names correctly, ranking the ten candidate captions by log-likelihood.

    For each ``(image, label)`` the model is asked ``"what digit is this ?"`` with the image (or, when ``image`` is
    None, ``"what number is <label> ?"`` in text: the way to ask a text-only model), and each of the ten captions
    ``"a handwritten digit <name> ."`` (the first of [`DIGIT_CAPTIONS`]) is scored by the summed log-probability of its
    tokens; the prediction is the best-scoring digit. Chance is 10%. ``batch_size`` counts digits (10 rows each).
    """
    import torch

    if not digits:
        raise ValueError("digit_accuracy needs at least one (image, label) pair.")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(digits), batch_size):
            chunk = digits[start : start + batch_size]
            rows = []
            for image, label in chunk:
                if image is not None:
                    row = {"images": [image], "prompt": "what digit is this ?"}
                else:
                    row = {"prompt": f"what number is {label} ?"}
                rows.extend({**row, "response": _format(DIGIT_CAPTIONS[0], candidate)} for candidate in range(10))
            if len({bool(row.get("images")) for row in rows}) > 1:  # mixed chunk: score the two kinds separately
                scores = torch.cat([response_log_likelihoods(model, processor, [r])[0] for r in rows])
            else:
                scores = response_log_likelihoods(model, processor, rows)[0]
            predictions = scores.view(len(chunk), 10).argmax(dim=1)
            correct += sum(int(p) == label for p, (_, label) in zip(predictions.tolist(), chunk))
    model.train(was_training)
    return correct / len(digits)


def load_text_model_weights(model: PreTrainedModel, text_model: PreTrainedModel) -> PreTrainedModel:
    """Initialise the language model of a tiny MLLM from a tiny text-only model, in place, and return the MLLM.

    A real LLaVA starts from a pretrained LLM and learns images on top of it. Doing the same here (train the
    ``"text"`` model on text, copy it into a ``"llava"``, then train that on images) makes the MLLM's language model a
    fine-tuned copy of the text model, so that an SAE trained on one can be evaluated on the other (the paper's
    transfer experiment), and it lets the MLLM learn the images faster. Decoder layers and final norm are copied
    whole; the embedding and ``lm_head`` rows are copied for the text model's token ids, which every tiny tokenizer
    shares (the MLLM's own image tokens come after them and keep their initialisation).

    Works for the tiny architectures whose language model is a Llama decoder: ``"llava"``, ``"llava_next"``,
    ``"idefics3"``.

    Raises:
        ValueError: if the two language models are not of the same type with the same parameters (names, shapes).
    """
    import torch

    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    source = text_model.model.state_dict()
    target = language_model.state_dict() if language_model is not None else {}
    mismatched = sorted(
        name for name in set(source) | set(target)
        if name not in source or name not in target
        or source[name].shape[1:] != target[name].shape[1:] or source[name].shape[0] > target[name].shape[0]
    )
    head, text_head = getattr(model, "lm_head", None), getattr(text_model, "lm_head", None)
    kind, text_kind = model.config.get_text_config().model_type, text_model.config.model_type
    if kind != text_kind:  # e.g. Gemma has Llama's parameter shapes but not its arithmetic
        mismatched.insert(0, f"model_type {kind!r} vs {text_kind!r}")
    if mismatched or head is None or text_head is None or text_head.weight.shape[0] > head.weight.shape[0]:
        raise ValueError(
            f"Cannot copy {type(text_model).__name__} into the language model of {type(model).__name__}: their "
            f"parameters differ ({mismatched[:5] or 'lm_head'}). Use a tiny 'text' model and a tiny 'llava', "
            f"'llava_next' or 'idefics3' built by build_tiny_model."
        )
    with torch.no_grad():
        for name, value in source.items():
            target[name][: value.shape[0]].copy_(value)
        head.weight[: text_head.weight.shape[0]].copy_(text_head.weight)
    return model


def _is_vision_encoder(name: str) -> bool:
    """Whether parameter ``name`` belongs to a vision encoder (not to the projector/merger that feeds the LM)."""
    if any(part in name for part in ("vision_tower.", "vision_model.", "vqmodel.")):
        return True
    return "visual." in name and "merger" not in name


def pretrain_tiny_model(
    model: PreTrainedModel,
    processor: ProcessorMixin | PreTrainedTokenizerFast,
    examples: list[dict[str, Any]],
    *,
    steps: int = 400,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    train_vision_tower: bool = False,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    eval_examples: list[dict[str, Any]] | None = None,
    eval_digits: list[tuple[Image.Image | None, int]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a tiny model (see [`build_tiny_model`]) in place on conversations, with next-token loss on the answers.

    As in LLaVA's recipe the vision encoder stays frozen (``train_vision_tower=False``: on these digits it also learns
    faster that way) and the projector and the language model are trained, with AdamW, a linear warm-up, a cosine
    decay to a tenth of ``learning_rate``, and gradient clipping. The loss is the cross-entropy of the assistant's
    tokens only (the response and its closing ``<|end|>``); the user turn, the image tokens, the template and padding
    are labelled -100. Rows with images and rows without go in separate batches, drawn in a random order, so an MLLM
    can learn from image captions and text-only conversations together; a text-only model (``"text"``) takes rows
    without images only.

    Deterministic given ``seed`` (on one CPU thread: batches, their order and any randomness in the model are seeded;
    the global RNG state is restored afterwards). With the defaults, the tiny LLaVA trained on the
    [`digit_caption_examples`] of 1000 digits (about 25 s on one CPU thread) names about 70% of held-out digits
    correctly ([`digit_accuracy`]; 12% before). Starting its language model from a trained ``"text"`` model
    ([`load_text_model_weights`]) and mixing in [`digit_text_examples`] keeps it able to answer text-only questions;
    ``benchmarks/sae_vs_saev.py`` does that (1000 steps at ``learning_rate=1e-3``: about 85%).

    Example:

    ```python
    >>> from saev_hf.testing.digit_data import digit_caption_examples, digit_images
    >>> from saev_hf.testing.tiny_models import build_tiny_model
    >>> from saev_hf.testing.tiny_pretraining import pretrain_tiny_model
    >>> digits = digit_images(68, seed=0)
    >>> model, processor = build_tiny_model("llava", seed=0)
    >>> summary = pretrain_tiny_model(model, processor, digit_caption_examples(digits[:64]), steps=5, batch_size=8,
    ...                               eval_digits=digits[64:])
    >>> summary["final_loss"] < summary["initial_loss"]
    True

    ```

    Args:
        model: the tiny model to train, in place (left in eval mode).
        processor: its processor (the tokenizer for ``"text"``).
        examples: rows ``{"prompt", "response"}`` plus ``"images"`` (a list of images) for image rows, e.g. from
            [`digit_caption_examples`] and [`digit_text_examples`].
        steps: optimizer steps. batch_size: rows per step.
        learning_rate, weight_decay, max_grad_norm: AdamW's settings and the clipping norm.
        train_vision_tower: train the vision encoder too (its parameters are otherwise left as they are).
        warmup_steps: linear warm-up length; default 5% of ``steps``.
        seed: seeds the batch order.
        eval_examples: rows whose mean answer-token loss is reported before and after training (default: up to 256
            of ``examples``).
        eval_digits: ``(image, label)`` pairs (``image`` None for text-only questions) for [`digit_accuracy`],
            reported before and after training.
        progress: show a tqdm progress bar.

    Returns:
        A dict: ``steps``, ``examples``, ``initial_loss`` and ``final_loss`` (mean cross-entropy per answer token on
        ``eval_examples``), ``train_loss_first`` and ``train_loss_last`` (mean training loss of the first and last 10%
        of steps), ``digit_accuracy_before`` and ``digit_accuracy_after`` (None without ``eval_digits``) and
        ``seconds``.
    """
    import math
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive.")
    if not examples:
        raise ValueError("pretrain_tiny_model needs examples: rows with 'prompt' and 'response' (and 'images').")
    missing = [i for i, row in enumerate(examples) if row.get("prompt") is None or row.get("response") is None]
    if missing:
        raise ValueError(f"Rows {missing[:5]} lack a 'prompt' or a 'response'; every training row needs both.")
    started = time.perf_counter()
    groups = _group_by_modality(list(examples))
    if eval_examples is None:
        rng = np.random.default_rng(seed)
        eval_examples = [examples[i] for i in sorted(rng.permutation(len(examples))[:256].tolist())]
    warmup = max(1, round(0.05 * steps)) if warmup_steps is None else warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    # batches: each group is shuffled per epoch and cut into batches; the batches of all groups interleave randomly
    rng = np.random.default_rng(seed)

    def batches():
        while True:
            epoch = []
            for group in groups:
                order = rng.permutation(len(group))
                epoch += [[group[i] for i in order[s : s + batch_size]] for s in range(0, len(group), batch_size)]
            for index in rng.permutation(len(epoch)):
                yield epoch[index]

    initial_loss = answer_loss(model, processor, eval_examples, batch_size)
    accuracy_before = digit_accuracy(model, processor, eval_digits) if eval_digits else None
    parameters = [p for n, p in model.named_parameters()
                  if p.requires_grad and (train_vision_tower or not _is_vision_encoder(n))]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not train_vision_tower
              and _is_vision_encoder(n)]
    model.train()
    try:
        for p in frozen:  # no gradient is computed for the frozen encoder at all
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stream = batches()
            for _ in tqdm(range(steps), desc="Pretraining tiny model", unit="step", disable=not progress):
                inputs, labels = response_inputs(model, processor, next(stream))
                logits = model(**inputs, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    tenth = max(1, steps // 10)
    return {
        "steps": steps,
        "examples": len(examples),
        "initial_loss": initial_loss,
        "final_loss": answer_loss(model, processor, eval_examples, batch_size),
        "train_loss_first": float(np.mean(losses[:tenth])),
        "train_loss_last": float(np.mean(losses[-tenth:])),
        "digit_accuracy_before": accuracy_before,
        "digit_accuracy_after": digit_accuracy(model, processor, eval_digits) if eval_digits else None,
        "seconds": time.perf_counter() - started,
    }
