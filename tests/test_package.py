"""The package itself: light to import, registered with transformers' Auto classes, a working console script."""

import subprocess
import sys
from pathlib import Path


def test_import_is_light_and_registers_the_auto_classes():
    code = (
        "import sys, saev_hf\n"
        "from transformers import AutoConfig, AutoModel\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'trl' not in sys.modules and 'peft' not in sys.modules, sorted(m for m in sys.modules if m in ('trl', 'peft'))\n"
        "assert CONFIG_MAPPING['saev'] is saev_hf.SAEVConfig\n"
        "print('ok')\n"
    )
    _runs_in_a_fresh_process(code)


def _runs_in_a_fresh_process(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "saev_hf.cli"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: saev COMMAND" in result.stdout


def test_library_modules_never_import_the_demo():
    """Every library module loads without `saev_hf.demo` (the tiny models, the scene task): a real model never pays
    for them, and nothing registers the tiny processors behind a user's back."""
    code = (
        "import importlib, pkgutil, sys, saev_hf\n"
        "for module in pkgutil.iter_modules(saev_hf.__path__):\n"
        "    if module.name != 'demo':  # every module and subpackage (hub, patches) but the demo\n"
        "        package = importlib.import_module(f'saev_hf.{module.name}')\n"
        "        for sub in pkgutil.iter_modules(getattr(package, '__path__', [])):\n"
        "            importlib.import_module(f'saev_hf.{module.name}.{sub.name}')\n"
        "demo = sorted(m for m in sys.modules if m.startswith('saev_hf.demo'))\n"
        "assert not demo, demo\n"
        "print('ok')\n"
    )
    _runs_in_a_fresh_process(code)


def test_version_has_one_source_the_package_metadata():
    """`__version__` is pyproject.toml's version, as the installed metadata carries it; it is written nowhere else."""
    import importlib.metadata
    import re
    from pathlib import Path

    import saev_hf

    root = Path(__file__).resolve().parent.parent
    declared = re.search(r'^version = "([^"]+)"$', (root / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert saev_hf.__version__ == declared == importlib.metadata.version("saev-hf")
    assert declared not in (root / "saev_hf" / "__init__.py").read_text()


def test_every_public_benchmark_function_has_a_docstring():
    """The benchmark scripts are read by people reproducing figures: each public function says what it does."""
    import ast
    from pathlib import Path

    missing = []
    for script in sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")):
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{script.name}:{node.lineno} {node.name}")
    assert not missing, missing


def test_the_library_never_asks_for_remote_code_and_never_unpickles_a_download():
    """No call in saev_hf passes trust_remote_code, and nothing loads with torch.load or pickle: checkpoints are
    safetensors (training checkpoints' optimizer and RNG states go through accelerate's weights_only loader, tested
    in test_training.py)."""
    import re

    import saev_hf

    root = Path(saev_hf.__file__).parent
    for path in root.rglob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        assert not re.search(r"trust_remote_code\s*=", code), path
        assert not re.search(r"\btorch\.load\(|\bpickle\.loads?\(|\bdill\.loads?\(", code), path
