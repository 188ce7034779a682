"""benchmarks/scene_dpo.py (does DPO on the scene rows help?) on tiny settings: its records hold what its table says."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scene_dpo.py"


def test_scene_dpo_benchmark_records_clean_and_all_runs_per_setup(tmp_path):
    spec = importlib.util.spec_from_file_location("scene_dpo_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    configs = [{"steps": 1, "batch_size": 2}, {"steps": 1, "batch_size": 2, "beta": 0.5}]
    record = module.run(module.parse_args(["--output-dir", str(tmp_path), "--configs", json.dumps(configs),
                                           "--num-pairs", "10", "--eval-rows", "8", "--on-policy"]))
    assert json.loads((tmp_path / "scene_dpo.json").read_text()) == json.loads(json.dumps(record))
    assert record["num_pairs"] == 10 and record["num_clean"] == 6 and record["base"]["rows"] == 8
    assert [entry["config"] for entry in record["results"]] == configs
    for entry in record["results"]:
        assert entry["clean"]["train_rows"] == 6 and entry["all"]["train_rows"] == 10
    table = (tmp_path / "scene_dpo.md").read_text()
    assert table.count("| `{") == 2 and "likeliest wrong answer" in table
