"""Run by `tests/test_distributed_data.py` under `torchrun --nproc_per_node 2`: the user's weighting code, unchanged
for distributed.

    distributed_weights_script.py MODEL SAE OUTPUT CONFIGS_JSON

For each named configuration of CONFIGS_JSON (`{"name": {"data": folder, "streamed": bool, **WeightingArguments}}`,
or `"activation_cache": folder` instead of `"data"`: its `CacheReader` and rows stand in for the MLLM and the data),
loads the SAE-V afresh and calls `compute_feature_weights` on the data, as a one-process script would. Each process
then writes `rank_<process_index>.safetensors` (the weights it returned, by configuration) and `rank_<process_index>
.json` (what it saw and what it stored: `feature_weights_info`, delta and its record), so that the test can check
that every process ended with the one-process result. Ends with `end_distributed`, as a distributed script should.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from safetensors.torch import save_file

from saev_hf import (SAEV, LayerReader, WeightingArguments, compute_feature_weights, disable_progress_bars,
                     end_distributed)
from saev_hf.cache import ActivationCache, CacheReader, cached_rows
from saev_hf.activations import load_model_and_processor


def main() -> None:
    torch.set_num_threads(1)
    disable_progress_bars()
    model_path, sae_path, output, configs = sys.argv[1:5]
    model, processor = load_model_and_processor(model_path, device="cpu")
    reader = LayerReader(model, processor, layer=1)
    tensors, records = {}, {}
    for name, config in json.loads(configs).items():
        if "activation_cache" in config:
            cache = ActivationCache(config.pop("activation_cache"))
            weights_reader, data = CacheReader(cache), cached_rows(cache)
        else:
            weights_reader, data = reader, datasets.load_from_disk(config.pop("data"))
        if config.pop("streamed", False):
            data = data.to_iterable_dataset()
        sae = SAEV.from_pretrained(sae_path)
        tensors[name] = compute_feature_weights(sae, weights_reader, data, WeightingArguments(**config)).contiguous()
        records[name] = {"info": sae.config.feature_weights_info, "delta": sae.config.cooccurrence_threshold,
                         "delta_info": sae.config.cooccurrence_threshold_info}
    state = PartialState()
    records["process"] = {"process_index": state.process_index, "num_processes": state.num_processes,
                          "distributed_type": str(state.distributed_type)}
    save_file(tensors, str(Path(output, f"rank_{state.process_index}.safetensors")))
    Path(output, f"rank_{state.process_index}.json").write_text(json.dumps(records, default=str))
    end_distributed()


if __name__ == "__main__":
    main()
