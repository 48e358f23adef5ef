"""The operator and runtime images, built here from the repository's Dockerfile with buildah.

No Docker engine runs here and no public image registry is reachable, so:

- the Python base image is made from Debian's own packages: `mmdebstrap` writes bookworm with
  its Python 3.11 (`python3`, `python3-venv`, `python-is-python3`, `ca-certificates`, nothing
  else) as one tar file, which becomes a one-layer image in buildah's storage;
- `buildah build` builds the Dockerfile's `operator` and `runtime` targets as a user's
  `docker build --target ...` does, passing that base as `PYTHON_IMAGE` (the Dockerfile's default
  stays the public `python` image);
- the pod sandbox image a node needs (`modeldeploy-pause`) is Debian's static busybox sleeping;
- the images are tagged with a hash of what they are built from (the Dockerfile, the files the
  build context holds: lock files and sources, and the base image), so an unchanged tree builds
  nothing.

Everything lives under the cache (`~/.cache/modeldeploy/images/`): buildah's storage and the
base image's tar file. `registry.push` puts the images into the local registry.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from modeldeploy_dev import checkout
from modeldeploy_dev.build import cache_dir

TARGETS = ("operator", "runtime")
PYTHON_SUITE = "bookworm"  # its python3 is Python 3.11
# libstdc++6: the one system library manylinux wheels (numpy, onnxruntime, grpcio) expect.
PYTHON_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "libstdc++6")
_MIRRORS = (
    f"deb http://deb.debian.org/debian {PYTHON_SUITE} main",
    f"deb http://deb.debian.org/debian {PYTHON_SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {PYTHON_SUITE}-security main",
)
# No documentation, manual pages or translations in the base image (the copyright files stay).
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
# The variant `essential`: Debian's Essential packages and what PYTHON_PACKAGES need, no apt.
_MMDEBSTRAP = (
    "mmdebstrap",
    "--quiet",
    "--variant=essential",
    # /bin, /lib and /sbin as links into /usr, without the `usrmerge` package (and its Perl).
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    f"--include={','.join(PYTHON_PACKAGES)}",
    *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
)
_PYTHON_CONFIG = (
    "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "--env=LANG=C.UTF-8",
    "--cmd=python3",
)
# The RUN steps install from PyPI. They see the host's trust store (mounted, never in a layer),
# so that a TLS-intercepting proxy the host trusts is trusted by pip in the build too.
_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_BUSYBOX = "/bin/busybox"  # Debian's busybox-static


def _log(message: str) -> None:
    print(f"[modeldeploy images] {message}", file=sys.stderr, flush=True)


def images_dir() -> Path:
    return cache_dir() / "images"


def _buildah_storage() -> list[str]:
    return [
        "--root",
        str(images_dir() / "storage"),
        "--runroot",
        str(images_dir() / "run"),
        "--storage-driver",
        "overlay",
    ]


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs buildah on the project's own image storage."""
    if shutil.which("buildah") is None:
        raise RuntimeError("no `buildah`: install Debian's package (`make tools` does)")
    result = subprocess.run(
        ["buildah", *_buildah_storage(), *args], capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def _exists(reference: str) -> bool:
    return buildah("inspect", "--type", "image", reference, check=False).returncode == 0


def python_image() -> str:
    """The Debian-made Python base image's reference, tagged by its recipe."""
    recipe = json.dumps([_MIRRORS, _MMDEBSTRAP, _PYTHON_CONFIG]).encode()
    key = hashlib.sha256(recipe).hexdigest()[:12]
    return f"localhost/modeldeploy-python:3.11-{PYTHON_SUITE}-{key}"


def build_python_image() -> str:
    """Makes the base image unless it is in the storage already; returns its reference."""
    reference = python_image()
    if _exists(reference):
        return reference
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("no `mmdebstrap`: install Debian's package (`make tools` does)")
    started = time.monotonic()
    _log(f"making {reference} from Debian {PYTHON_SUITE}'s packages ...")
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images_dir()) as work:
        rootfs = Path(work) / "rootfs.tar"
        result = subprocess.run(
            [*_MMDEBSTRAP, PYTHON_SUITE, str(rootfs), *_MIRRORS],
            capture_output=True,
            text=True,
            env=os.environ | {"SOURCE_DATE_EPOCH": "0"},
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed:\n{result.stderr[-4000:]}")
        container = buildah("from", "scratch").stdout.strip()
        try:
            buildah("add", container, str(rootfs), "/")
            buildah("config", *_PYTHON_CONFIG, container)
            buildah("commit", "--quiet", container, reference)
        finally:
            buildah("rm", container, check=False)
    _log(f"made {reference} in {time.monotonic() - started:.0f}s")
    return reference


def pause_image() -> str:
    """The pod sandbox ("pause") image's reference, tagged by the busybox package it holds."""
    version = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Version}", "busybox-static"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not version:
        raise RuntimeError("no busybox-static: install Debian's package (`make tools` does)")
    tag = version.rpartition(":")[2].replace("+", "_").replace("~", "_")
    return f"localhost/modeldeploy-pause:busybox-{tag}"


