"""What an SAE-V's activations say about an example: C(x), L0 and the per-modality maxima, per example and batched.

For an example x, with the activation bound delta (`SAEVConfig.cooccurrence_threshold`):

- C(x) = {f : z_f > delta at some text position} & {f : z_f > delta at some image position} (the co-occurring
  features, Algorithm 1 stage 3 and Algorithm 3);
- L0 = the mean over the example's scored positions of the number of features with z > 0 (Algorithm 2);
- beyond the paper (an option, never a default): the co-occurrence Jaccard |C(x)| / |T(x) | I(x)|, with T(x) and I(x)
  the features above delta at some text / image position: C(x) normalised by everything the text or the image fires,
  so that an image (or a text) firing many features does not earn co-occurrence by volume;
- each feature's largest activation on the text and on the image positions (what an explanation shows).

This is the one computation behind [`SAEVScorer`] (`saev_hf.scoring`), the inspection's scan and explanations
(`saev_hf.interpret.inspection`) and the patch filter (`saev_hf.patches`), so that the three can never disagree on a score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..activations.reader import check_same_device, text_and_image
from ..data.errors import RowError
from ..runtime.devices import sae_matmul_precision


def check_scorable(text: torch.Tensor, image: torch.Tensor, row: int) -> None:
    """
    Refuse an example that has no image or no text position: it has no image-text co-occurrence to measure.

    Raises:
        RowError: naming `row` and what it lacks.
    """
    if not image.any():
        raise RowError(f"Row {row}: no image token reached the model (the row has no image, the processor inserted "
                       f"none, or they were cut), so it has no image-text co-occurrence to score. Leave rows without "
                       f"an image out first (e.g. dataset.filter(lambda row: len(row['images']) > 0)): text-only "
                       f"documents train an SAE-V but have no SAE-V score.")
    if not text.any():
        raise RowError(f"Row {row}: no text token to score against the image.")


@dataclass
class ExampleActivity:
    """
    What one example's SAE-V activations say about its scores (see [`example_activity`]).

    Args:
        fires_text, fires_image (`torch.BoolTensor` of shape `(d_sae,)`): features above delta at some text / image
            position; C(x) is their intersection.
        max_text, max_image (`torch.Tensor` of shape `(d_sae,)`, *optional*): each feature's largest activation on
            text / image positions (with `maxima=True`).
        active (`int`): (position, feature) pairs with z > 0 over the scored positions.
        num_text, num_image (`int`): the scored text and image positions.
    """

    fires_text: torch.Tensor
    fires_image: torch.Tensor
    active: int
    num_text: int
    num_image: int
    max_text: torch.Tensor | None = None
    max_image: torch.Tensor | None = None

    @property
    def cooccurring(self) -> torch.Tensor:
        """C(x): features above delta at some text position and at some image position."""
        return self.fires_text & self.fires_image

    @property
    def l0(self) -> float:
        """Mean number of active features per scored position (Algorithm 2)."""
        return self.active / (self.num_text + self.num_image)

    def cosine(self, weights: torch.Tensor) -> float:
        """The cosine score: the sum of the cross-modal weights `weights` (d_sae,) over C(x); NaN weights add 0."""
        return float(cosine_scores(self.cooccurring, weights))

    @property
    def cooccur_jaccard(self) -> float:
        """|C(x)| / |T(x) | I(x)| (0 when no feature exceeds delta anywhere): see [`jaccard_scores`]."""
        return float(jaccard_scores(self.fires_text, self.fires_image))


@dataclass
class BatchActivity:
    """
    [`ExampleActivity`] of a batch of examples at once, one row per example (see [`batch_activity`]).

    Args:
        fires_text, fires_image (`torch.BoolTensor` of shape `(n, d_sae)`): features above delta at some text /
            image position of each example.
        active (`torch.Tensor` of shape `(n,)`, float64): (position, feature) pairs with z > 0 over each example's
            scored positions.
        num_text, num_image (`torch.Tensor` of shape `(n,)`, float64): each example's scored text / image positions.
        max_text, max_image (`torch.Tensor` of shape `(n, d_sae)`, *optional*): each feature's largest activation on
            each example's text / image positions (with `maxima=True`).
    """

    fires_text: torch.Tensor
    fires_image: torch.Tensor
    active: torch.Tensor
    num_text: torch.Tensor
    num_image: torch.Tensor
    max_text: torch.Tensor | None = None
    max_image: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.fires_text.shape[0]

    @property
    def cooccurring(self) -> torch.Tensor:
        """`(n, d_sae)`: C(x) of each example."""
        return self.fires_text & self.fires_image

    @property
    def l0(self) -> torch.Tensor:
        """`(n,)` float64: mean number of active features per scored position of each example (Algorithm 2)."""
        return self.active / (self.num_text + self.num_image)

    def cosine(self, weights: torch.Tensor) -> torch.Tensor:
        """`(n,)` float64: each example's cosine score (the sum of `weights` over its C(x); NaN weights add 0)."""
        return cosine_scores(self.cooccurring, weights)

    @property
    def cooccur_jaccard(self) -> torch.Tensor:
        """`(n,)` float64: each example's |C(x)| / |T(x) | I(x)| (see [`jaccard_scores`])."""
        return jaccard_scores(self.fires_text, self.fires_image)

    def example(self, index: int) -> ExampleActivity:
        """Example `index` alone."""
        maxima = (None, None) if self.max_text is None else (self.max_text[index], self.max_image[index])
        return ExampleActivity(self.fires_text[index], self.fires_image[index], int(self.active[index]),
                               int(self.num_text[index]), int(self.num_image[index]), *maxima)


