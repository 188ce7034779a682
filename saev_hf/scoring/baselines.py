"""The scores SAE-V's filter is compared with, computed beside SAE-V's by [`SAEVScorer`] (`scores=[...]`, `saev score
--scores ...`), each higher-is-keep like SAE-V's, so that [`filter_by_score`] and `saev filter` take any of them.

| score | what it is | source followed |
|---|---|---|
| `length` | the number of text positions (not image, not padding) of the input SAE-V scores: the prompt, plus the response when `response_column` is set (special positions count as text unless `special_as_text=False`, as for SAE-V) | the control any count-type score must beat (SAE activity counts track text length) |
| `answer_log_likelihood` | the MLLM's summed log-probability of the response's tokens given the image and the prompt | a model-based quality score without an SAE |
| `ifd` | instruction-following difficulty: s(A given image and Q) / s(A alone), each the mean cross-entropy of the response's tokens | Li et al. 2023 (Cherry LLM, "From Quantity to Quality"): their `data_analysis.py` computes the token losses of the output after the prompt template and after the template's bare response header (`### Response:`), and `data_by_IFD.py` takes the ratio of their means (conditional over alone), drops rows above 1 and keeps the highest. Adapted to images as SAE-V's paper does (Figure 11): the condition is the image and the question in the chat template; A alone is the response after the template's empty user turn (the analogue of the bare response header) |
| `image_text_similarity` | the MLLM's own image-text similarity: for each token of the prompt text, its input embedding's best cosine over the image positions of what the first decoder layer reads (the projected image features), averaged over the prompt's tokens | the model-internal analogue of a CLIP score (saev-hf's miniature) |
| `clip_score` | the cosine similarity of a CLIP or SigLIP model's image and text embeddings of the row's image(s) and prompt text, averaged over the row's images; the text is cut to the model's longest text input (77 tokens for CLIP, 64 for SigLIP), as DataComp's and Data-Juicer's CLIP filters do (tokenizer truncation) | DataComp's CLIP-score filter; Data-Juicer's `image_text_similarity_filter` (average over a row's images) |

IFD is lower for a response the question helps predict; Li et al. leave out rows above 1 (the question does not help)
and keep those of *highest* IFD among the rest: `saev filter --column ifd --exclude_above 1 --fraction F`. Their "cherry" model is the base model tuned
briefly on a small sample of the data first (`saev dpo --method sft` on a sample, then `--ifd_model_name_or_path`); by
default IFD is computed with the scorer's MLLM.

The MLLM-based scores share the scorer's forward with SAE-V's: with a response-reading score (`answer_log_likelihood`,
`ifd`) the one forward runs on prompt and response to the end (a causal model's states at the prompt's positions are
those of the prompt alone, so SAE-V reads them there), otherwise it stops at the deepest layer asked for. IFD's "A
alone" needs its own (short, text-only) forward, and CLIP its own model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

from ..data.errors import RowError
from ..data.prompts import (
    PromptFormat,
    build_messages,
    format_text,
    is_document,
    is_formatted_prompt,
    row_indices,
    rows_to_columns,
    template_writes_bos,
)

SAEV_SCORES = ("cosine", "l0", "cooccur_l0")
"""The paper's three SAE-V scores (the scorer's default)."""
SAEV_OPTIONAL_SCORES = ("cooccur_jaccard", "polarity_jaccard")
"""SAE-V scores beyond the paper, computed only when asked for (column ``saev_<name>``; see `scoring.activity`):
``cooccur_jaccard`` = |C(x)| / |features above delta on the text or the image|; ``polarity_jaccard`` = that score minus
``polarity_threshold`` when the chosen response affirms, the opposite when it denies (``denial_pattern``)."""
BASELINES = ("length", "answer_log_likelihood", "ifd", "image_text_similarity", "clip_score")
"""The baseline scores [`SAEVScorer`] computes beside SAE-V's (their column is their name)."""
RESPONSE_BASELINES = ("answer_log_likelihood", "ifd")
"""Baselines that read the response (`response_column`, else `baseline_response_column`)."""


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _token_ids(processor: Any, texts: Sequence[str], row_ids: Sequence[int]) -> list[list[int]]:
    """Token ids of rendered texts, with BOS added exactly as [`prepare_inputs`] adds it."""
    add_special = not template_writes_bos(processor, texts, row_ids)
    return [_tokenizer(processor)(text, add_special_tokens=add_special)["input_ids"] for text in texts]


def _rendered(processor: Any, prompt: Any, response: Any, num_images: int, row: int) -> tuple[str, str]:
    """A row's text with its response and without it (the prompt with the generation prompt), as the scorer renders
    them."""
    image_token = getattr(processor, "image_token", None)
    if is_formatted_prompt(prompt, image_token):
        if not isinstance(response, str):
            raise RowError(f"Row {row}: the prompt is formatted text but the response is {type(response).__name__}.")
        return prompt + response, prompt
    with_response = format_text(processor, build_messages(prompt, response, num_images, row), image_token, True)
    alone = format_text(processor, build_messages(prompt, None, num_images, row), image_token, False)
    return with_response, alone


