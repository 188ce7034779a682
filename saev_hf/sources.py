"""What the data commands (`saev weights`, `score`, `inspect`, `patches`) read, named once: the SAE-V, the MLLM it
reads and the dataset, with where the result goes ([`SourceArguments`]) and how `datasets.map` runs
([`MapArguments`]); [`load_sources`] loads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .activations import layer_device
from .distributed import distributed_state
from .loading import check_model_dtype, choose_device, load_dataset_split, load_model_and_processor, model_dtype_field
from .model import SAEV
from .outputs import prepare_output_dir


@dataclass
class SourceArguments:
    """Where the SAE-V, the MLLM and the dataset come from, and where results go (names as in `saev train`)."""

    sae_name_or_path: str = field(metadata={"help": "Folder or Hub repo of the SAE-V (either layout)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub repo of the MLLM the SAE-V reads (required unless "
                                "activation_cache is given)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset name, or a folder written by Dataset.save_to_disk (required "
                                "unless activation_cache is given)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder to write the result to (required)."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    sae_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of the SAE-V repo."})
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the MLLM on the Hub."})
    model_dtype: str = model_dtype_field()
    device: str = field(
        default="auto",
        metadata={"help": "Where the whole MLLM runs: 'auto' (the accelerator if any), 'cpu', 'cuda:0'... The SAE-V "
                  "goes where the layer it reads runs. Leave it at 'auto' when giving device_map."},
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "Place the MLLM while it loads, as transformers' from_pretrained(device_map=...): 'auto' "
                  "spreads a model too large for one GPU over the GPUs (and the CPU), or 'cuda:0', 'cpu'... The "
                  "SAE-V goes on the device of the layer it reads. Default: none, the whole model on `device`."},
    )
    cooccurrence_threshold: float | None = field(
        default=None,
        metadata={"help": "Set the SAE-V's co-occurrence bound delta (recorded in its config; `saev weights` saves "
                  "it with the SAE-V). Default: the SAE-V's own (the paper's 1.0 unless set or calibrated)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into output_dir even if it holds files that this command did not write (they may be "
                  "replaced)."},
    )
    activation_cache: str | None = field(
        default=None,
        metadata={"help": "`saev weights` only: read layer L's activations from this activation cache (a folder or "
                  "Hub dataset written by `saev cache`) instead of running the MLLM over a dataset; the weights are "
                  "the same. model_name_or_path and dataset_name are then not given."},
    )

    def __post_init__(self) -> None:
        if self.output_dir is None:
            raise ValueError("output_dir is required: the folder to write the result to (--output_dir DIR).")
        if self.activation_cache is not None:
            given = [name for name in ("model_name_or_path", "dataset_name") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"activation_cache={self.activation_cache!r} stands in for the MLLM and the dataset: "
                                 f"drop {' and '.join(given)}, or drop activation_cache.")
        else:
            missing = [name for name in ("model_name_or_path", "dataset_name") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required: the MLLM the SAE-V reads and the dataset "
                                 f"(--{' --'.join(missing)}), or an activation cache of them (--activation_cache, "
                                 f"for `saev weights`).")
        check_model_dtype(self.model_dtype)
        if self.device_map is not None and self.device not in ("auto", None):
            raise ValueError(f"Give either device={self.device!r} (the whole model on one device) or "
                             f"device_map={self.device_map!r} (placed while it loads), not both.")


@dataclass
class MapArguments:
    """How `datasets.map` runs the scorer."""

    batch_size: int = field(default=8, metadata={"help": "Examples per batch."})
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Worker processes of datasets.map, one per GPU with GPUs: the MLLM is loaded on the CPU "
                  "and each worker moves it to its own GPU (never CUDA before the fork)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (datasets' map and save)."})


def load_sources(source: SourceArguments, command: str | None = None):
    """The SAE-V, the MLLM (with its processor, in `source.model_dtype`, on `source.device` or placed by
    `source.device_map`) and the dataset named by `source`; the SAE-V is on the device of the layer it reads. With
    `command`, first checks that it may write into `source.output_dir` (before anything heavy is loaded)."""
    if source.activation_cache is not None:
        raise ValueError(f"activation_cache is read by `saev weights` only; {command or 'this command'} runs the MLLM "
                         f"on the rows. Give model_name_or_path and dataset_name instead.")
    if command is not None:
        _prepare_output(source, command)
    sae = _load_sae(source)
    device = None if source.device_map is not None else choose_device(source.device)
    model, processor = load_model_and_processor(source.model_name_or_path, revision=source.model_revision,
                                                dtype=source.model_dtype, device=device, device_map=source.device_map)
    sae.to(layer_device(model, sae.config.hook_layer))
    return sae, model, processor, load_dataset_split(source.dataset_name, source.dataset_config, source.dataset_split)


def load_cached_sources(source: SourceArguments, command: str):
    """For a command that reads activations only (`saev weights`), from `source.activation_cache`: the SAE-V on
    `source.device`, a [`saev_hf.cache.CacheReader`] of the cache (putting activations there too) and the cache's
    rows as the dataset (`cached_rows`). Checks first that it may write into `source.output_dir`."""
    from .cache import ActivationCache, CacheReader, cached_rows

    _prepare_output(source, command)
    if source.device_map is not None:
        raise ValueError(f"device_map={source.device_map!r} places the MLLM, but activation_cache="
                         f"{source.activation_cache!r} stands in for it. Drop device_map (--device names where the "
                         f"SAE-V runs).")
    cache = ActivationCache(source.activation_cache)
    sae = _load_sae(source).to(choose_device(source.device))
    return sae, CacheReader(cache, sae.W_enc.device), cached_rows(cache)


def _prepare_output(source: SourceArguments, command: str) -> None:
    """Check that `command` may write into `source.output_dir`, and mark it; under `torchrun` / `accelerate launch`
    the main process first, then the others find the folder marked as this command's (a launched process also gets
    its own device here, for device "auto")."""
    state = distributed_state(cpu=source.device == "cpu")
    if state is None:
        prepare_output_dir(source.output_dir, command, source.overwrite_output_dir)
        return
    with state.main_process_first():
        prepare_output_dir(source.output_dir, command, source.overwrite_output_dir)


def _load_sae(source: SourceArguments) -> SAEV:
    """The SAE-V `source` names, with the co-occurrence bound it sets."""
    sae = SAEV.from_pretrained(source.sae_name_or_path, subfolder=source.sae_subfolder)
    if source.cooccurrence_threshold is not None:
        sae.set_cooccurrence_threshold(source.cooccurrence_threshold,
                                       info={"method": "set with --cooccurrence_threshold"})
    return sae


def map_placement(source: SourceArguments, map_args: MapArguments) -> tuple[SourceArguments, bool]:
    """
    Where `saev score` and `saev patches` load the MLLM before `datasets.map`, and whether the map passes ranks:
    `(source to load, with_rank)`.

    One process (`num_proc` None): as `source` says. With `num_proc` workers: PyTorch refuses CUDA in a process
    forked after its parent initialised CUDA, so the parent loads the model on the CPU and each worker, given its
    rank, moves the model and the SAE-V to its own accelerator (`SAEVMapFunction._to_device`); the workers share
    the parent's weights until then (fork). `device="cpu"` keeps every worker on the CPU.

    Raises:
        ValueError: `device_map` or one named accelerator with `num_proc` (they place one model in one process).
    """
    if map_args.num_proc is None:
        return source, False
    if source.device_map is not None:
        raise ValueError(
            f"num_proc={map_args.num_proc} runs one worker per GPU, each with its own copy of the model, but "
            f"device_map={source.device_map!r} places one model over the devices of one process. Use num_proc "
            f"(a model that fits one GPU) or device_map (one that does not), not both."
        )
    if source.device == "cpu":
        return source, False
    if source.device != "auto":
        raise ValueError(
            f"num_proc={map_args.num_proc} puts each worker on its own GPU (by rank), so device={source.device!r} "
            f"cannot hold for all of them. Leave device at 'auto' (or 'cpu'), or drop num_proc to use that device."
        )
    return replace(source, device="cpu"), True
