"""The lock files pin every dependency with hashes, cover what pyproject.toml asks for, and are
what the development install and the images install from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
LOCKS = {"operator": "operator.txt", "runtime": "runtime.txt", "dev": "dev.txt"}
# The development install takes every extra.
EXTRAS = {"operator": ["operator"], "runtime": ["runtime"], "dev": ["operator", "runtime", "dev"]}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]).lower()


def _pinned(lock: Path) -> dict[str, list[str]]:
    """name -> hashes of each `name==version` entry."""
    entries: dict[str, list[str]] = {}
    current = ""
    for line in lock.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==\S+", line):
            current = _name(match[1])
            entries[current] = []
        elif (match := re.search(r"--hash=sha256:([0-9a-f]{64})", line)) and current:
            entries[current].append(match[1])
    return entries


@pytest.mark.parametrize("extra", LOCKS)
def test_every_dependency_is_pinned_with_hashes(extra: str) -> None:
    pinned = _pinned(REPOSITORY / "requirements" / LOCKS[extra])
    extras = PROJECT["optional-dependencies"]
    requirements = [*PROJECT["dependencies"], *(r for e in EXTRAS[extra] for r in extras[e])]
    wanted = {_name(r) for r in requirements}
    missing = sorted(wanted - set(pinned))
    assert not missing, f"requirements/{LOCKS[extra]} is stale (run `make lock`): {missing}"
    assert all(pinned.values()), "an entry without hashes"
    assert " @ " not in (REPOSITORY / "requirements" / LOCKS[extra]).read_text(), (
        "a path in the lock"
    )


def test_installs_come_from_the_locks() -> None:
    makefile = (REPOSITORY / "Makefile").read_text()
    assert "--require-hashes -r requirements/dev.txt" in makefile
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    for lock in ("operator.txt", "runtime.txt"):
        assert f"--require-hashes -r /requirements/{lock}" in dockerfile
