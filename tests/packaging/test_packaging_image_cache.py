"""What an image's cache key follows: the Dockerfile, the build context as `.dockerignore` selects
it (lock files and sources), and the base image; nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modeldeploy_dev import images

REPOSITORY = Path(__file__).resolve().parents[2]
BASE = "localhost/modeldeploy-python:3.11-bookworm-0"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the files a build reads, plus some it must not."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, tmp_path / name)
    for folder in ("requirements", "contract", "cli"):
        shutil.copytree(REPOSITORY / folder, tmp_path / folder)
    (tmp_path / "runtime" / "modeldeploy_runtime").mkdir(parents=True)
    (tmp_path / "runtime" / "modeldeploy_runtime" / "server.py").write_text("SERVED = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    return tmp_path


def test_the_context_is_what_dockerignore_lets_in(tree: Path) -> None:
    (tree / "contract" / "__pycache__").mkdir(exist_ok=True)
    (tree / "contract" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    files = {str(path) for path in images.context_files(tree)}
    assert {"pyproject.toml", "README.md", "requirements/runtime.txt"} <= files
    assert "runtime/modeldeploy_runtime/server.py" in files
    assert not any(name.startswith(("tests/", "Dockerfile")) for name in files)
    assert not any("__pycache__" in name for name in files)


@pytest.mark.parametrize(
    "change",
    [
        "Dockerfile",
        "requirements/runtime.txt",
        "requirements/operator.txt",
        "runtime/modeldeploy_runtime/server.py",
        "pyproject.toml",
    ],
)
def test_a_change_to_what_the_build_reads_changes_the_key(tree: Path, change: str) -> None:
    before = images.context_key(tree, BASE)
    with (tree / change).open("a") as file:
        file.write("\n# changed\n")
    assert images.context_key(tree, BASE) != before


def test_a_new_source_file_changes_the_key(tree: Path) -> None:
    before = images.context_key(tree, BASE)
    (tree / "runtime" / "modeldeploy_runtime" / "new.py").write_text("")
    assert images.context_key(tree, BASE) != before


def test_a_new_base_image_changes_the_key(tree: Path) -> None:
    assert images.context_key(tree, BASE) != images.context_key(tree, BASE + "1")


def test_files_outside_the_context_do_not_change_the_key(tree: Path) -> None:
    before = images.context_key(tree, BASE)
    (tree / "tests" / "test_x.py").write_text("assert True\n")
    (tree / "runtime" / "modeldeploy_runtime" / "__pycache__").mkdir()
    (tree / "runtime" / "modeldeploy_runtime" / "__pycache__" / "server.pyc").write_bytes(b"1")
    (tree / "notes.txt").write_text("")
    assert images.context_key(tree, BASE) == before
