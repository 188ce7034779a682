"""Shared pytest fixtures.

Tiny models: the tests run offline (no Hugging Face Hub), so every model is a tiny randomly initialised one built by
`saev_hf.testing.tiny_models` (hidden size 64, 4 decoder layers, 32x32 images). Each architecture is built and saved once per
test session; tests share the objects, so they must not modify the model or processor in place (build a private copy
with `saev_hf.testing.tiny_models.build_tiny_model` to train or patch one).

Fixtures:

* ``tiny_model_factory``: ``factory(arch) -> TinyModel``, cached per session, for any name in ``TINY_ARCHITECTURES``;
* ``tiny_mllm``: parametrised over every multimodal architecture (``TINY_MLLM_ARCHITECTURES``);
* ``tiny_text_model``: the text-only Llama (``"text"``);
* ``loopback_hub``: a Hub-compatible HTTP server on 127.0.0.1 that the real clients are pointed at (``hub_server.py``).

This file deliberately sets no environment variables (a Hub round-trip test runs its own loopback server).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hub_server import loopback_hub  # noqa: F401  (the loopback Hub fixture, for every test module)

from saev_hf.testing.tiny_processing import TINY_ARCHITECTURES
from saev_hf.testing.tiny_models import build_tiny_model

# One intra-op thread: on a shared 2-core machine two threads make tiny ops 10-60x slower, and results stay the same.
torch.set_num_threads(1)

TINY_MLLM_ARCHITECTURES = tuple(arch for arch in TINY_ARCHITECTURES if arch != "text")


@dataclass(frozen=True)
class TinyModel:
    """A tiny model built for the test session.

    Attributes:
        arch: its name in `saev_hf.testing.tiny_models.TINY_ARCHITECTURES`.
        path: directory holding ``model`` and ``processor`` saved with ``save_pretrained`` (reload with
            ``AutoModelForImageTextToText`` / ``AutoProcessor``; ``AutoModelForCausalLM`` / ``AutoTokenizer`` for
            ``"text"``).
        model: the model, in eval mode (shared: do not modify).
        processor: its processor (the tokenizer for ``"text"``; shared: do not modify).
    """

    arch: str
    path: Path
    model: Any
    processor: Any

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, whether ``processor`` is a multimodal processor or the tokenizer itself."""
        return getattr(self.processor, "tokenizer", self.processor)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    """``factory(arch) -> TinyModel``: build (seed 0) and save each tiny architecture once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, TinyModel] = {}

    def factory(arch: str) -> TinyModel:
        if arch not in cache:
            model, processor = build_tiny_model(arch, seed=0)
            path = root / arch
            model.save_pretrained(path)
            processor.save_pretrained(path)
            cache[arch] = TinyModel(arch=arch, path=path, model=model, processor=processor)
        return cache[arch]

    return factory


@pytest.fixture(scope="session", params=TINY_MLLM_ARCHITECTURES)
def tiny_mllm(request: pytest.FixtureRequest, tiny_model_factory: Callable[[str], TinyModel]) -> TinyModel:
    """Each tiny multimodal architecture in turn (tests using it run once per architecture)."""
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def tiny_text_model(tiny_model_factory: Callable[[str], TinyModel]) -> TinyModel:
    """The tiny text-only Llama causal LM."""
    return tiny_model_factory("text")