def build_pause_image() -> str:
    """A node's pod sandbox image: no registry here serves the upstream `pause`, so it is made
    from Debian's static busybox, whose entry point sleeps until the sandbox is killed (as
    nobody, read-only). Returns its reference."""
    reference = pause_image()
    if _exists(reference):
        return reference
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("copy", "--chmod=0755", container, _BUSYBOX, "/bin/busybox")
        buildah(
            "config",
            '--entrypoint=["/bin/busybox", "sleep", "infinity"]',
            "--cmd=",
            "--user=65535:65535",
            container,
        )
        buildah("commit", "--quiet", container, reference)
    finally:
        buildah("rm", container, check=False)
    _log(f"made {reference}")
    return reference


def _context_patterns(root: Path) -> tuple[list[str], list[str]]:
    """The build context as `.dockerignore` selects it: `*`, then `!path` allowed back in, then
    patterns left out again."""
    included: list[str] = []
    excluded: list[str] = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "*":
            continue
        if line.startswith("!"):
            included.append(line[1:].rstrip("/"))
        else:
            excluded.append(line.removeprefix("**/"))
    return included, excluded


def context_files(root: Path) -> list[Path]:
    """Every file of the build context, relative to `root`, sorted."""
    included, excluded = _context_patterns(root)
    files: list[Path] = []
    for entry in included:
        path = root / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for candidate in candidates:
            relative = candidate.relative_to(root)
            if not any(
                fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in excluded
            ):
                files.append(relative)
    return sorted(files)


def context_key(root: Path, base: str) -> str:
    """A hash of everything an image is built from: the Dockerfile, the build context (lock files
    and sources, as `.dockerignore` selects them) and the base image's reference."""
    digest = hashlib.sha256(base.encode())
    for relative in ["Dockerfile", *map(str, context_files(root))]:
        digest.update(f"\0{relative}\0".encode())
        digest.update((root / relative).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built image: its target, its reference in the local storage, and what it weighs."""

    target: str
    reference: str
    image_id: str
    size: int  # bytes, uncompressed
    layers: tuple[int, ...]  # each layer's uncompressed size in bytes, base first

    @property
    def name(self) -> str:
        """The repository name without the `localhost/` prefix: `modeldeploy-runtime`."""
        return self.reference.removeprefix("localhost/").partition(":")[0]

    @property
    def tag(self) -> str:
        return self.reference.rpartition(":")[2]


def _layer_sizes(diff_ids: list[str]) -> tuple[int, ...]:
    """Each layer's uncompressed size, from the storage's layer index."""
    index = json.loads((images_dir() / "storage" / "overlay-layers" / "layers.json").read_text())
    sizes = {layer.get("diff-digest"): int(layer.get("diff-size", 0)) for layer in index}
    return tuple(sizes.get(diff_id, 0) for diff_id in diff_ids)


def describe(target: str, reference: str) -> Image:
    inspected = json.loads(buildah("inspect", "--type", "image", reference).stdout)
    layers = _layer_sizes(inspected["OCIv1"]["rootfs"]["diff_ids"])
    return Image(target, reference, inspected["FromImageID"], sum(layers), layers)


def image_config(reference: str) -> dict[str, object]:
    """The image's OCI configuration (`User`, `Env`, `Entrypoint`, `Cmd`, ...)."""
    config: dict[str, object] = json.loads(buildah("inspect", "--type", "image", reference).stdout)[
        "OCIv1"
    ]["config"]
    return config


def build(targets: tuple[str, ...] = TARGETS) -> dict[str, Image]:
    """Builds each target whose image is not in the storage yet, and the pod sandbox image a node
    needs (as `pause`); returns them all."""
    root = checkout.root()
    base = build_python_image()
    key = context_key(root, base)
    images: dict[str, Image] = {}
    for target in targets:
        reference = f"localhost/modeldeploy-{target}:{key}"
        if not _exists(reference):
            started = time.monotonic()
            _log(f"building {reference} ...")
            volumes = (
                [f"--volume={_CA_BUNDLE}:{_CA_BUNDLE}:ro"] if Path(_CA_BUNDLE).is_file() else []
            )
            result = subprocess.run(
                [
                    "buildah",
                    *_buildah_storage(),
                    "build",
                    # RUN steps in a chroot with the host's network: no CNI set-up is needed.
                    "--isolation=chroot",
                    "--network=host",
                    *volumes,
                    f"--build-arg=PYTHON_IMAGE={base}",
                    f"--target={target}",
                    f"--tag={reference}",
                    "--file",
                    str(root / "Dockerfile"),
                    str(root),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr)[-6000:]
                raise RuntimeError(f"building the {target} image failed:\n{output}")
            _log(f"built {reference} in {time.monotonic() - started:.0f}s")
        images[target] = describe(target, reference)
    _remove_all_but(base, *(image.reference for image in images.values()))
    images["pause"] = describe("pause", build_pause_image())
    return images


def _remove_all_but(*current: str) -> None:
    """Removes the images that earlier trees built (and earlier base recipes made): another tag
    of a repository in `current`."""
    repositories = {reference.rpartition(":")[0] for reference in current}
    listed = buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
    stale = [r for r in listed if r.rpartition(":")[0] in repositories and r not in current]
    if stale:
        buildah("rmi", *stale, check=False)


@contextmanager
def rootfs(reference: str) -> Iterator[Path]:
    """The image's root filesystem, mounted (as a buildah container of it) while the context
    lasts; runc runs it read-only."""
    container = buildah("from", "--pull-never", "--quiet", reference).stdout.strip()
    try:
        yield Path(buildah("mount", container).stdout.strip())
    finally:
        buildah("rm", container, check=False)
