"""Locate and load the wire vectors captured from a real Synapse.

The vectors live outside the repository, in a ``shared/wire`` directory next to
it (or next to one of its parents). The environment variable
``SYNAPSE_REPLICATION_WIRE_DIR`` names another directory instead. They are read,
never copied: a test that needs them fails, loudly, when they cannot be found.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Final

WIRE_DIR_ENV: Final = "SYNAPSE_REPLICATION_WIRE_DIR"

# Every command Synapse 1.163 published on its Redis channel, one per line.
SYNAPSE_LINES: Final = "synapse-1.163-sqlite.lines"


class WireVectorsNotFound(FileNotFoundError):
    """The wire vectors are not where they should be."""


@functools.cache
def wire_dir() -> Path:
    """The directory holding the wire vectors.

    `SYNAPSE_REPLICATION_WIRE_DIR` if set, else the first ``shared/wire``
    directory found next to this file's directory or one of its parents.
    """
    override = os.environ.get(WIRE_DIR_ENV)
    if override:
        path = Path(override)
        if not path.is_dir():
            raise WireVectorsNotFound(f"{WIRE_DIR_ENV}={override!r} is not a directory")
        return path
    here = Path(__file__).resolve().parent
    for parent in (here, *here.parents):
        candidate = parent / "shared" / "wire"
        if candidate.is_dir():
            return candidate
    raise WireVectorsNotFound(
        f"No shared/wire directory next to {here} or any of its parents; "
        f"set {WIRE_DIR_ENV} to the directory holding the wire vectors"
    )


def wire_file(name: str) -> Path:
    """The path of the vector file `name`, which must exist."""
    path = wire_dir() / name
    if not path.is_file():
        raise WireVectorsNotFound(f"Wire vector file {path} does not exist")
    return path


@functools.cache
def wire_lines(name: str = SYNAPSE_LINES) -> tuple[str, ...]:
    """The non-blank lines of the vector file `name`, without their newlines,
    decoded from UTF-8 exactly as a reader of the wire would."""
    data = wire_file(name).read_bytes().decode("utf-8")
    lines = tuple(line for line in data.split("\n") if line)
    if not lines:
        raise WireVectorsNotFound(f"Wire vector file {name} holds no lines")
    return lines


def wire_json(name: str) -> Any:
    """The JSON document in the vector file `name` (an HTTP response body)."""
    return json.loads(wire_file(name).read_bytes())
