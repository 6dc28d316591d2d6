"""The repository's scripts (scripts/*.py, run as programs) as modules tests can call."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[4] / "scripts"


def load_script(filename: str) -> ModuleType:
    """``scripts/<filename>`` imported as a module named after it (``dev-stack.py`` ->
    ``dev_stack``)."""
    name = filename.removesuffix(".py").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / filename)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
