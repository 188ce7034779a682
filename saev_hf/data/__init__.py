"""Dataset rows before the MLLM sees them: loading a split (`loading`), images (`images`), prompts with the chat
template ([`PromptFormat`], `prompts`), row batches (`batching`), the input pipeline that prepares forward batches ahead
(`pipeline`), the error a bad row raises ([`RowError`], `errors`), the layouts of the datasets SAE-V is used with
([`to_trl_layout`], `layouts`) and images given as URLs ([`fetch_images`], `urls`)."""

from .errors import RowError
from .images import load_image, to_rgb, undecoded_images
from .layouts import LAYOUTS, to_trl_layout
from .loading import load_dataset_split
from .prompts import PromptFormat
from .urls import FetchReport, FetchSettings, ImageFetcher, fetch_images

__all__ = ["LAYOUTS", "FetchReport", "FetchSettings", "ImageFetcher", "PromptFormat", "RowError", "fetch_images",
           "load_dataset_split", "load_image", "to_rgb", "to_trl_layout", "undecoded_images"]
