"""Reading and writing the SAELens checkpoint layout, the format the SAE-V authors published.

A SAELens checkpoint is a folder (local, or a Hub repo's subfolder) with

- `cfg.json`: d_in, d_sae, architecture ("standard" = ReLU, or "topk" with k), apply_b_dec_to_input,
  normalize_activations, and the model/hook it reads (SAELens >= 6 keeps those under "metadata"; older versions,
  such as the authors' checkpoints, keep them at top level as model_name, hook_name/hook_point, hook_layer, ...);
- `sae_weights.safetensors`: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
- optionally `sparsity.safetensors`: {"sparsity": log10 firing frequency [d_sae]}.

saev-hf writes the same files (SAELens >= 6 flavour, input scale folded into the weights) plus, when the SAE-V has
them, `feature_weights.safetensors` with the cross-modal weights; SAELens ignores files it does not know, and the
saev-only settings (the co-occurrence bound, the weights' provenance) ride in `cfg.json`'s metadata under "saev".
Only tensors are read, and only with safetensors.

This module deals in data only, and never imports [`SAEV`]: [`read_saelens`] returns a config and a state dict that
`SAEV.from_pretrained` builds itself from, and [`write_saelens`] takes a config and the tensors `SAEV.save_saelens`
hands it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import cached_file

from .config import SAEVConfig

logger = logging.getLogger(__name__)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
FEATURE_WEIGHTS_FILENAME = "feature_weights.safetensors"
HF_CONFIG_FILENAME = "config.json"
HF_WEIGHTS_FILENAME = "model.safetensors"
HF_WEIGHTS_INDEX_FILENAME = "model.safetensors.index.json"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_FORMAT_VERSION = "6.0.0"

# Keyword arguments of `from_pretrained` that locate a file; everything else is about building the model.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "subfolder", "local_files_only")


def _resolve(path: str | os.PathLike, filename: str, **kwargs: Any) -> str | None:
    """Local path or cached download of `filename`, or None when the folder or repo does not have it."""

    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
    return cached_file(
        str(path),
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


def _where(path: str | os.PathLike, **kwargs: Any) -> str:
    subfolder = kwargs.get("subfolder")
    return f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")


def detect_layout(path: str | os.PathLike, **kwargs: Any) -> str:
    """
    Which checkpoint layout a folder or Hub repo holds: `"saev"` (transformers) or `"saelens"`.

    Raises `OSError` naming what was looked for when it holds neither, and when its `config.json` describes a model
    that is not an SAE-V (a base MLLM's folder, say).
    """
    text = str(path)
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(text)):
        raise OSError(f"'{text}' is not a folder (nor a Hub repo id like 'org/name'). Check the path.")
    config_file = _resolve(path, HF_CONFIG_FILENAME, **kwargs)
    if config_file is not None:
        model_type = json.loads(Path(config_file).read_text()).get("model_type")
        if model_type != SAEVConfig.model_type:
            raise OSError(
                f"{_where(path, **kwargs)} holds a {model_type!r} model, not an SAE-V (config.json has "
                f"model_type={model_type!r}, expected 'saev'). Pass the location of an SAE-V checkpoint; load the "
                f"base model with transformers' Auto classes."
            )
        return "saev"
    if _resolve(path, CFG_FILENAME, **kwargs) is not None:
        return "saelens"
    raise OSError(
        f"{_where(path, **kwargs)} holds no SAE: looked for {HF_CONFIG_FILENAME} + {HF_WEIGHTS_FILENAME} "
        f"(saev-hf layout, written by save_pretrained/push_to_hub) and {CFG_FILENAME} + {WEIGHTS_FILENAME} "
        f"(SAELens layout). Check the path, repo id, revision and subfolder= (published SAELens checkpoints often "
        f"live in a subfolder)."
    )


def check_weight_shapes(path: str | os.PathLike, **kwargs: Any) -> None:
    """
    Check, from the safetensors headers only, that a saev-hf checkpoint's weights match its config's d_in and d_sae.

    Raises `ValueError` naming both shapes when they disagree, and `OSError` when the weights are missing.
    """
    config = kwargs.get("config")
    if not isinstance(config, SAEVConfig):
        config_dict = json.loads(Path(_resolve(path, HF_CONFIG_FILENAME, **kwargs)).read_text())
        config_dict.update({k: kwargs[k] for k in ("d_in", "d_sae") if k in kwargs})
        config = SAEVConfig(**{k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")})
    weights_file = _resolve(path, HF_WEIGHTS_FILENAME, **kwargs)
    if weights_file is None:
        index_file = _resolve(path, HF_WEIGHTS_INDEX_FILENAME, **kwargs)
        if index_file is None:
            raise OSError(
                f"{_where(path, **kwargs)} has an SAE-V config.json but no {HF_WEIGHTS_FILENAME} (nor a sharded "
                f"index). Upload the weights written by save_pretrained next to the config."
            )
        shard = json.loads(Path(index_file).read_text())["weight_map"].get("W_enc")
        weights_file = _resolve(path, shard, **kwargs) if shard else None
    shape = _tensor_shape(weights_file, "W_enc") if weights_file else None
    if shape is None:
        raise OSError(f"The weights at {_where(path, **kwargs)} hold no W_enc tensor: this is not an SAE-V checkpoint.")
    _check_shape("W_enc", shape, (config.d_in, config.d_sae), path, kwargs)
    # transformers would initialise a missing tensor (b_enc = 0, ...) and only print a report: refuse instead
    single_file = _resolve(path, HF_WEIGHTS_FILENAME, **kwargs)
    index_file = _resolve(path, HF_WEIGHTS_INDEX_FILENAME, **kwargs) if single_file is None else None
    if index_file is not None:
        present = set(json.loads(Path(index_file).read_text())["weight_map"])
    else:
        with safe_open(weights_file, framework="pt") as f:
            present = set(f.keys())
    required = WEIGHT_NAMES + (("feature_weights",) if config.feature_weights_info is not None else ())
    missing = [name for name in required if name not in present]
    if missing:
        raise OSError(
            f"The weights at {_where(path, **kwargs)} lack {missing} (they hold {sorted(present)}): an SAE-V needs all "
            f"of {list(required)}, and loading would silently set the missing ones to their initial values. "
            f"Save the complete SAE-V again (save_pretrained), or restore the missing tensors."
        )


def _tensor_shape(weights_file: str, name: str) -> tuple[int, ...] | None:
    with safe_open(weights_file, framework="pt") as f:
        return tuple(f.get_slice(name).get_shape()) if name in f.keys() else None


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...], path: Any, kwargs: dict) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{name} at {_where(path, **kwargs)} has shape {list(shape)}, but the config says d_in={expected[0]} and "
            f"d_sae={expected[-1]}, which needs {list(expected)}. The config and the weights disagree: fix d_in/d_sae "
            f"in the config (or do not override them) so that they match the saved weights."
            if name == "W_enc"
            else f"{name} at {_where(path, **kwargs)} has shape {list(shape)}, expected {list(expected)} from the "
            f"config (d_in, d_sae). The config and the weights disagree: fix d_in/d_sae in the config."
        )


# ----------------------------------------------------------------------------------------------------------------
# cfg.json <-> SAEVConfig
# ----------------------------------------------------------------------------------------------------------------

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)")


def _hook_layer(hook_name: str | None, explicit_layer: int | None) -> int | None:
    """Decoder layer whose output a SAELens hook reads (resid_pre of layer L is resid_post of layer L - 1)."""
    if hook_name is None:
        return explicit_layer
    unsupported = ("hook_resid_mid", "hook_mlp_out", "hook_attn_out", "hook_z", "attn.", "mlp.", "hook_q", "hook_k")
    if any(part in hook_name for part in unsupported):
        raise ValueError(
            f"The SAELens checkpoint reads hook {hook_name!r}, which is not a residual stream between decoder layers. "
            f"SAE-V reads the residual stream after a decoder layer (hook_resid_post or the layer's output)."
        )
    match = _LAYER_PATTERN.search(hook_name)
    layer = int(match.group(1)) if match else explicit_layer
    if layer is not None and hook_name.endswith("hook_resid_pre"):
        if layer == 0:
            raise ValueError(f"Hook {hook_name!r} reads the embeddings, before any decoder layer: SAE-V cannot use it.")
        layer -= 1
    return layer


def config_from_saelens(cfg: dict[str, Any]) -> SAEVConfig:
    """
    Map a SAELens `cfg.json` (any version from the authors' to SAELens 6) onto an [`SAEVConfig`].

    Raises `ValueError` for what SAE-V cannot represent: architectures other than standard/topk, per-token input
    normalisation, attention-head reshaping, or hooks that are not the residual stream.
    """
    # one step per SAELens field family (sizes, hook, normalisation, architecture) over every version's names,
    # kept in one function so that each version's layout reads in one place
    meta = dict(cfg.get("metadata") or {})
    flat = {**meta, **cfg}  # pre-6 keeps model/hook fields at top level; 6.x under "metadata"
    activation_fn = flat.get("activation_fn") or flat.get("activation_fn_str") or "relu"
    architecture = flat.get("architecture") or ("topk" if activation_fn == "topk" else "standard")
    if architecture == "standard" and activation_fn not in ("relu", None):
        raise ValueError(f"SAELens activation_fn={activation_fn!r} is not supported; SAE-V uses 'relu' or 'topk'.")
    if architecture == "standard":
        activation, k = "relu", None
    elif architecture == "topk":
        activation = "topk"
        k = flat.get("k") or (flat.get("activation_fn_kwargs") or {}).get("k")
        if flat.get("rescale_acts_by_decoder_norm"):
            raise ValueError("SAELens TopK with rescale_acts_by_decoder_norm=True is not supported by SAE-V.")
    else:
        raise ValueError(
            f"SAELens architecture {architecture!r} is not supported; SAE-V loads 'standard' (ReLU) and 'topk' SAEs."
        )
    if flat.get("reshape_activations", "none") not in ("none", None) or flat.get("hook_head_index") is not None:
        raise ValueError("SAELens checkpoints over attention heads (hook_z reshaping) are not supported by SAE-V.")

    normalize = flat.get("normalize_activations", "none")
    input_scale = 1.0
    if normalize in (True, "expected_average_only_in"):
        factor = flat.get("norm_scaling_factor")
        if factor is not None:
            input_scale = float(factor)
        else:
            logger.warning(
                "This SAELens checkpoint expects inputs rescaled to an average norm of sqrt(d_in) "
                "(normalize_activations='expected_average_only_in') but does not store the factor. Loading it with "
                "input_scale=1.0; set `sae.config.input_scale = sqrt(d_in) / mean ||x||` measured on your data."
            )
    elif normalize not in (False, None, "none"):
        raise ValueError(
            f"SAELens normalize_activations={normalize!r} (per-token normalisation) is not supported by SAE-V; "
            f"only 'none' and 'expected_average_only_in' are."
        )

    missing = [key for key in ("d_in", "d_sae") if flat.get(key) is None]
    if missing:
        raise ValueError(
            f"This SAELens cfg.json has no {' and no '.join(missing)} (it has {sorted(cfg)}): the sizes of the SAE "
            f"are required. Add \"d_in\" (the hidden size the SAE reads) and \"d_sae\" (its number of features) to "
            f"cfg.json; they are the shapes of W_enc in sae_weights.safetensors."
        )
    hook_name = flat.get("hook_name") or flat.get("hook_point")
    saev_extra = dict(meta.get("saev") or {})
    revision = (flat.get("model_from_pretrained_kwargs") or {}).get("revision")
    return SAEVConfig(
        d_in=int(flat["d_in"]),
        d_sae=int(flat["d_sae"]),
        activation=activation,
        k=None if k is None else int(k),
        hook_layer=_hook_layer(hook_name, flat.get("hook_layer")),
        base_model_name_or_path=flat.get("model_name"),
        base_model_revision=saev_extra.pop("base_model_revision", revision),
        input_scale=input_scale,
        apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", True)),
        dataset_name=flat.get("dataset_path"),
        training_tokens=flat.get("training_tokens"),
        **saev_extra,
    )


def config_to_saelens(config: SAEVConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The SAELens (>= 6) `cfg.json` for an SAE-V whose input scale has been folded into its weights."""
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": config.base_model_name_or_path,
        "hook_name": config.hook_name,
        "dataset_path": config.dataset_name,
        "saev": {
            "cooccurrence_threshold": config.cooccurrence_threshold,
            "l1_coefficient": config.l1_coefficient,
            "base_model_revision": config.base_model_revision,
            "feature_weights_info": config.feature_weights_info,
        },
    }
    if config.base_model_revision:
        metadata["model_from_pretrained_kwargs"] = {"revision": config.base_model_revision}
    cfg: dict[str, Any] = {
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": config.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": "topk" if config.activation == "topk" else "standard",
    }
    if config.activation == "topk":
        cfg.update(k=config.k, rescale_acts_by_decoder_norm=False)
    if config.hook_layer is not None:
        cfg["hook_layer"] = config.hook_layer  # read by older SAELens and by tools that predate metadata
    if config.training_tokens is not None:
        cfg["training_tokens"] = config.training_tokens
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------------------


def read_saelens_config(path: str | os.PathLike, **kwargs: Any) -> SAEVConfig:
    """The [`SAEVConfig`] of a SAELens-layout checkpoint, from its `cfg.json` alone (no weights are read)."""
    cfg_file = _resolve(path, CFG_FILENAME, **kwargs)
    if cfg_file is None:
        raise OSError(f"{_where(path, **kwargs)} has no {CFG_FILENAME}: it is not a SAELens checkpoint.")
    return config_from_saelens(json.loads(Path(cfg_file).read_text()))


def read_saelens(path: str | os.PathLike, **kwargs: Any) -> tuple[SAEVConfig, dict[str, torch.Tensor]]:
    """
    Read a SAELens-layout checkpoint (local folder or Hub repo, `subfolder=` supported) as `(config, state_dict)`: the
    [`SAEVConfig`] and every tensor an [`SAEV`] holds (the four weights, `feature_log_sparsity` and
    `feature_weights`, NaN where the checkpoint has none), checked against the config's sizes.

    Keyword arguments are those of `SAEV.from_pretrained` that locate files (`revision`, `subfolder`, `cache_dir`,
    `token`, ...) plus `dtype`. A `scaling_factor` tensor (old SAELens fine-tuning scale) is folded into `W_dec`.
    """
    cfg_file = _resolve(path, CFG_FILENAME, **kwargs)
    weights_file = _resolve(path, WEIGHTS_FILENAME, **kwargs)
    if cfg_file is None or weights_file is None:
        raise OSError(
            f"{_where(path, **kwargs)} is an incomplete SAELens checkpoint: it needs both {CFG_FILENAME} and "
            f"{WEIGHTS_FILENAME}."
        )
    cfg = json.loads(Path(cfg_file).read_text())
    config = config_from_saelens(cfg)
    state = load_file(weights_file)
    missing = [name for name in WEIGHT_NAMES if name not in state]
    if missing:
        raise OSError(f"{WEIGHTS_FILENAME} at {_where(path, **kwargs)} lacks {missing}: not a standard/topk SAE.")
    expected = {
        "W_enc": (config.d_in, config.d_sae),
        "b_enc": (config.d_sae,),
        "W_dec": (config.d_sae, config.d_in),
        "b_dec": (config.d_in,),
    }
    for name, shape in expected.items():
        _check_shape(name, tuple(state[name].shape), shape, path, kwargs)
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        state["W_dec"] = state["W_dec"] * scaling[:, None]
    unknown = sorted(set(state) - set(WEIGHT_NAMES))
    if unknown:
        raise ValueError(
            f"{WEIGHTS_FILENAME} at {_where(path, **kwargs)} has tensors {unknown} that a standard/topk SAE does not "
            f"have; this checkpoint's architecture is not supported by SAE-V."
        )

    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or _saelens_dtype(cfg.get("dtype"))
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    for name, filename, key in (
        ("feature_log_sparsity", SPARSITY_FILENAME, "sparsity"),
        ("feature_weights", FEATURE_WEIGHTS_FILENAME, "feature_weights"),
    ):
        extra_file = _resolve(path, filename, **kwargs)
        tensor = load_file(extra_file).get(key) if extra_file else None
        if tensor is not None:
            _check_shape(name, tuple(tensor.shape), (config.d_sae,), path, kwargs)
        state[name] = tensor.float() if tensor is not None else torch.full((config.d_sae,), math.nan)
    return config, state


def _saelens_dtype(name: str | None) -> torch.dtype:
    name = (name or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"SAELens cfg.json has dtype={name!r}, which is not a torch dtype.")
    return dtype


def write_saelens(config: SAEVConfig, state: dict[str, torch.Tensor], save_directory: str | os.PathLike) -> Path:
    """
    Write an SAE-V, given as its `config` and `state` (an [`SAEV`]'s state dict: the four weights,
    `feature_log_sparsity`, `feature_weights`), in the SAELens layout: `cfg.json`, `sae_weights.safetensors`, and
    `sparsity.safetensors` / `feature_weights.safetensors` when known. `input_scale` is folded into the weights so
    that SAELens reads raw hidden states; the tensors given are not modified. Returns the folder.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    s = config.input_scale
    with torch.no_grad():
        weights = {
            "W_enc": state["W_enc"] * s,
            "b_enc": state["b_enc"],
            "W_dec": state["W_dec"] / s,
            "b_dec": state["b_dec"] / s,
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, save_directory / WEIGHTS_FILENAME)
    if not torch.isnan(state["feature_log_sparsity"]).all():
        save_file({"sparsity": state["feature_log_sparsity"].detach().cpu()}, save_directory / SPARSITY_FILENAME)
    if config.feature_weights_info is not None:
        save_file({"feature_weights": state["feature_weights"].detach().cpu()},
                  save_directory / FEATURE_WEIGHTS_FILENAME)
    cfg = config_to_saelens(config, state["W_enc"].dtype)
    (save_directory / CFG_FILENAME).write_text(json.dumps(cfg, indent=2))
    return save_directory
