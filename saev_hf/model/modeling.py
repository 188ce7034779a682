"""`SAEV`: the SAE-V sparse autoencoder as a transformers `PreTrainedModel`.

z = act((s * x - b_dec * apply_b_dec_to_input) W_enc + b_enc),   x_hat = (z W_dec + b_dec) / s

with s = `config.input_scale` and act = ReLU (the paper) or TopK. Besides its four weight tensors, an SAEV carries two
per-feature buffers that travel with it (saved, loaded and pushed to the Hub):

- `feature_weights`: the cross-modal weight w_f of Algorithm 1 (mean cosine between the hidden states of a feature's
  top text and top image tokens). NaN means "this feature has no weight" (single-modal, or too few tokens of one
  modality), which is not the same as a weight of 0.
- `feature_log_sparsity`: log10 of each feature's firing frequency (SAELens' `sparsity.safetensors`); NaN if unknown.

Checkpoints are safetensors. `SAEV.from_pretrained` also reads the SAELens layout (`cfg.json` +
`sae_weights.safetensors`) that the paper's authors published; see `saev_hf.model.saelens`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..runtime.folders import check_local_path, check_output_complete
from . import saelens
from .config import SAEVConfig, _check_finite

DECODER_INIT_NORM = 0.1


@dataclass
class SAEVOutput(ModelOutput):
    """
    Output of [`SAEV.forward`].

    Args:
        loss (`torch.Tensor`, scalar):
            Training loss: `mse_loss + l1_coefficient * sparsity_loss` for ReLU, `mse_loss` for TopK.
        reconstruction (`torch.Tensor` of shape `(..., d_in)`):
            The reconstruction x_hat of the input, in the input's scale.
        feature_acts (`torch.Tensor` of shape `(..., d_sae)`):
            Feature activations z.
        mse_loss (`torch.Tensor`, scalar):
            Squared reconstruction error summed over `d_in` and averaged over tokens, measured on scaled inputs.
        sparsity_loss (`torch.Tensor`, scalar):
            `sum_f z_f * ||W_dec[f]||_2` averaged over tokens (before the L1 coefficient is applied).
        l0 (`torch.Tensor`, scalar):
            Mean number of active features (z > 0) per token.
    """

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    feature_acts: torch.Tensor | None = None
    mse_loss: torch.Tensor | None = None
    sparsity_loss: torch.Tensor | None = None
    l0: torch.Tensor | None = None


class SAEVPreTrainedModel(PreTrainedModel):
    """Base class wiring [`SAEVConfig`] into transformers' save/load/push machinery."""

    config_class = SAEVConfig
    base_model_prefix = "saev"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The paper's init: decoder rows of norm 0.1, encoder = decoder transposed, biases zero.
        if isinstance(module, SAEV):
            w_dec = torch.randn(module.config.d_sae, module.config.d_in, dtype=torch.float32)
            w_dec = w_dec * (DECODER_INIT_NORM / w_dec.norm(dim=-1, keepdim=True))
            init.copy_(module.W_dec, w_dec.to(module.W_dec.dtype))
            init.copy_(module.W_enc, w_dec.T.contiguous().to(module.W_enc.dtype))
            init.zeros_(module.b_enc)
            init.zeros_(module.b_dec)
            init.constant_(module.feature_weights, float("nan"))
            init.constant_(module.feature_log_sparsity, float("nan"))


