"""Run by `tests/test_training.py` under `torchrun --nproc_per_node 2`: the user's code, unchanged for distributed.

It parses the model, data, columns and `SAEVTrainingArguments` from the command line exactly as `saev train` does, calls `train_saev`, then
writes `rank_<process_index>.json` into the output folder: what this process saw (its index, the number of processes)
and a digest of the SAE-V it ended with, so that the test can check that two processes really ran and that their
replicas agree, and ends with `end_distributed`, as a distributed script should.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from saev_hf import DataArguments, ModelArguments, PromptFormat
from saev_hf.runtime import end_distributed
from saev_hf.training import SAEVTrainingArguments, train_saev


def main() -> None:
    torch.set_num_threads(1)
    parser = HfArgumentParser((ModelArguments, DataArguments, PromptFormat, SAEVTrainingArguments))
    model, data, prompt_format, args = parser.parse_args_into_dataclasses(sys.argv[1:])
    sae = train_saev(args, model=model, dataset=data, prompt_format=prompt_format)
    state = PartialState()
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    record = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "sae_digest": digest.hexdigest(),
    }
    Path(args.output_dir, f"rank_{state.process_index}.json").write_text(json.dumps(record))
    end_distributed()


if __name__ == "__main__":
    main()
