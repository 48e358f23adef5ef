"""The images built from the Dockerfile (`modeldeploy-dev images build`, with buildah), run with
runc as a restricted pod's containers are: read-only root filesystem, the image's non-root user,
no capabilities.

The runtime image runs the containers the operator's builders write for a ModelDeployment: the
fetch init container, then the server, with the pod's volumes, and answers an inference request
with the model's own output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from containers import Mount, Runc, process_of
from modeldeploy_dev import build, registry
from modeldeploy_dev import images as localimages
from modeldeploy_operator import builders
from modeldeploy_operator import spec as api

pytestmark = pytest.mark.e2e

ENTRY_POINTS = {"operator": ("modeldeploy", "run"), "runtime": ("modeldeploy-runtime", "serve")}
# Python modules an image must not carry: the other image's dependencies, the development tooling,
# and pip (nothing installs at run time).
ABSENT = {
    "operator": ["onnxruntime", "numpy", "modeldeploy_dev", "cryptography", "pip"],
    # (cryptography is in the runtime: the cloud storage clients need it.)
    "runtime": ["kopf", "kubernetes", "modeldeploy_dev", "pytest", "pip", "setuptools"],
}
IMPORTABLE = {"operator": "modeldeploy_operator.handlers", "runtime": "modeldeploy_runtime.server"}
COMPILER = re.compile(r"(gcc|g\+\+|c\+\+|cc|clang|clang\+\+|cpp|tcc|cc1|cc1plus)(-[\d.]+)?")
RUNTIME_SIZE_GOAL = 450 * 10**6


@pytest.fixture(scope="module")
def runc(tmp_path_factory: pytest.TempPathFactory) -> Runc:
    return Runc(tmp_path_factory.mktemp("runc"))


@pytest.fixture(scope="module", params=localimages.TARGETS)
def image(
    request: pytest.FixtureRequest, images: dict[str, localimages.Image]
) -> localimages.Image:
    return images[request.param]


@pytest.fixture(scope="module")
def rootfs(image: localimages.Image) -> Iterator[Path]:
    with localimages.rootfs(image.reference) as path:
        yield path


@pytest.fixture(scope="module")
def runtime_rootfs(images: dict[str, localimages.Image]) -> Iterator[Path]:
    with localimages.rootfs(images["runtime"].reference) as path:
        yield path


def _config(image: localimages.Image) -> dict[str, Any]:
    return localimages.image_config(image.reference)


def test_the_images_run_as_a_numeric_non_root_user(image: localimages.Image) -> None:
    # Numeric, so that the kubelet can verify runAsNonRoot without an /etc/passwd entry.
    uid, _, gid = str(_config(image)["User"]).partition(":")
    assert uid.isdigit() and int(uid) != 0, _config(image)["User"]
    assert gid.isdigit() and int(gid) != 0, _config(image)["User"]


def test_the_images_user_has_a_name(image: localimages.Image, rootfs: Path, runc: Runc) -> None:
    # kopf names the operator's peers after getpass.getuser(), which fails for a nameless uid.
    lookup = "import getpass, os; print(os.getuid(), getpass.getuser())"
    result = runc.run(rootfs, process_of(_config(image), ["python", "-c", lookup]))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == [str(_config(image)["User"]).partition(":")[0], "modeldeploy"]


def test_the_entry_points_start(image: localimages.Image, rootfs: Path, runc: Runc) -> None:
    config = _config(image)
    command, subcommand = ENTRY_POINTS[image.target]
    assert config["Entrypoint"] == [command]
    assert config["Cmd"] == [subcommand]
    for args in ([command, "--help"], [command, subcommand, "--help"]):
        result = runc.run(rootfs, process_of(config, args))
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr[-4000:]}"
        assert "usage:" in result.stdout, result.stdout


def test_the_images_hold_their_own_dependencies_only(
    image: localimages.Image, rootfs: Path, runc: Runc
) -> None:
    check = (
        f"import importlib.util as u, shutil, {IMPORTABLE[image.target]}; "
        f"found = [m for m in {ABSENT[image.target]!r} if u.find_spec(m) is not None]; "
        "found += [c for c in ('modeldeploy-dev', 'pip') if shutil.which(c)]; "
        "print('installed, but must not be:', found); exit(bool(found))"
    )
    result = runc.run(rootfs, process_of(_config(image), ["python", "-c", check]))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


def test_the_root_filesystem_is_read_only(
    image: localimages.Image, rootfs: Path, runc: Runc
) -> None:
    write = "open('/opt/modeldeploy/written', 'w')"
    result = runc.run(rootfs, process_of(_config(image), ["python", "-c", write]))
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr, result.stderr


def test_no_compiler_is_inside(rootfs: Path) -> None:
    found = [
        str(path.relative_to(rootfs))
        for path in rootfs.rglob("*")
        if COMPILER.fullmatch(path.name.removeprefix("x86_64-linux-gnu-"))
        and (path.is_file() or path.is_symlink())
    ]
    assert not found, f"compilers in the image: {found}"
    assert not (rootfs / "usr" / "lib" / "gcc").exists()


def test_the_runtime_image_fits_its_size_goal(images: dict[str, localimages.Image]) -> None:
    runtime = images["runtime"]
    assert runtime.size <= RUNTIME_SIZE_GOAL, f"{runtime.size / 1e6:.0f} MB, {runtime.layers}"


def test_an_unchanged_tree_builds_nothing(images: dict[str, localimages.Image]) -> None:
    again = localimages.build()
    # A rebuild would give new image IDs: the configuration records when it was made.
    assert {t: i.image_id for t, i in again.items()} == {t: i.image_id for t, i in images.items()}


def _tiny_model(path: Path) -> bytes:
    """An ONNX model that returns its input."""
    from onnx import TensorProto, helper

    tensor: list[str | int | None] = ["batch", 2]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, tensor)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, tensor)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path.read_bytes()


def _volume(path: Path, uid: int, gid: int) -> Path:
    """An emptyDir: a fresh folder the container's user owns."""
    path.mkdir()
    os.chown(path, uid, gid)
    return path


