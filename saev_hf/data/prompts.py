"""From dataset rows to MLLM inputs: images, chat-template prompts, batching and padding.

The first stage of SAE-V's data flow (row -> prompt/processor -> MLLM up to layer L -> ...). Rows come as a
`datasets` batch (a dict of columns, what `ds.map(..., batched=True)` passes) or a list of row dicts, in the layouts
people have:

- TRL's preference format: `images`, `prompt`, `chosen`, `rejected`, the prompt either plain text or conversational
  (a list of `{"role", "content"}` messages);
- question/response columns under any names (`PromptFormat(prompt_column="question", response_column="answer")`);
- documents: a prompt that is a list of parts (`{"type": "text", "text": ...}`, `{"type": "image"}`) in document
  order, with no roles (what the `obelics` layout makes of an interleaved web document, see [`saev_hf.data.layouts`]).
  A document is read as it stands, without a chat template: its parts joined by newlines, each image part replaced by
  the processor's image token. It may hold no image (its text positions are still read), and one longer than
  `max_length` is cut before the first image whose tokens would not fit, never through an image.

Images may be PIL images, `datasets.Image` values (decoded or `{"bytes", "path"}`), file paths or raw bytes, one or
several per example. The paper scores the prompt alone (the question and the image); `response_column` adds the
response as the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import RowError
from .images import row_images


@dataclass
class PromptFormat:
    """
    Which columns hold the image(s), the prompt and optionally the response, and how long inputs may be.

    Shared by the Python API and the CLI (`saev ... --image_column ... --prompt_column ...`).
    """

    image_column: str | None = field(
        default="images",
        metadata={"help": "Column with the image(s): PIL images, datasets.Image values, paths or bytes; one or a list "
                  "per row. None for a text-only model."},
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column with the prompt/question: plain text or a conversational list of messages."},
    )
    response_column: str | None = field(
        default=None,
        metadata={"help": "Column with the response (e.g. 'chosen'), added as the assistant turn. None scores the "
                  "prompt alone, as the paper does."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest input in tokens; longer inputs are cut at the end, and an input whose image tokens "
                  "would be cut is an error. None keeps every token."},
    )

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length={self.max_length} must be a positive number of tokens or None.")


def rows_to_columns(rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """A `datasets` batch (dict of columns) or a list of row dicts, as a dict of columns."""
    if isinstance(rows, Mapping):
        return {name: list(values) for name, values in rows.items()}
    rows = list(rows)
    names = list(rows[0]) if rows else []
    return {name: [row.get(name) for row in rows] for name in names}


def _column(columns: dict[str, list[Any]], name: str, option: str) -> list[Any]:
    if name not in columns:
        raise KeyError(
            f"Column {name!r} not found; the data has columns {sorted(columns)}. Pass {option}= naming the column "
            f"that holds it."
        )
    return columns[name]


def _as_parts(content: Any, row: int) -> list[dict[str, Any]]:
    """A message's content as a list of typed parts; a part without "type" but with "text" is a text part (the
    chat templates would drop its text otherwise)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence) or not all(isinstance(part, Mapping) for part in content):
        raise RowError(
            f"Row {row}: a message's content must be text or a list of parts like {{'type': 'text', 'text': ...}} or "
            f"{{'type': 'image'}}, got {type(content).__name__} ({content!r:.60})."
        )
    parts = []
    for part in content:
        part = dict(part)
        if "type" not in part:
            if isinstance(part.get("text"), str):
                part["type"] = "text"
            elif "image" in part:
                part["type"] = "image"
            else:
                raise RowError(f"Row {row}: a message part {part!r:.80} has no 'type' and no 'text'; give it "
                               f"'type': 'text' with 'text', or 'type': 'image'.")
        parts.append(part)
    return parts


def _message(message: Mapping[str, Any], row: int) -> dict[str, Any]:
    if "content" not in message:
        raise RowError(f"Row {row}: the {message.get('role')!r} message {dict(message)!r:.80} has no 'content'; "
                       f"every message needs a 'role' and a 'content'.")
    return {"role": message["role"], "content": _as_parts(message["content"], row)}