def response_token_counts(processor: Any, rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
                          prompt_format: PromptFormat, response_column: str,
                          first_row: int | Sequence[int] = 0) -> list[int]:
    """
    How many of each row's input tokens are its response (the last ones): the tokens of the text rendered with the
    response (`response_column`) past those of the prompt rendered alone with the generation prompt. The image
    placeholders are expanded by the processor inside the prompt, so the count holds for the processed input too.

    Raises:
        RowError: naming the row, when it has no response or the chat template does not render the prompt alone as
            the start of the conversation with the response (its response tokens cannot be told apart).
    """
    columns = rows_to_columns(rows)
    prompts = columns[prompt_format.prompt_column]
    if response_column not in columns:
        raise KeyError(f"Column {response_column!r} (the response the answer-based scores read) not found; the data "
                       f"has columns {sorted(columns)}. Pass baseline_response_column (--baseline_response_column).")
    responses = columns[response_column]
    image_values = columns.get(prompt_format.image_column) if prompt_format.image_column else None
    row_ids = row_indices(first_row, len(prompts))
    full, alone = [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if response is None or is_document(prompt):
            raise RowError(f"Row {row_ids[i]} has no response in column {response_column!r} to score"
                           f"{' (a document has none)' if response is not None else ''}.")
        value = image_values[i] if image_values is not None else None
        count = len(value) if isinstance(value, (list, tuple)) else int(value is not None)
        with_response, prompt_alone = _rendered(processor, prompt, response, count, row_ids[i])
        full.append(with_response)
        alone.append(prompt_alone)
    counts = []
    for row, whole, start in zip(row_ids, _token_ids(processor, full, row_ids), _token_ids(processor, alone, row_ids)):
        if whole[: len(start)] != start or len(whole) == len(start):
            raise RowError(f"Row {row}: the chat template does not render the prompt alone as the start of the "
                           f"conversation with its response, so the response's tokens cannot be found.")
        counts.append(len(whole) - len(start))
    return counts


def answer_alone_inputs(processor: Any, responses: Sequence[Any], row_ids: Sequence[int]) -> tuple[Any, list[int]]:
    """IFD's "A alone": each response after the chat template's empty user turn (no image, no question), as right-
    padded text inputs, and how many of each one's tokens are the response."""
    texts, counts = [], []
    rendered = [_rendered(processor, "", response, 0, row) for response, row in zip(responses, row_ids)]
    wholes = _token_ids(processor, [whole for whole, _ in rendered], row_ids)
    starts = _token_ids(processor, [start for _, start in rendered], row_ids)
    for row, (whole_text, _), whole, start in zip(row_ids, rendered, wholes, starts):
        if whole[: len(start)] != start or len(whole) == len(start):
            raise RowError(f"Row {row}: the chat template does not render an empty user turn as the start of the "
                           f"conversation with the response alone.")
        texts.append(whole_text)
        counts.append(len(whole) - len(start))
    tokenizer = _tokenizer(processor)
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                       add_special_tokens=not template_writes_bos(processor, texts, row_ids))
    return inputs, counts


def response_log_likelihoods(logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int],
                             counts: Sequence[int]) -> tuple[list[float], list[int]]:
    """For each row: the summed log-probability of its response tokens (its last `counts[i]` of `lengths[i]` real
    tokens) under `logits`, and how many there are."""
    sums, numbers = [], []
    for i, (length, count) in enumerate(zip(lengths, counts)):
        start = length - count
        if count <= 0 or start <= 0:
            raise ValueError(f"Row {i}: {count} response tokens of {length}: nothing to score.")
        log_probs = torch.log_softmax(logits[i, start - 1 : length - 1].float(), dim=-1)
        targets = input_ids[i, start:length].to(log_probs.device)
        sums.append(float(log_probs.gather(1, targets[:, None]).double().sum()))
        numbers.append(count)
    return sums, numbers


def ifd_score(conditional: float, conditional_tokens: int, alone: float, alone_tokens: int) -> float:
    """s(A|Q) / s(A) from summed log-likelihoods: the mean cross-entropy of the response's tokens given the prompt
    (`conditional` over `conditional_tokens`) over that of the response alone (`alone` over `alone_tokens`)."""
    if alone == 0:
        raise ValueError("The response alone has zero loss: IFD (a ratio of losses) is undefined.")
    return (conditional / conditional_tokens) / (alone / alone_tokens)


