"""What a map function computes with, as a digest: the identity that `datasets` fingerprints a map by, cheap to
compute for a 7B model and stable across processes, so that a second identical map hits the cache and a changed SAE-V,
MLLM or setting never does."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_digest(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Identity of a (possibly huge) model: its name, revision, and a strided sample of every parameter."""
    config = getattr(model, "config", None)
    parts: list[Any] = [type(model).__name__, getattr(config, "_name_or_path", ""), getattr(config, "_commit_hash", "")]
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        parts += [name, flat[::stride][:samples_per_tensor]]
    return _digest(*parts)


def processor_digest(processor: Any) -> str:
    """Identity of a processor or tokenizer: its tokenizer vocabulary, special tokens, chat template and image settings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    return _digest(
        type(processor).__name__,
        sorted(tokenizer.get_vocab().items()),
        getattr(tokenizer, "all_special_tokens", []),
        getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        image_processor.to_dict() if image_processor is not None else None,
        {k: getattr(processor, k) for k in ("patch_size", "vision_feature_select_strategy", "image_seq_length",
                                              "num_additional_image_tokens") if hasattr(processor, k)},
    )


def _absolute(source: str | None) -> str | None:
    """A local folder as an absolute path; a Hub repo id (or nothing) as it is."""
    if source and os.path.exists(source):
        return os.path.abspath(source)
    return source or None


def _state_key(module: torch.nn.Module) -> Any:
    """A cheap key that changes whenever a parameter or buffer of `module` is modified in place or replaced: each
    tensor's storage, version counter (bumped by every in-place op: optimizer steps, copy_, fill_), dtype and shape.
    None when a tensor has no version counter (inference tensors): the caller then recomputes the digests."""
    key = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        try:
            version = tensor._version
        except RuntimeError:
            return None
        key.append((name, tensor.data_ptr(), version, str(tensor.dtype), tuple(tensor.shape), str(tensor.device)))
    return tuple(key)
