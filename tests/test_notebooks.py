"""The notebooks run top to bottom, offline, on their tiny defaults (SAEV_NOTEBOOK_TINY=1), and show their results.

Each notebook is executed with nbclient in a fresh kernel of this interpreter, in a temporary working directory. The
Colab defaults (7B models from the Hub, a GPU) are what a user gets; the tiny switch is what CI runs.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat, nbclient, ipykernel) is needed")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
COLAB = "https://colab.research.google.com/github/saev-hf/saev-hf/blob/main/notebooks/{}"
CELL_TIMEOUT = 300


def kernel_manager(workdir: Path):
    """A kernel manager for a kernel of this very interpreter.

    The `python3` kernelspec that ipykernel installs runs `python` from PATH, which is another interpreter when the
    tests run as `.venv/bin/python -m pytest` without an activated environment.
    """
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = workdir / "kernels" / "saev-hf-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "saev-hf tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return KernelManager(kernel_name="saev-hf-tests", kernel_spec_manager=specs)


def run_notebook(name: str, workdir: Path):
    """Execute notebooks/`name` in `workdir` with the tiny defaults; return the executed notebook."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {
        **os.environ,
        "SAEV_NOTEBOOK_TINY": "1",
        "OMP_NUM_THREADS": "1",  # one thread: on a shared 2-core machine two make tiny ops far slower
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures become image/png outputs
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",  # the tiny defaults never need the Hub
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf_home"),
        "HF_DATASETS_CACHE": str(workdir / "hf_home" / "datasets"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    client = nbclient.NotebookClient(notebook, km=kernel_manager(workdir), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return notebook


def text_of(notebook) -> str:
    """Everything the code cells printed or displayed as text (stdout, text/plain, text/markdown)."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                parts.append(output["text"])
            for kind in ("text/plain", "text/markdown"):
                if kind in output.get("data", {}):
                    parts.append(output["data"][kind])
    return "\n".join(parts)


def figures(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "train_saev.ipynb", "interpret_features.ipynb"])
def test_notebook_has_a_colab_badge_a_parameters_cell_and_a_guarded_install(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert COLAB.format(name) in notebook.cells[0].source
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "TINY = os.environ.get(\"SAEV_NOTEBOOK_TINY\") == \"1\"" in tagged[0].source
    assert 'MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"' in tagged[0].source  # Colab defaults: the real model
    install = next(cell for cell in notebook.cells if "%pip install" in cell.source)
    assert 'if "google.colab" in sys.modules:' in install.source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean


def test_quickstart_scores_filters_and_trains_with_dpo(tmp_path):
    notebook = run_notebook("quickstart.ipynb", tmp_path)
    text = text_of(notebook)
    assert "Kept 16 of 32 rows by saev_cosine_score" in text
    assert "features have a cross-modal weight" in text
    assert "DPO: 2 steps on the 16 kept rows" in text
    assert "| Rows after | 16 (50.0% kept) |" in text  # the dataset card, rendered
    assert figures(notebook) >= 2


def test_train_saev_trains_evaluates_and_renders_the_model_card(tmp_path):
    notebook = run_notebook("train_saev.ipynb", tmp_path)
    text = text_of(notebook)
    assert "Trained an SAE-V with 256 features on 76,800 tokens of layer 1" in text
    assert "| CE loss recovered |" in text and "| explained variance |" in text
    assert "## Cross-modal feature weights" in text  # the model card, rendered
    state = json.loads((tmp_path / "saev-llava-next-layer16" / "saev" / "trainer_state.json").read_text())
    assert state["global_step"] == 300
    assert figures(notebook) >= 2


def test_interpret_features_explains_the_best_scored_example(tmp_path):
    notebook = run_notebook("interpret_features.ipynb", tmp_path)
    text = text_of(notebook)
    assert "Studying feature" in text and "Top text tokens of feature" in text
    assert "co-occurring features" in text and "score = sum of their weights" in text  # asserted equal in the cell
    assert "has the lowest cosine score; why:" in text and "ranks 1 of" in text
    report = tmp_path / "saev-interpret" / "report"
    assert (report / "index.html").exists() and any((report / "features").glob("feature_*.html"))
    assert figures(notebook) >= 4  # + the patch filter figure