DOCUMENT_SEPARATOR = "\n"
"""What joins a document's parts (as chat templates put a newline after an image)."""


def is_document(prompt: Any) -> bool:
    """Whether `prompt` is a document: a list of typed parts (text and image) with no roles (see the module
    docstring)."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and bool(prompt)
            and all(isinstance(part, Mapping) and "type" in part and "role" not in part for part in prompt))


def document_text(parts: Sequence[Mapping[str, Any]], image_token: str | None, row: int) -> str:
    """A document's text: its parts in order joined by [`DOCUMENT_SEPARATOR`], each image part as `image_token`."""
    pieces = []
    for part in parts:
        if part["type"] == "image":
            if not image_token:
                raise RowError(f"Row {row} is a document with images, but the processor has no image token: read it "
                               f"with an image-text model's processor.")
            pieces.append(image_token)
        elif part["type"] == "text":
            pieces.append(part.get("text") or "")
        else:
            raise RowError(f"Row {row}: a document part of type {part['type']!r}; documents hold 'text' and 'image' "
                           f"parts.")
    return DOCUMENT_SEPARATOR.join(pieces)


def build_messages(prompt: Any, response: Any, num_images: int, row: int) -> list[dict[str, Any]]:
    """
    Conversational messages for one example: the prompt as user turn(s) with `num_images` image placeholders (kept
    where the prompt already places them, otherwise put before the first user text), then the response if any.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _as_parts(prompt, row)}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        messages = [_message(m, row) for m in prompt]
    else:
        raise RowError(
            f"Row {row}: the prompt must be text or a list of {{'role', 'content'}} messages, got "
            f"{type(prompt).__name__}."
        )
    placed = sum(part.get("type") == "image" for m in messages for part in m["content"])
    if placed not in (0, num_images):
        raise RowError(f"Row {row}: the prompt has {placed} image placeholders but the row has {num_images} images.")
    if placed == 0 and num_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError(f"Row {row}: the conversational prompt has no user turn to attach the image to.")
        first_user["content"] = [{"type": "image"} for _ in range(num_images)] + first_user["content"]
    if response is not None:
        if isinstance(response, str):
            messages.append({"role": "assistant", "content": _as_parts(response, row)})
        elif isinstance(response, Sequence) and all(isinstance(m, Mapping) and "role" in m for m in response):
            messages.extend(_message(m, row) for m in response)
        else:
            raise RowError(f"Row {row}: the response must be text or a list of {{'role', 'content'}} messages, got "
                           f"{type(response).__name__}.")
    return messages


def is_formatted_prompt(prompt: Any, image_token: str | None) -> bool:
    """Whether `prompt` is already formatted text (TRL's plain format) that carries its own image tokens: such a
    prompt is used as it is, never wrapped in a chat template again."""
    return isinstance(prompt, str) and bool(image_token) and image_token in prompt


def conversational_example(
    prompt: Any, responses: Mapping[str, Any], num_images: int, image_token: str | None, row: int
) -> tuple[Any, dict[str, Any]]:
    """
    One example in the layout TRL's trainers read, converted as the scorer converts it ([`build_messages`]).

    A plain-text prompt with images becomes a user turn with `num_images` image placeholders before the text, a
    conversational prompt gets its placeholders where it lacks them, and every response (`chosen`, `rejected`,
    `completion`, ...) becomes the assistant turn(s) after it. A prompt already formatted with image tokens (TRL's
    plain format) and a plain-text prompt without images are returned unchanged: TRL reads them as they are.

    Returns:
        `(prompt, responses)`: both conversational, or both as given.
    """
    if is_formatted_prompt(prompt, image_token) or (isinstance(prompt, str) and num_images == 0):
        for name, response in responses.items():
            if not isinstance(response, str):
                raise RowError(
                    f"Row {row}: the prompt is plain text but {name!r} is {type(response).__name__}; give plain-text "
                    f"responses with a plain prompt, or make the prompt conversational too."
                )
        return prompt, dict(responses)
    messages = build_messages(prompt, None, num_images, row)
    converted = {}
    for name, response in responses.items():
        if response is None:
            raise RowError(f"Row {row} has no response in column {name!r}.")
        converted[name] = build_messages(prompt, response, num_images, row)[len(messages):]
    return messages, converted


def format_text(processor: Any, messages: list[dict[str, Any]], image_token: str | None, has_response: bool) -> str:
    """The prompt string: the processor's chat template, or plain text with image tokens when it has none."""
    template_owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", None)
    if template_owner is not None and getattr(template_owner, "chat_template", None):
        return template_owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not has_response, continue_final_message=False
        )
    pieces = []
    for message in messages:
        for part in message["content"]:
            pieces.append(image_token if part.get("type") == "image" else part.get("text", ""))
    return "".join(p for p in pieces if p)


