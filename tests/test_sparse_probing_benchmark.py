"""benchmarks/sparse_probing.py on small settings: it probes the digit, the colour and the shuffled control per split,
against the residual stream, and writes its tables with the command."""

import json

from benchmark_scripts import load_benchmark


def test_sparse_probing_benchmark_probes_every_label_per_split_beside_the_residual_stream(tmp_path):
    load_benchmark("sparse_probing").main(["--rows", "60", "--saev-steps", "40", "--k", "1", "3",
                                           "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "sparse_probing.json").read_text())
    assert result["rows"] == 60 and result["d_sae"] == 256 and result["image_positions_per_row"] == 9
    assert set(result["probes"]) == {"digit", "colour", "shuffled_digit", "answer"}
    digit, colour = result["probes"]["digit"], result["probes"]["colour"]
    assert digit["classes"] == [str(d) for d in range(10)] and len(colour["classes"]) == 5
    for probing in result["probes"].values():
        assert probing["k"] == [1, 3]
        for split in ("all", "text", "image"):
            assert set(probing[split]["sae"]) == {"1", "3"} and 0 <= probing[split]["dense"] <= 1
    # the colour of a one-digit scene is in its image positions' features: far above chance even at this size
    assert colour["image"]["sae"]["3"] >= 0.8
    text = (tmp_path / "sparse_probing.md").read_text()
    assert "Command: `python benchmarks/sparse_probing.py --rows 60 --k 1 3" in text
    assert text.count("| SAE-V top 3 |") == 4 and "| residual stream (128 dims) |" in text
