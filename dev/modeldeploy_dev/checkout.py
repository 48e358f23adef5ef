"""The source checkout this development package works in."""

from __future__ import annotations

from pathlib import Path


def root() -> Path:
    """The repository root: the nearest folder above this package holding the project's files.

    The development package is installed editable from a checkout (`make venv`); the files it
    reads and writes (tools/, crds/, README.md) exist only there.
    """
    for folder in Path(__file__).resolve().parents:
        if (folder / "tools" / "controlplane" / "go.mod").is_file() and (
            folder / "pyproject.toml"
        ).is_file():
            return folder
    raise RuntimeError(
        "modeldeploy-dev works in a source checkout of modeldeploy (install it with `make venv`)"
    )
