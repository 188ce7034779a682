"""saev-hf: SAE-V multimodal sparse autoencoders for interpreting MLLMs and filtering their data, on Hugging Face.

`import saev_hf` registers the `"saev"` model type with transformers' Auto classes, so that
`AutoConfig.from_pretrained` and `AutoModel.from_pretrained` load SAE-V checkpoints without `trust_remote_code`.
It stays light: heavy optional stacks (TRL, PEFT) are imported only by the parts that use them.
"""

from transformers import AutoConfig, AutoModel

from .config import SAEVConfig
from .model import SAEV, SAEVOutput

__version__ = "0.1.0.dev0"

AutoConfig.register(SAEVConfig.model_type, SAEVConfig, exist_ok=True)
AutoModel.register(SAEVConfig, SAEV, exist_ok=True)

__all__ = ["SAEV", "SAEVConfig", "SAEVOutput", "__version__"]
