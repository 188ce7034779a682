"""The scores SAE-V's filter is compared with on the scene miniature, each a `datasets.map(batched=True)` function
over preference rows (``"images"``, ``"prompt"``, ``"chosen"``) that adds one column; higher means keep.

- [`chosen_log_likelihood`]: the model's own summed log-probability of the chosen answer given image and question
  (a model-based quality score that needs no SAE).
- [`image_text_similarity`]: the analogue of a CLIP score computed from the model itself: how well the question's
  words are matched by what the image tokens carry after the projector (for each word of the question, its best
  cosine over the image tokens, averaged over the words). The grounded LLaVA's alignment stage trains each image
  token towards the embeddings of the words its cell shows, so this is the model's own image-text similarity, as
  CLIP's is its towers'.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..testing.tiny_pretraining import response_log_likelihoods
from .grounded_llava import _image_features


def chosen_log_likelihood(model, processor, column: str = "chosen_log_likelihood"):
    """A batched map function: the model's summed log-probability of each row's chosen answer (model in eval mode)."""

    @torch.no_grad()
    def score(batch: dict[str, list[Any]]) -> dict[str, list[float]]:
        rows = [{"images": images, "prompt": prompt, "response": chosen}
                for images, prompt, chosen in zip(batch["images"], batch["prompt"], batch["chosen"])]
        return {column: response_log_likelihoods(model.eval(), processor, rows)[0].double().tolist()}

    return score


def image_text_similarity(model, processor, column: str = "image_text_similarity"):
    """A batched map function: for each row, the mean over the question's tokens of their best cosine similarity to
    any of the image's tokens after the projector (the input embeddings the language model sees for the image)."""

    @torch.no_grad()
    def score(batch: dict[str, list[Any]]) -> dict[str, list[float]]:
        images = []
        for r, row_images in enumerate(batch["images"]):
            if not row_images or len(row_images) != 1:
                raise ValueError(f"Row {r} of the batch has {len(row_images or [])} images; image_text_similarity "
                                 f"compares a question with exactly one image. Filter such rows out first.")
            images.append(row_images[0])
        features = F.normalize(_image_features(model.eval(), processor, images).float(), dim=-1)
        embedding = model.get_input_embeddings()
        values = []
        for prompt, image in zip(batch["prompt"], features):
            ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if len(ids) == 0:
                raise ValueError(f"The prompt {prompt!r} has no tokens to compare with the image.")
            words = F.normalize(embedding(ids).float(), dim=-1)
            values.append(float((words @ image.T).max(dim=1).values.mean()))
        return {column: values}

    return score
