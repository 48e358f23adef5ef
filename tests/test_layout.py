"""The repository layout must never shadow the standard library's `operator` module."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_operator_from_repo_root_gives_the_stdlib() -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).parent == Path(sysconfig.get_paths()["stdlib"])


def test_no_top_level_operator_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
