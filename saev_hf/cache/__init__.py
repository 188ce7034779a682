"""An activation cache: layer L read once over a dataset and kept in safetensors shards. Written by
[`cache_activations`] (`writer`, with its [`ShardWriter`] in `shard_writer`), read back by [`ActivationCache`]
(`activation_cache`), and served to training, weighting and evaluation in place of the MLLM by [`CacheReader`]
(`reader`)."""

from .activation_cache import MANIFEST_NAME, SHARD_TENSORS, ActivationCache
from .reader import CacheReader, cached_rows
from .writer import CacheArguments, cache_activations

__all__ = ["MANIFEST_NAME", "SHARD_TENSORS", "ActivationCache", "CacheArguments", "CacheReader", "cache_activations",
           "cached_rows"]
