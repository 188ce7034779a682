"""The README's Python examples run as written (blocks marked `python notest` need the real Hub and are skipped)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README must show a first usage example"
    monkeypatch.chdir(tmp_path)  # the examples write checkpoints to the working directory
    namespace = {"__name__": "__readme__"}  # read top to bottom: a block may use what an earlier one defined
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "saev-tiny" / "model.safetensors").exists()
    assert (tmp_path / "saev-tiny-saelens" / "sae_weights.safetensors").exists()
    # DPO took the filtered split of the README's own data (plain prompts) and the trained model scored it again
    assert isinstance(namespace["best_half"][0]["prompt"], str)
    assert namespace["trainer"].state.global_step == 2
    assert len(namespace["rescored"]) == len(namespace["best_half"])
    assert list(namespace["rescored"]["saev_l0"]) != list(namespace["best_half"]["saev_l0"])