def cosine_scores(cooccurring: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-modal `weights` (d_sae,) over the co-occurring features (`(..., d_sae)` bool), in float64;
    features without a weight (NaN) add 0."""
    return (cooccurring.double() * weights.nan_to_num(0.0).double().to(cooccurring.device)).sum(-1)


def jaccard_scores(fires_text: torch.Tensor, fires_image: torch.Tensor) -> torch.Tensor:
    """The co-occurrence Jaccard of each example (`(..., d_sae)` bool masks of the features above delta at some text /
    image position): |C(x)| / |T(x) | I(x)|, in float64; 0 when no feature exceeds delta anywhere (nothing
    co-occurs). Unlike |C(x)| (Algorithm 3), an image or a text that fires many features does not raise it by
    volume alone: features that fire on one modality only lower it."""
    both = (fires_text & fires_image).sum(-1).double()
    either = (fires_text | fires_image).sum(-1).double()
    return torch.where(either > 0, both / either.clamp(min=1), torch.zeros_like(both))


def polarity_scores(consistency: torch.Tensor, denies: torch.Tensor, threshold: float) -> torch.Tensor:
    """A polarity-aware score from a prompt-level image-text consistency (`consistency`, `(n,)`) and the level
    `threshold` above which the image shows what the question names: consistency - threshold where the chosen
    response affirms, threshold - consistency where it denies (`denies`, `(n,)` bool). A refusal ("none", "there is
    no dog") chosen for a question whose words the image does not show is consistent, an affirmative answer to it is
    not; rows of either polarity compete on one scale, centred on `threshold`."""
    centred = consistency - threshold
    return torch.where(denies.to(consistency.device), -centred, centred)


@torch.no_grad()
def batch_activity(sae: Any, hidden: torch.Tensor, modality: torch.Tensor, example: torch.Tensor, rows: Sequence[int],
                   special_as_text: bool = True, token_chunk: int | None = 4096, maxima: bool = False,
                   on_chunk: Callable[[torch.Tensor, slice], None] | None = None,
                   allow_tf32: bool = True) -> BatchActivity:
    """
    Encode the positions of a batch of examples (`token_chunk` at a time) and gather what their scores need.

    Args:
        sae ([`SAEV`]): the SAE-V (its `cooccurrence_threshold` is delta).
        hidden (`torch.Tensor` of shape `(positions, d_in)`): hidden states of the batch's real positions, on the
            SAE-V's device.
        modality (`torch.Tensor` of shape `(positions,)`): their [`Modality`].
        example (`torch.LongTensor` of shape `(positions,)`): which example (0 to `len(rows) - 1`) each belongs to.
        rows (`Sequence[int]`): the dataset rows of the examples, for errors.
        special_as_text (`bool`): special/template positions count as text (and in L0); otherwise they are encoded
            (and seen by `on_chunk`) but neither text nor image.
        token_chunk (`int`, *optional*): positions encoded at once (bounds memory); None encodes all at once.
        maxima (`bool`): also gather each feature's largest activation per modality.
        on_chunk (*optional*): called with each chunk's activations `z` and its slice of the positions, for
            statistics of the caller's own (the inspection's modality profile).
        allow_tf32 (`bool`): a float32 SAE-V on a GPU may encode with TF32 (see [`sae_matmul_precision`]).

    Raises:
        RowError: naming the row, when an example has no image or no text position.
        ValueError: when `hidden` is not on the SAE-V's device (put the SAE-V on the model's device).
    """
    num_examples = len(rows)
    text, image = text_and_image(modality, special_as_text)
    device, delta, d_sae = sae.W_enc.device, sae.config.cooccurrence_threshold, sae.config.d_sae
    check_same_device(sae, hidden.device, "the hidden states to encode")
    text, image, example = text.to(device), image.to(device), example.to(device)  # masks and indices: small
    counts = {name: torch.zeros(num_examples, dtype=torch.float64, device=device).index_add_(
        0, example[mask], torch.ones(int(mask.sum()), dtype=torch.float64, device=device))
        for name, mask in (("text", text), ("image", image))}
    for i, row in enumerate(rows):
        check_scorable(counts["text"][i] > 0, counts["image"][i] > 0, row)
    text_hits = torch.zeros(num_examples, d_sae, device=device)
    image_hits = torch.zeros_like(text_hits)
    max_text = torch.zeros(num_examples, d_sae, device=device) if maxima else None
    max_image = torch.zeros_like(max_text) if maxima else None
    active = torch.zeros(num_examples, dtype=torch.float64, device=device)
    step = token_chunk or max(1, hidden.shape[0])
    for start in range(0, hidden.shape[0], step):
        part = slice(start, start + step)
        with sae_matmul_precision(device, allow_tf32):
            z = sae.encode(hidden[part])
        ex, t, v = example[part], text[part], image[part]
        above = (z > delta).float()
        text_hits.index_add_(0, ex[t], above[t])
        image_hits.index_add_(0, ex[v], above[v])
        scored = t | v  # L0 counts the scored positions: text (with special tokens if they count) and image
        active.index_add_(0, ex[scored], (z[scored] > 0).sum(1).double())
        if maxima:  # activations are >= 0 (ReLU, or TopK of ReLU), so a maximum starting at 0 is the maximum
            for maximum, mask in ((max_text, t), (max_image, v)):
                values = z[mask].float()
                maximum.scatter_reduce_(0, ex[mask, None].expand_as(values), values, reduce="amax")
        if on_chunk is not None:
            on_chunk(z, part)
    return BatchActivity(text_hits > 0, image_hits > 0, active, counts["text"], counts["image"], max_text, max_image)


@torch.no_grad()
def segmented_activity(sae: Any, hidden: torch.Tensor, bounds: Sequence[tuple[int, int, int]], rows: Sequence[int],
                       token_chunk: int | None = 4096, allow_tf32: bool = True) -> BatchActivity:
    """
    [`batch_activity`] of a batch whose scored positions are laid out example by example, each example's text
    positions then its image positions: `bounds[i] = (start, text_end, end)` in `hidden` `(positions, d_in)`. The
    same result, with fewer passes over the activations: each example's features fire where their largest activation
    over a contiguous slice exceeds delta, and L0 counts come from one count per position (no masks, no copies).

    Raises:
        RowError: naming the row, when an example has no image or no text position.
    """
    num_examples, device = len(bounds), sae.W_enc.device
    delta, d_sae = sae.config.cooccurrence_threshold, sae.config.d_sae
    check_same_device(sae, hidden.device, "the hidden states to encode")
    for (start, text_end, end), row in zip(bounds, rows):
        check_scorable(torch.tensor(text_end > start), torch.tensor(end > text_end), row)
    max_text = torch.zeros(num_examples, d_sae, device=device)
    max_image = torch.zeros_like(max_text)
    active = torch.zeros(num_examples, dtype=torch.float64, device=device)
    total = hidden.shape[0]
    step = token_chunk or max(1, total)
    for chunk_start in range(0, total, step):
        chunk_end = min(chunk_start + step, total)
        with sae_matmul_precision(device, allow_tf32):
            z = sae.encode(hidden[chunk_start:chunk_end])
        # features with z > 0 per position: z >= 0, so sign(z) is 0 or 1 and a product with ones counts them, exactly
        # in float32 (integers up to 2**24), several times faster on a CPU than (z > 0).sum(1)
        signs = torch.sign(z) if z.dtype == torch.float32 else torch.sign(z).float()
        counts = (signs @ torch.ones(z.shape[1], device=z.device)).double()
        for i, (start, text_end, end) in enumerate(bounds):
            for low, high, maximum in ((start, text_end, max_text), (text_end, end, max_image)):
                low, high = max(low, chunk_start), min(high, chunk_end)
                if low < high:  # activations are >= 0, so a maximum starting at 0 is the maximum
                    torch.maximum(maximum[i], z[low - chunk_start : high - chunk_start].amax(0), out=maximum[i])
            low, high = max(start, chunk_start), min(end, chunk_end)
            if low < high:
                active[i] += counts[low - chunk_start : high - chunk_start].sum()
    num_text = torch.tensor([text_end - start for start, text_end, _ in bounds], dtype=torch.float64, device=device)
    num_image = torch.tensor([end - text_end for _, text_end, end in bounds], dtype=torch.float64, device=device)
    return BatchActivity(max_text > delta, max_image > delta, active, num_text, num_image, max_text, max_image)


@torch.no_grad()
def example_activity(sae: Any, hidden: torch.Tensor, modality: torch.Tensor, row: int, special_as_text: bool = True,
                     token_chunk: int | None = 4096, maxima: bool = False, allow_tf32: bool = True) -> ExampleActivity:
    """
    [`batch_activity`] of one example: `hidden` `(positions, d_in)` and `modality` `(positions,)` its real positions.
    Only its scored positions (text and image) are encoded.

    Raises:
        RowError: naming `row`, when the example has no image or no text position.
    """
    text, image = text_and_image(modality, special_as_text)
    counted = text | image
    example = torch.zeros(int(counted.sum()), dtype=torch.long, device=counted.device)
    return batch_activity(sae, hidden[counted], modality[counted], example, [row], special_as_text, token_chunk,
                          maxima, allow_tf32=allow_tf32).example(0)
