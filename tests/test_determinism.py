"""The same command gives the same SAE-V, feature weights and scores: run again, and with another number of torch
threads (bit for bit at these sizes; distributed runs are checked against one process in test_distributed_data.py and
test_training.py)."""

import datasets
import torch
from test_scoring import data_driven_sae, make_rows
from test_training import digit_dataset, tiny_args

from saev_hf.activations import LayerReader
from saev_hf.scoring import SAEVScorer
from saev_hf.training import train_saev
from saev_hf.weighting import WeightingArguments, compute_feature_weights


def test_training_weights_and_scores_are_the_same_across_runs_and_thread_counts(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    train_data, rows = digit_dataset(16), datasets.Dataset.from_dict(make_rows(16))
    reader = LayerReader(llava.model, llava.processor, layer=1)
    threads_before = torch.get_num_threads()
    results = []
    try:
        for run, threads in enumerate((1, 2, 1)):
            torch.set_num_threads(threads)
            sae = train_saev(tiny_args(tmp_path / f"run{run}", max_steps=30), llava.model, llava.processor, train_data)
            scoring = data_driven_sae(reader, rows)
            compute_feature_weights(scoring, reader, rows, WeightingArguments(num_examples=None))
            results.append((sae.state_dict(), scoring.feature_weights.clone(),
                            SAEVScorer(scoring, llava.model, llava.processor).score_rows(rows[:])))
    finally:
        torch.set_num_threads(threads_before)
    first = results[0]
    for state, weights, scores in results[1:]:
        for name, tensor in first[0].items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(weights, first[1], rtol=0, atol=0, equal_nan=True)
        assert scores == first[2]
