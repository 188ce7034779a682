"""The MLLM's layer L: loading the MLLM (`mllm`) and reading its residual stream with a modality for every position
([`LayerReader`], `reader`)."""

from .mllm import MODEL_DTYPES, load_model_and_processor
from .reader import LayerActivations, LayerReader, Modality, find_decoder_layers, layer_device

__all__ = ["MODEL_DTYPES", "LayerActivations", "LayerReader", "Modality", "find_decoder_layers", "layer_device",
           "load_model_and_processor"]
