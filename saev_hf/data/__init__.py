"""Dataset rows before the MLLM sees them: loading a split (`loading`), images (`images`), prompts with the chat
template ([`PromptFormat`], `prompts`), row batches (`batching`), the input pipeline that prepares forward batches ahead
(`pipeline`) and the error a bad row raises ([`RowError`], `errors`)."""

from .errors import RowError
from .images import load_image, to_rgb, undecoded_images
from .loading import load_dataset_split
from .prompts import PromptFormat

__all__ = ["PromptFormat", "RowError", "load_dataset_split", "load_image", "to_rgb", "undecoded_images"]