class SAEV(SAEVPreTrainedModel):
    """
    A sparse autoencoder over one decoder layer's residual stream of a multimodal LLM (SAE-V, ICML 2025).

    Example:

    ```python
    >>> import torch
    >>> from saev_hf import SAEV, SAEVConfig
    >>> sae = SAEV(SAEVConfig(d_in=16, expansion_factor=4, hook_layer=1))
    >>> out = sae(torch.randn(2, 5, 16))
    >>> out.feature_acts.shape, out.reconstruction.shape
    (torch.Size([2, 5, 64]), torch.Size([2, 5, 16]))

    ```
    """

    def __init__(self, config: SAEVConfig) -> None:
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.empty(config.d_in, config.d_sae))
        self.b_enc = nn.Parameter(torch.empty(config.d_sae))
        self.W_dec = nn.Parameter(torch.empty(config.d_sae, config.d_in))
        self.b_dec = nn.Parameter(torch.empty(config.d_in))
        self.register_buffer("feature_weights", torch.full((config.d_sae,), float("nan")))
        self.register_buffer("feature_log_sparsity", torch.full((config.d_sae,), float("nan")))
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # The autoencoder
    # ----------------------------------------------------------------------------------------------------------

    def pre_activations(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations `(s * x - b_dec * apply_b_dec_to_input) W_enc + b_enc`, shape `(..., d_sae)`."""
        self._check_input(hidden_states)
        x = hidden_states.to(self.W_enc.dtype) * self.config.input_scale
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        # one fused product-and-bias (addmm) rather than a product and a separate pass adding the bias
        return torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc).reshape(*x.shape[:-1], -1)

    def encode(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Feature activations z, shape `(..., d_sae)`, from hidden states of shape `(..., d_in)`."""
        pre = self.pre_activations(hidden_states)
        if self.config.activation == "topk":
            values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        return pre.relu_()  # in place: the pre-activations are this call's own tensor

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat, shape `(..., d_in)`, in the scale of the original hidden states."""
        return (feature_acts @ self.W_dec + self.b_dec) / self.config.input_scale

    def forward(self, hidden_states: torch.Tensor, l1_coefficient: float | None = None) -> SAEVOutput:
        """
        Encode, decode and compute the loss terms.

        Args:
            hidden_states (`torch.Tensor` of shape `(..., d_in)`):
                Residual-stream hidden states; any number of leading dimensions (tokens, or batch and tokens).
            l1_coefficient (`float`, *optional*):
                Overrides `config.l1_coefficient` for this call (training warms it up from 0).

        Returns:
            [`SAEVOutput`]
        """
        feature_acts = self.encode(hidden_states)
        scaled_reconstruction = feature_acts @ self.W_dec + self.b_dec
        target = hidden_states.to(self.W_enc.dtype) * self.config.input_scale
        mse_loss = (scaled_reconstruction - target).pow(2).sum(-1).mean()
        sparsity_loss = (feature_acts * self.W_dec.norm(dim=-1)).sum(-1).mean()
        l1 = self.config.l1_coefficient if l1_coefficient is None else l1_coefficient
        loss = mse_loss if self.config.activation == "topk" else mse_loss + l1 * sparsity_loss
        return SAEVOutput(
            loss=loss,
            reconstruction=scaled_reconstruction / self.config.input_scale,
            feature_acts=feature_acts,
            mse_loss=mse_loss,
            sparsity_loss=sparsity_loss,
            l0=(feature_acts > 0).float().sum(-1).mean(),  # a float count: summing a bool mask copies it to int64
        )

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.shape[-1] != self.config.d_in:
            source = self.config.base_model_name_or_path or "the base model"
            raise ValueError(
                f"Hidden states have size {hidden_states.shape[-1]} in their last dimension, but this SAE-V reads "
                f"d_in={self.config.d_in} (trained on {source}, layer {self.config.hook_layer}). Pass the residual "
                f"stream of a model whose hidden size is {self.config.d_in}, or load an SAE-V trained on your model."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Cross-modal feature weights
    # ----------------------------------------------------------------------------------------------------------

    @property
    def has_feature_weight(self) -> torch.Tensor:
        """Boolean mask `(d_sae,)`: which features have a cross-modal weight (the others are single-modal/unknown)."""
        return ~torch.isnan(self.feature_weights)

    @torch.no_grad()
    def set_feature_weights(self, weights: torch.Tensor, info: dict | None = None) -> None:
        """
        Store cross-modal feature weights, NaN marking features without a weight, and record how they were computed.

        Args:
            weights (`torch.Tensor` of shape `(d_sae,)`): the weights; NaN for "no weight".
            info (`dict`, *optional*): provenance saved in `config.feature_weights_info` (dataset, sizes, ...).
        """
        weights = torch.as_tensor(weights)
        if weights.shape != (self.config.d_sae,):
            raise ValueError(
                f"Feature weights have shape {tuple(weights.shape)}, expected ({self.config.d_sae},): one per feature."
            )
        if torch.isinf(weights).any():
            raise ValueError("Feature weights contain inf; use NaN for 'no weight' and finite values otherwise.")
        self.feature_weights.copy_(weights.to(self.feature_weights))
        self.config.feature_weights_info = dict(info or {})

    def set_cooccurrence_threshold(self, delta: float, info: dict | None = None) -> None:
        """
        Set the co-occurrence bound delta (`config.cooccurrence_threshold`) and record where it came from.

        Args:
            delta (`float`): the new bound, finite and >= 0.
            info (`dict`, *optional*): provenance saved in `config.cooccurrence_threshold_info` (how it was chosen,
                from what data); the previous value is added to it.
        """

        _check_finite("cooccurrence_threshold", delta, minimum=0.0)
        record = {**(info or {"method": "set"}), "previous": self.config.cooccurrence_threshold}
        self.config.cooccurrence_threshold = float(delta)
        self.config.cooccurrence_threshold_info = record

    @torch.no_grad()
    def check_finite(self) -> None:
        """Refuse NaN or inf in the weights (an SAE-V with them encodes NaN, and every score silently becomes 0) and
        inf in the feature weights (NaN there means "no weight")."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            tensor = getattr(self, name)
            bad = ~torch.isfinite(tensor)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"The SAE-V's {name} holds {int(bad.sum())} NaN or inf values (first at index {first}): it would "
                    f"encode NaN and score every row 0. The checkpoint is corrupt or its training diverged; load "
                    f"another checkpoint (e.g. an earlier checkpoint-* of the run) or train again with a lower "
                    f"learning rate."
                )
        if torch.isinf(self.feature_weights).any():
            raise ValueError("The SAE-V's feature_weights contain inf; compute them again (compute_feature_weights).")

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self) -> SAEV:
        """
        Fold `config.input_scale` into the weights (W_enc, W_dec and b_dec), leaving `input_scale = 1.0`.

        The encoding and reconstruction of every input are unchanged; the checkpoint then reads raw hidden states,
        which is what SAELens users expect. Returns `self`.
        """
        s = self.config.input_scale
        if s != 1.0:
            self.W_enc.mul_(s)
            self.W_dec.div_(s)
            self.b_dec.div_(s)
            self.config.input_scale = 1.0
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs) -> SAEV:
        """
        Load an SAEV from a local folder or a Hub repo (optionally `subfolder=`), in either layout:

        - saev-hf's own (`config.json` + `model.safetensors`), as written by `save_pretrained` / `push_to_hub`;
        - SAELens' (`cfg.json` + `sae_weights.safetensors` [+ `sparsity.safetensors`]), as the paper's authors
          published their checkpoints.

        Takes the usual `PreTrainedModel.from_pretrained` keyword arguments (`revision`, `subfolder`, `dtype`,
        `cache_dir`, `token`, ...). Raises `OSError` naming the files looked for when the location holds no SAE, and
        `ValueError` when a weight holds NaN or inf (see [`SAEV.check_finite`]).
        """

        check_local_path(pretrained_model_name_or_path, "SAE-V")
        if os.path.isdir(pretrained_model_name_or_path):
            check_output_complete(pretrained_model_name_or_path, "SAE-V")
        # transformers expects "" for "no subfolder"; the CLI and users naturally pass None.
        kwargs = {k: v for k, v in kwargs.items() if not (k in ("subfolder", "revision") and v is None)}
        layout = saelens.detect_layout(pretrained_model_name_or_path, **kwargs)
        if layout == "saelens":
            sae = cls._from_saelens(pretrained_model_name_or_path, **kwargs)
        else:
            saelens.check_weight_shapes(pretrained_model_name_or_path, **kwargs)
            sae = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        sae.check_finite()
        return sae

    @classmethod
    def _from_saelens(cls, path: str | os.PathLike, **kwargs) -> SAEV:
        """An SAEV built from the config and tensors that `saev_hf.model.saelens.read_saelens` reads at `path`."""
        config, state = saelens.read_saelens(path, **kwargs)
        with torch.device("meta"):  # no initialisation: every tensor comes from the checkpoint
            model = cls(config)
        model.load_state_dict(state, assign=True)
        model.config.name_or_path = str(path)
        return model.eval()

    def save_saelens(self, save_directory: str | os.PathLike) -> None:
        """Write this SAE-V in the SAELens layout (see `saev_hf.model.saelens.write_saelens`)."""
        saelens.write_saelens(self.config, self.state_dict(), save_directory)
