"""The optional C module `synapse_replication._speedups`, if there is one.

It is built by ``pip install`` when a C compiler and the Python headers are
there, and skipped otherwise (see setup.py). Everything in it has a pure-Python
twin that gives exactly the same results, so the package behaves the same
without it, only more slowly. Set SYNAPSE_REPLICATION_PURE_PYTHON=1 to ignore it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["SPEEDUPS"]


def _load() -> ModuleType | None:
    if os.environ.get("SYNAPSE_REPLICATION_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module("synapse_replication._speedups")
    except ImportError:
        return None


SPEEDUPS: Final = _load()