_INFER = """
import json, urllib.request
body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
                               "data": [1.5, -2.0, 3.25, 0.0]}]}).encode()
request = urllib.request.Request("http://127.0.0.1:8080/v2/models/tiny/infer", data=body,
                                 headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=10).read().decode())
"""
_READY = (
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', "
    "timeout=2)"
)


def test_the_runtime_serves_a_model_as_the_builders_pod_runs_it(
    images: dict[str, localimages.Image], runtime_rootfs: Path, runc: Runc, tmp_path: Path
) -> None:
    runtime = images["runtime"]
    config = localimages.image_config(runtime.reference)
    source = tmp_path / "source"
    source.mkdir()
    model = _tiny_model(source / "tiny.onnx")
    spec = api.ModelDeploymentSpec.model_validate(
        {
            "model": {
                "uri": "file:///srv/models/tiny.onnx",
                "sha256": hashlib.sha256(model).hexdigest(),
                "version": "1",
            }
        }
    )
    owner = builders.Owner(name="tiny", namespace="ml", uid="uid-1")
    pod = builders.deployment(owner, spec, runtime.reference)["spec"]["template"]["spec"]
    user = process_of(config, [])
    volumes = {
        "models": _volume(tmp_path / "models", user.uid, user.gid),
        "tmp": _volume(tmp_path / "tmp", user.uid, user.gid),
    }

    def mounts(container: dict[str, Any]) -> list[Mount]:
        return [Mount(source, "/srv/models", read_only=True)] + [
            Mount(volumes[m["name"]], m["mountPath"], m.get("readOnly", False))
            for m in container["volumeMounts"]
        ]

    def argv(container: dict[str, Any]) -> list[str]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        return [*container["command"], *container["args"]]

    (fetch,) = pod["initContainers"]
    fetched = runc.run(runtime_rootfs, process_of(config, argv(fetch)), mounts(fetch))
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr[-4000:]
    (serve,) = pod["containers"]
    with runc.started(runtime_rootfs, process_of(config, argv(serve)), mounts(serve)) as server:
        server.wait_until(["python", "-c", _READY], timeout=120)
        answer = server.exec(["python", "-c", _INFER])
        assert answer.returncode == 0, answer.stderr[-4000:] + server.output()[-4000:]
    (output,) = json.loads(answer.stdout)["outputs"]
    assert output["name"] == "y"
    assert output["shape"] == [2, 2]
    assert output["data"] == [1.5, -2.0, 3.25, 0.0]


