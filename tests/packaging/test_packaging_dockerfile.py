"""The Dockerfile: its structure, for every target, and hadolint.

The `operator` and `runtime` targets are also built and run (test_packaging_images.py);
`runtime-cuda` cannot be built here (its CUDA base image is not reachable), so this is all that
checks it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
DOCKERFILE = REPOSITORY / "Dockerfile"
FINAL_STAGES = ("operator", "runtime", "runtime-cuda")
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|[\w.+-]+-dev)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stage = self.stages[name]
        parent = self.chain(stage.base) if stage.base in self.stages else []
        return [*parent, stage]

    def env(self, name: str, path: str) -> dict[str, str]:
        values = {"PATH": path}
        for stage in self.chain(name):
            for arguments in stage.all("ENV"):
                for pair in shlex.split(arguments):
                    key, _, value = pair.partition("=")
                    values[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], ""), value)
        return values

    def user(self, name: str) -> str | None:
        users = [u for stage in self.chain(name) for u in stage.all("USER")]
        return users[-1] if users else None


def parse(text: str) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # comments may sit inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base.strip())
            current = stages[name.strip()] = Stage(name.strip(), base)
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line}"
            key, _, value = arguments.partition("=")
            args[key] = value
        else:
            current.instructions.append(Instruction(keyword, arguments))
    return Dockerfile(args, stages)


DOCKER = parse(DOCKERFILE.read_text())


def test_the_targets_exist() -> None:
    assert set(FINAL_STAGES) <= set(DOCKER.stages)


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_stages_run_as_a_numeric_non_root_user(target: str) -> None:
    user = DOCKER.user(target)
    assert user is not None, f"{target} runs as root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"{target}: USER {user} is not a numeric non-root user"
    assert not gid or (gid.isdigit() and int(gid) > 0)


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_stages_set_the_python_environment(target: str) -> None:
    env = DOCKER.env(target, "")
    assert env.get("PYTHONSAFEPATH") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_stages_install_no_compilers(target: str) -> None:
    for stage in DOCKER.chain(target):
        for command in stage.all("RUN"):
            for install in re.findall(r"apt-get install([^&;|]*)", command):
                assert not COMPILERS.search(install), f"{stage.name} installs {install}"


def test_entry_points() -> None:
    assert DOCKER.stages["operator"].all("ENTRYPOINT") == ['["modeldeploy"]']
    assert DOCKER.stages["runtime"].all("ENTRYPOINT") == ['["modeldeploy-runtime"]']
    assert DOCKER.stages["runtime-cuda"].all("ENTRYPOINT") == ['["modeldeploy-runtime"]']


def test_the_python_base_image_is_a_build_argument_defaulting_to_the_public_image() -> None:
    # The local build passes its Debian-made base (`modeldeploy-dev images build`); a user's
    # `docker build` gets the public one.
    assert DOCKER.args["PYTHON_IMAGE"].startswith("python:3.11.")
    for name in ("builder", "python-base"):
        assert DOCKER.stages[name].base == DOCKER.args["PYTHON_IMAGE"]


def test_base_images_are_pinned() -> None:
    for stage in DOCKER.stages.values():
        if stage.base in DOCKER.stages:
            continue
        image = stage.base.split("@")[0]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert "@sha256:" in stage.base or (tag and tag != "latest"), f"unpinned {stage.base}"
        # A tag naming a patch release, not a moving major or minor version.
        assert "@sha256:" in stage.base or re.match(r"\d+\.\d+\.\d+", tag), stage.base


def test_the_cuda_runtime_swaps_in_a_pinned_onnxruntime_gpu() -> None:
    stage = DOCKER.stages["runtime-cuda"]
    assert stage.base.startswith("nvidia/cuda:") and "-runtime-" in stage.base
    commands = " ".join(stage.all("RUN"))
    assert "pip uninstall -y onnxruntime" in commands
    assert "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" in commands
    assert re.fullmatch(r"\d+\.\d+\.\d+", DOCKER.args["ONNXRUNTIME_GPU_VERSION"])


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "no hadolint in the virtualenv: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
