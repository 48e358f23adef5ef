"""The Dockerfile: its structure, hadolint, and its install steps performed in virtualenvs.

No Docker engine runs here, so the install test does what the image build does, outside a
container: copy what the builder stage copies, run its wheel build, then for each Python
target run its RUN steps with the image's paths mapped to temporary folders, and start each
entry point.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
DOCKERFILE = REPOSITORY / "Dockerfile"
TARGETS = {"operator": "modeldeploy", "runtime": "modeldeploy-runtime"}
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


def _copy_build_context(destination: Path) -> None:
    """What the builder stage COPYs, into its WORKDIR (`destination`)."""
    for arguments in DOCKER.stages["builder"].all("COPY"):
        *sources, target = shlex.split(arguments)
        for source in sources:
            origin = REPOSITORY / source
            into = destination / target
            if origin.is_dir():
                shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)


def _run(command: str, env: dict[str, str], cwd: Path) -> None:
    result = subprocess.run(
        ["nice", "/bin/sh", "-c", command], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def _host_env(image_env: dict[str, str]) -> dict[str, str]:
    # The local pip cache is kept (PIP_NO_CACHE_DIR only keeps the image small).
    env = {k: v for k, v in image_env.items() if k != "PIP_NO_CACHE_DIR"}
    return {"HOME": os.environ.get("HOME", "/root"), **env}


@pytest.fixture(scope="module")
def builder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage's filesystem after its steps: its WORKDIR /src and the wheel in /dist."""
    work = tmp_path_factory.mktemp("builder")
    source, dist = work / "src", work / "dist"
    _copy_build_context(source)
    host_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = _host_env(DOCKER.env("builder", host_path))
    for command in DOCKER.stages["builder"].all("RUN"):
        _run(command.replace("/dist", str(dist)), env, source)
    assert len(list(dist.glob("modeldeploy-*.whl"))) == 1
    return work


def _tiny_model(path: Path) -> Path:
    """An ONNX model that returns its input: enough to load, serve and answer probes."""
    from onnx import TensorProto, helper, save

    tensor = ["batch", 2]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, tensor)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, tensor)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def _direct_deployment_answers(venv: Path, env: dict[str, str], work: Path) -> None:
    """`modeldeploy serve -f md.yaml` serves a model with nothing but the runtime extra."""
    model = _tiny_model(work / "my model.onnx")
    manifest = work / "md.yaml"
    manifest.write_text(
        "apiVersion: modeldeploy.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: tiny}\n"
        f"spec: {{model: {{uri: 'file://{str(model).replace(' ', '%20')}', version: '2'}}}}\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(venv / "bin" / "modeldeploy"), "serve", "-f", str(manifest), "--http-port",
         str(port), "--grpc-port", "0", "--workdir", str(work / "w")],
        env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "modeldeploy serve: not ready after 90s"
            try:
                url = f"http://127.0.0.1:{port}/v2/models/tiny"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    assert json.load(answer)["versions"] == ["2"]
                    break
            except OSError:
                time.sleep(0.3)
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0


@pytest.mark.e2e
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    ("target", "absent", "importable"),
    [
        (
            "operator",
            ["onnxruntime", "modeldeploy_dev", "cryptography", "pytest"],
            "modeldeploy_operator.handlers",
        ),
        (
            "runtime",
            # (cryptography is here: the cloud storage clients need it.)
            ["kopf", "kubernetes", "modeldeploy_dev", "pytest"],
            "modeldeploy_runtime.server",
        ),
    ],
)
def test_install_steps_give_working_entry_points(
    target: str, absent: list[str], importable: str, builder_root: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    image_venv = DOCKER.env(target, "")["VIRTUAL_ENV"]
    host_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    image_env = DOCKER.env(target, host_path)
    env = _host_env({k: v.replace(image_venv, str(venv)) for k, v in image_env.items()})
    for command in DOCKER.stages[target].all("RUN"):
        mounts = dict(re.findall(r"--mount=\S*source=(\S+?),target=(\S+)", command))
        command = re.sub(r"--mount=\S+\s+", "", command)
        for source, image_path in mounts.items():
            command = command.replace(image_path, str(builder_root / source.lstrip("/")))
        _run(command, env, tmp_path)

    entry_point = TARGETS[target]
    assert DOCKER.stages[target].all("ENTRYPOINT") == [f'["{entry_point}"]']
    python = str(venv / "bin" / "python")
    checks = [
        [str(venv / "bin" / entry_point), "--help"],
        [str(venv / "bin" / entry_point), "run" if target == "operator" else "serve", "--help"],
        [python, "-c", f"import {importable}"],
        [
            python,
            "-c",
            "import importlib.util as u; "
            f"found = [m for m in {absent!r} if u.find_spec(m) is not None]; "
            "print('installed, but must not be:', found); exit(bool(found))",
        ],
    ]
    for check in checks:
        result = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, f"{check}\n{result.stdout}\n{result.stderr[-4000:]}"
    # Nothing of the development tooling is installed: no command, no file.
    assert not (venv / "bin" / "modeldeploy-dev").exists()
    installed = [p.name for p in (venv / "lib").rglob("*.py")]
    for development_only in ("podrunner.py", "pki.py", "checkout.py"):
        assert development_only not in installed
    if target == "runtime":
        _direct_deployment_answers(venv, env, tmp_path)