def test_the_registry_serves_the_images_by_tag_and_by_digest(
    images: dict[str, localimages.Image], pushed_images: dict[str, str], tmp_path: Path
) -> None:
    assert set(pushed_images) == {*localimages.TARGETS, "pause"}
    for target, image in images.items():
        repository, _, digest = pushed_images[target].partition("@")
        assert repository == f"{registry.ADDRESS}/{image.name}"
        assert registry.manifest_digest(image.name, image.tag) == digest
        assert registry.manifest_digest(image.name, digest) == digest
    # A pull by digest into an empty storage gives the very image that was built.
    operator = images["operator"]
    buildah = ["buildah", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    try:
        pulled = subprocess.run(
            [*buildah, "pull", "--quiet", "--tls-verify=false", pushed_images["operator"]],
            capture_output=True,
            text=True,
            check=False,
        )
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip() == operator.image_id
    finally:
        subprocess.run([*buildah, "rmi", "--all", "--force"], capture_output=True, check=False)
        shutil.rmtree(tmp_path / "root", ignore_errors=True)


_CONTAINERD_CONFIG = """
version = 3
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",
                    "io.containerd.cri.v1.images"]
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
"""


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The node's containerd (v2, from its Go module, with runc), on a socket of its own;
    yields the `ctr` command line that talks to it."""
    node = build.build_node()
    work = tmp_path_factory.mktemp("containerd")
    (work / "config.toml").write_text(_CONTAINERD_CONFIG.format(work=work))
    env = os.environ | {"PATH": f"{node.containerd.parent}:{os.environ['PATH']}"}
    with (work / "containerd.log").open("wb") as log:
        daemon = subprocess.Popen(
            [str(node.containerd), "--config", str(work / "config.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ctr = [str(node.ctr), "--address", str(work / "containerd.sock"), "--namespace", "test"]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert daemon.poll() is None and time.monotonic() < deadline, (
                work / "containerd.log"
            ).read_text()[-3000:]
            time.sleep(0.2)
        yield ctr
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def test_containerd_pulls_the_images_by_tag_and_digest_and_runs_them_read_only(
    images: dict[str, localimages.Image], pushed_images: dict[str, str], containerd: list[str]
) -> None:
    """What a node does with the images: pull them from the registry (plain HTTP on loopback),
    by the tag the chart names or by the digest that pins it, and run them read-only as the
    image's user."""
    operator = images["operator"]
    by_tag = f"{registry.ADDRESS}/{operator.name}:{operator.tag}"
    by_digest = pushed_images["operator"]
    for reference in (by_tag, by_digest):
        pulled = subprocess.run(
            [*containerd, "images", "pull", "--plain-http", reference],
            capture_output=True,
            text=True,
            check=False,
        )
        assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    listed = subprocess.run(
        [*containerd, "images", "ls"], capture_output=True, text=True, check=True
    ).stdout
    digest = by_digest.partition("@")[2]
    assert {line.split()[2] for line in listed.splitlines()[1:]} == {digest}, listed
    script = "import os; print(os.getuid(), os.getgid()); open('/written', 'w')"
    ran = subprocess.run(
        [*containerd, "run", "--rm", "--read-only", by_digest, "probe", "python", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.stdout.split() == ["65532", "65532"], ran.stdout + ran.stderr[-2000:]
    assert "Read-only file system" in ran.stderr, ran.stderr[-2000:]


def test_the_pause_image_sleeps_as_a_sandbox_until_killed(
    pushed_images: dict[str, str], containerd: list[str]
) -> None:
    """The pod sandbox image a node's containerd pins: pulled by digest, it keeps running."""
    pause = pushed_images["pause"]
    pulled = subprocess.run(
        [*containerd, "images", "pull", "--plain-http", pause], capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    run = [*containerd, "run", "--detach", "--read-only", pause, "sandbox"]
    assert subprocess.run(run, capture_output=True).returncode == 0
    try:
        time.sleep(1)
        tasks = subprocess.run(
            [*containerd, "tasks", "ls"], capture_output=True, text=True, check=True
        ).stdout
        assert re.search(r"^sandbox\s+\d+\s+RUNNING", tasks, re.MULTILINE), tasks
    finally:
        subprocess.run([*containerd, "tasks", "kill", "--signal", "KILL", "sandbox"], check=False)
        deadline = time.monotonic() + 30
        while subprocess.run(
            [*containerd, "tasks", "delete", "sandbox"], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        subprocess.run([*containerd, "containers", "delete", "sandbox"], check=False)