def image_text_similarity(embeddings: torch.Tensor, image_mask: torch.Tensor, word_embeddings: torch.Tensor,
                          row: int) -> float:
    """The mean over the prompt's tokens (`word_embeddings`, `(words, d)`) of their best cosine over the image
    positions of `embeddings` (`(tokens, d)`, what the first decoder layer reads; `image_mask` marks them)."""
    if not image_mask.any():
        raise RowError(f"Row {row}: no image position reached the model, so there is no image-text similarity.")
    if len(word_embeddings) == 0:
        raise RowError(f"Row {row}: the prompt has no text token to compare with the image.")
    image = F.normalize(embeddings[image_mask].float(), dim=-1)
    words = F.normalize(word_embeddings.float().to(image.device), dim=-1)
    return float((words @ image.T).max(dim=1).values.mean())


def prompt_text(prompt: Any, row: int) -> str:
    """A prompt's text (its user turns' text parts joined by spaces), for scores that read the question's words."""
    if isinstance(prompt, str):
        return prompt
    if is_document(prompt):
        return " ".join(part.get("text") or "" for part in prompt if part["type"] == "text")
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        pieces = []
        for message in prompt:
            if message["role"] != "user":
                continue
            content = message["content"]
            pieces += [content] if isinstance(content, str) else [
                part.get("text") or "" for part in content if part.get("type", "text") == "text"]
        return " ".join(piece for piece in pieces if piece)
    raise RowError(f"Row {row}: the prompt must be text, a conversation or a document, got {type(prompt).__name__}.")


def response_text(response: Any, row: int) -> str:
    """A response's text: a string as it is, a conversational response (TRL's ``[{"role": "assistant", "content":
    ...}]``) as its assistant turns' text parts joined by spaces."""
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence) and response and all(isinstance(m, Mapping) and "role" in m for m in response):
        pieces = []
        for message in response:
            content = message.get("content") or ""
            pieces += [content] if isinstance(content, str) else [
                part.get("text") or "" for part in content if part.get("type", "text") == "text"]
        return " ".join(piece for piece in pieces if piece)
    raise RowError(f"Row {row}: the response must be text or a conversation (a list of {{'role', 'content'}} "
                   f"messages), got {type(response).__name__}: {response!r:.80}.")


def prompt_word_embeddings(model: Any, processor: Any, prompt: Any, row: int) -> torch.Tensor:
    """The input embeddings of the prompt text's tokens (tokenized alone, without special tokens)."""
    ids = _tokenizer(processor)(prompt_text(prompt, row), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    embedding = model.get_input_embeddings()
    return embedding(ids.to(embedding.weight.device))


class ClipScore:
    """
    `clip_score`: the cosine similarity of a CLIP or SigLIP model's image and text embeddings (any transformers
    checkpoint with `get_image_features` and `get_text_features`: `CLIPModel`, `SiglipModel`, ...), averaged over a
    row's images; the text is cut to the model's longest text input by its tokenizer (CLIP 77 tokens, SigLIP 64, as
    DataComp and Data-Juicer cut it). SigLIP's text is padded to its full length, as it was trained.

    Args:
        model: the dual encoder (eval mode), or its folder / Hub repo.
        processor: its processor (image processor and tokenizer); loaded from `model`'s path when omitted.
    """

    def __init__(self, model: Any, processor: Any = None) -> None:
        if isinstance(model, str):
            processor = processor if processor is not None else AutoProcessor.from_pretrained(model)
            model = AutoModel.from_pretrained(model)
        if processor is None:
            raise ValueError("ClipScore needs the model's processor (or the model's path, to load both).")
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise ValueError(f"{type(model).__name__} has no {method}: clip_score needs a dual encoder such as "
                                 f"CLIPModel or SiglipModel.")
        self.model, self.processor = model.eval(), processor
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))
        self.pad_to_max = getattr(model.config, "model_type", "") in ("siglip", "siglip2")

    @torch.no_grad()
    def __call__(self, images: Sequence[Sequence[Any]], texts: Sequence[str], row_ids: Sequence[int]) -> list[float]:
        """One score per row: `images[i]` (PIL images) against `texts[i]`."""
        flat = [image for row_images in images for image in row_images]
        for row, row_images in zip(row_ids, images):
            if not row_images:
                raise RowError(f"Row {row} has no image: clip_score compares an image with its text.")
        device = next(self.model.parameters()).device
        pixels = self.processor.image_processor(flat, return_tensors="pt")["pixel_values"].to(device)
        text = _tokenizer(self.processor)(list(texts), return_tensors="pt", truncation=True, max_length=self.max_length,
                                          padding="max_length" if self.pad_to_max else True).to(device)
        image_features = _features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        text_features = _features(self.model.get_text_features(**text))
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        scores, start = [], 0
        for i, row_images in enumerate(images):
            block = image_features[start : start + len(row_images)]
            scores.append(float((block @ text_features[i]).mean()))
            start += len(row_images)
        return scores


def _features(output: Any) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` call (a tensor, or an output whose `pooler_output` holds it)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
