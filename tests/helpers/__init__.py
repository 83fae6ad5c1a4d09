"""Helpers shared by the test modules: repository paths and the example scripts as modules
(tolerances, attention-routing cases and the import graph have their own modules; shared
fixtures are in tests/conftest.py)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_example(name: str):
    """examples/<name>.py imported as a module (its main() is not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
