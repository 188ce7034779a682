"""benchmarks/gpu_check.py (the prepared GPU check) in its CPU mode at reduced sizes: it runs end to end, and its JSON
holds every figure the GPU run is for, so that the GPU mode cannot rot before a GPU runs it."""

import json
import math

from benchmark_scripts import load_benchmark


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_check_cpu_mode_records_every_measurement(tmp_path):
    benchmark = load_benchmark("gpu_check")
    benchmark.main(["--device", "cpu", "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert set(result) >= {"scorer", "training", "weighting", "activation_cache", "label", "model", "wall_time_s"}
    assert result["mode"] == "cpu" and "not GPU figures" in result["label"]

    scorer = result["scorer"]
    assert set(scorer["settings"]) == {"plain", "pipeline"}
    pipeline = scorer["settings"]["pipeline"]
    assert pipeline["group_by_length"] and pipeline["forward_batch_size"] and pipeline["preprocessing_workers"] >= 1
    assert all(positive(s["rows_per_s"]) for s in scorer["settings"].values())
    assert positive(scorer["bare_forward_rows_per_s"])
    assert positive(scorer["scorer_over_bare"]) and positive(scorer["plain_scorer_over_bare"])
    assert scorer["max_relative_score_difference"] < 1e-4  # the pipeline does not change the scores
    # anyres images of four sizes give four image-token counts
    assert len(set(scorer["image_tokens"].values())) == 4
    for padding in scorer["padding_fraction"].values():
        assert 0 <= padding["with_grouping"] <= 1 and 0 <= padding["without_grouping"] <= 1
    # grouping by length cuts padding where the length estimate sees what varies (the text, one image size)
    one_size = scorer["padding_fraction"]["one image size"]
    assert one_size["with_grouping"] < one_size["without_grouping"]
    busy = scorer["gpu_busy_fraction"]
    assert busy["value"] is None and busy["nvml_mean_utilization"] is None  # no GPU: null, not a made-up number

    training = result["training"]
    assert positive(training["saev_hf_tokens_per_s"]) and positive(training["saelens_tokens_per_s"])
    assert positive(training["saev_hf_over_saelens"])
    assert training["d_sae"] == 1024 and training["d_in"] == 64

    weighting = result["weighting"]
    assert weighting["peak_memory_bytes"] is None or positive(weighting["peak_memory_bytes"])
    assert positive(weighting["seconds"])

    cache = result["activation_cache"]
    assert cache["available"] is True and cache["tokens"] > 0 and cache["megabytes"] > 0
    assert all(math.isfinite(cache[k]) and cache[k] > 0 for k in ("write_mb_per_s", "read_mb_per_s"))

    table = (tmp_path / "gpu_check_cpu.md").read_text()
    assert "CPU smoke run" in table and "| **scorer / bare forward** (pipeline) |" in table
    assert "| activation cache write / read MB/s |" in table and "measured (float32 storage" in table
