"""Image patches: where an MLLM's image tokens lie on the image, SAE-V patch scores and patch filters (Algorithms 4-7).

An image reaches the language model as a run of image tokens. For the architectures whose image tokens come from a
grid of patches, [`PatchLocator`] lays each image's tokens out as that grid over the original image, as the model's
own processor and packing code do it (no per-checkpoint numbers):

| model type | views (base first) | covered part of the image |
|---|---|---|
| `llava`, `vipllava` | one square grid (CLIP patches; the CLS token of the `full` strategy has no patch) | the centre crop |
| `llava_next` | the base grid, then the high-resolution grid (its tiles joined, padding cut, newline tokens skipped) | all |
| `paligemma` | one square grid (SigLIP patches) | all (resized) |
| `qwen2_vl`, `qwen2_5_vl` | one grid of merged patches (`image_grid_thw` / merge size) | all (resized) |
| `idefics3`, `smolvlm` | the global image's grid, then the tiles joined | all (resized) |
| `chameleon` | one square grid of VQ codes | the centre crop |

[`PatchFilter`] scores every patch from the SAE-V activations z of the image tokens that cover it (the method page,
section 4): `l0` = number of features with z != 0, `l1` = sum |z|, `cooccur_l0` = number of active features in the
example's co-occurring set C(x) (z > delta at some text and some image position), `cosine` = sum of the cross-modal
weights w_f of the active weighted features. With several views (LLaVA-NeXT, Idefics3), a patch of the base grid gets
the mean of its base token's score and the mean score of the high-resolution tokens whose centres fall inside it.
[`mask_patches`] keeps the top p% of patches (threshold = percentile(scores, 100 - p), the paper's rule) and blacks
out the rest; [`PatchFilter`] does it to a whole dataset with `ds.map`, cached like [`SAEVScorer`].

```python
patch_filter = PatchFilter(sae, model, processor, args=PatchFilterArguments(score="cosine", keep_fraction=0.5))
masked = ds.map(patch_filter, batched=True, batch_size=8)   # the image column now holds the masked images
```

One concept a file: `geometry` (grids and layouts, [`PatchLocator`]), `scores` (Algorithms 4-7 per token and the
masks), `filter` ([`PatchFilter`], `saev patches`, [`run_patch_filter`]), `preview` (the PNG preview).
"""

from .filter import PatchFilter, PatchFilterArguments, run_patch_filter
from .geometry import FULL_IMAGE, PATCH_LAYOUTS, GridView, PatchGrid, PatchLocator
from .preview import save_patch_preview
from .scores import PATCH_SCORES, ImagePatchScores, keep_mask, mask_patches, token_patch_scores

__all__ = [
    "FULL_IMAGE",
    "PATCH_LAYOUTS",
    "PATCH_SCORES",
    "GridView",
    "ImagePatchScores",
    "PatchFilterArguments",
    "PatchGrid",
    "PatchLocator",
    "PatchFilter",
    "keep_mask",
    "mask_patches",
    "run_patch_filter",
    "save_patch_preview",
    "token_patch_scores",
]