def prepare_inputs(
    processor: Any,
    rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    prompt_format: PromptFormat,
    image_token_id: int | None = None,
    first_row: int | Sequence[int] = 0,
):
    """
    Model inputs for a batch of rows, right-padded, as a `BatchFeature` of tensors.

    Right padding keeps every example's positions and attention independent of the others (a causal model never
    attends to the padding after a token), whatever padding side the processor was configured with.

    Args:
        processor: the model's processor (image-text models) or tokenizer (text-only models).
        rows: a `datasets` batch or a list of row dicts.
        prompt_format: which columns to read and the length limit.
        image_token_id: id of the image token, used to refuse truncations that would cut image tokens.
        first_row: index of the first row in the dataset, or the dataset index of every row (rows read out of order,
            e.g. grouped by length, or a sample), so that errors name the right row.
    """
    columns = rows_to_columns(rows)
    if not columns or not any(len(values) for values in columns.values()):
        raise ValueError("The batch holds no rows: there is nothing to read. Pass at least one row.")
    prompts = _column(columns, prompt_format.prompt_column, "prompt_column")
    row_ids = row_indices(first_row, len(prompts))
    responses = (
        _column(columns, prompt_format.response_column, "response_column")
        if prompt_format.response_column
        else [None] * len(prompts)
    )
    image_values = (
        _column(columns, prompt_format.image_column, "image_column") if prompt_format.image_column else None
    )
    image_token = getattr(processor, "image_token", None)
    texts, images = [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = row_ids[i]
        document = is_document(prompt)
        row_imgs = (row_images(image_values[i], row, prompt_format.image_column, allow_none=document)
                    if image_values is not None else [])
        if prompt_format.response_column and response is None:
            raise RowError(f"Row {row} has no response in column {prompt_format.response_column!r}.")
        if document:
            text, row_imgs = _fitted_document(processor, prompt, row_imgs, prompt_format.max_length, image_token_id,
                                              row)
        elif is_formatted_prompt(prompt, image_token):
            text = prompt + (response if isinstance(response, str) else "")
        else:
            messages = build_messages(prompt, response, len(row_imgs), row)
            text = format_text(processor, messages, image_token, response is not None)
        texts.append(text)
        images.append(row_imgs)

    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": "right"}
    if template_writes_bos(processor, texts, row_ids):
        kwargs["add_special_tokens"] = False  # as transformers' processors do: the text already opens with <s>
    if image_values is not None and any(images):  # documents without an image: the processor gets none
        kwargs["images"] = images
    try:
        inputs = processor(**kwargs)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise RowError(
            f"{_describe_rows(row_ids)}: the processor could not prepare them ({error})."
        ) from error
    if prompt_format.max_length is not None:
        inputs = truncate(inputs, prompt_format.max_length, image_token_id, row_ids)
    return inputs


def _fitted_document(processor: Any, parts: Sequence[Mapping[str, Any]], images: list[Any], max_length: int | None,
                     image_token_id: int | None, row: int) -> tuple[str, list[Any]]:
    """A document's text and images, cut before the first image whose tokens would reach past `max_length` (its text
    beyond `max_length` is cut later, by [`truncate`], which never meets an image then)."""
    image_token = getattr(processor, "image_token", None)
    placed = sum(part["type"] == "image" for part in parts)
    if placed != len(images):
        raise RowError(f"Row {row}: the document has {placed} image parts but {len(images)} images.")
    text = document_text(parts, image_token, row)
    if max_length is None or not images or image_token_id is None:
        return text, images
    input_ids = processor(text=[text], images=[images], return_tensors="pt")["input_ids"][0]
    if len(input_ids) <= max_length:
        return text, images
    is_image = (input_ids == image_token_id).tolist()
    starts = [i for i, flag in enumerate(is_image) if flag and (i == 0 or not is_image[i - 1])]
    ends = [i for i, flag in enumerate(is_image) if flag and (i + 1 == len(is_image) or not is_image[i + 1])]
    if len(starts) != len(images):
        raise RowError(f"Row {row}: the processor laid the document's {len(images)} images out as {len(starts)} runs "
                       f"of image tokens, so it cannot be cut between images: raise max_length to at least "
                       f"{len(input_ids)}.")
    keep = next((k for k, end in enumerate(ends) if end >= max_length), len(images))
    cut, seen = len(parts), 0
    for position, part in enumerate(parts):
        if part["type"] == "image":
            if seen == keep:
                cut = position
                break
            seen += 1
    return document_text(parts[:cut], image_token, row), images[:keep]


def template_writes_bos(processor: Any, texts: Sequence[str], first_row: int | Sequence[int] = 0) -> bool:
    """Whether the prompt texts already open with the tokenizer's BOS token (chat templates such as Llama 3's and
    Gemma's write it), so that tokenizing them must not add another: transformers' `ProcessorMixin.
    apply_chat_template` makes the same check. A batch where only some rows open with it is refused (its tokens would
    depend on the rows beside it)."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    if not bos:
        return False
    opens = [text.startswith(bos) for text in texts]
    if all(opens):
        return True
    if any(opens):
        rows, other = row_indices(first_row, len(texts)), opens.index(not opens[0])
        raise RowError(
            f"Row {rows[other]}'s prompt {'opens' if opens[other] else 'does not open'} with the BOS token {bos!r} "
            f"and row {rows[0]}'s {'does' if opens[0] else 'does not'}: give every row the same layout (plain "
            f"prompts rendered by the chat template, or formatted prompts written alike)."
        )
    return False


def row_indices(first_row: int | Sequence[int], count: int) -> list[int]:
    """The dataset index of each of `count` rows: `first_row` onwards, or `first_row` itself when it lists them."""
    if not isinstance(first_row, Sequence):
        first_row = int(first_row)
        return list(range(first_row, first_row + count))
    row_ids = [int(row) for row in first_row]
    if len(row_ids) != count:
        raise ValueError(f"{len(row_ids)} row indices were given for {count} rows; give one index per row.")
    return row_ids


def _describe_rows(row_ids: list[int]) -> str:
    if row_ids == list(range(row_ids[0], row_ids[0] + len(row_ids))):
        return f"Rows {row_ids[0]}..{row_ids[-1]}"
    return f"Rows {row_ids}"


def truncate(inputs, max_length: int, image_token_id: int | None, first_row: int | Sequence[int] = 0):
    """Cut right-padded inputs to `max_length` tokens, refusing to cut any image token (names the row)."""
    input_ids = inputs["input_ids"]
    if input_ids.shape[1] <= max_length:
        return inputs
    row_ids = row_indices(first_row, input_ids.shape[0])
    if image_token_id is not None:
        cut = input_ids[:, max_length:] == image_token_id
        for i in cut.any(dim=1).nonzero().flatten().tolist():
            last = int((input_ids[i] == image_token_id).nonzero().max())
            raise RowError(
                f"Row {row_ids[i]}: max_length={max_length} would cut its image tokens (they run to position "
                f"{last}; the input has {int(inputs['attention_mask'][i].sum())} tokens). Raise max_length to at "
                f"least {last + 1} or shorten the text before the image."
            )
    length = input_ids.shape[1]
    for name, value in list(inputs.items()):
        if hasattr(value, "shape") and value.dim() >= 2 and value.shape[:2] == (input_ids.shape[0], length):
            inputs[name] = value[:, :max_length]
    return inputs
