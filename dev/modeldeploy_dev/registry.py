"""The local image registry: distribution v3 (built from its Go module) on a loopback address.

It holds the images `images.build` makes, pushed by tag; a node pulls them by tag or by digest as
from any registry. Its data stays in the cache between runs (`~/.cache/modeldeploy/registry/`),
so a tag already there is not pushed again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from modeldeploy_dev import build, images

HOST = "127.0.0.1"
PORT = int(os.environ.get("MODELDEPLOY_REGISTRY_PORT", "15000"))
ADDRESS = f"{HOST}:{PORT}"
# What a pull asks for: buildah pushes OCI manifests; Docker's are accepted too.
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def _log(message: str) -> None:
    print(f"[modeldeploy registry] {message}", file=sys.stderr, flush=True)


def _root() -> Path:
    return build.cache_dir() / "registry"


def _pid_file() -> Path:
    return _root() / "registry.pid"


def _config() -> str:
    return (
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: '{_root() / 'data'}'}}}}\n"
        f"http: {{addr: '{ADDRESS}'}}\n"
    )


def is_running() -> bool:
    try:
        with urllib.request.urlopen(f"http://{ADDRESS}/v2/", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def up() -> str:
    """Starts the registry unless it answers already; returns its address (`host:port`)."""
    if is_running():
        return ADDRESS
    binary = build.build_registry()
    _root().mkdir(parents=True, exist_ok=True)
    config = _root() / "config.yml"
    config.write_text(_config())
    log = _root() / "registry.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [str(binary), "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _pid_file().write_text(str(process.pid))
    deadline = time.monotonic() + 30
    while not is_running():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the registry did not come up on {ADDRESS}; {log}:\n{tail}")
        time.sleep(0.2)
    _log(f"serving on {ADDRESS} (data in {_root() / 'data'})")
    return ADDRESS


def down() -> None:
    """Stops the registry started by `up` (its data stays)."""
    try:
        pid = int(_pid_file().read_text())
    except (FileNotFoundError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    _pid_file().unlink(missing_ok=True)


def manifest_digest(repository: str, reference: str) -> str | None:
    """The digest the registry serves for `repository:reference` (a tag or a digest), or None
    when it has no such manifest."""
    request = urllib.request.Request(
        f"http://{ADDRESS}/v2/{repository}/manifests/{reference}",
        method="HEAD",
        headers={"Accept": MANIFEST_TYPES},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            digest = response.headers.get("Docker-Content-Digest")
            return str(digest) if digest else None
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def push(image: images.Image) -> str:
    """Pushes the image by its tag unless the registry has that tag; returns
    `ADDRESS/name@sha256:...`, the reference that pins it."""
    digest = manifest_digest(image.name, image.tag)
    if digest is None:
        started = time.monotonic()
        with tempfile.NamedTemporaryFile(mode="r") as digest_file:
            images.buildah(
                "push",
                "--quiet",
                "--tls-verify=false",
                f"--digestfile={digest_file.name}",
                image.reference,
                f"docker://{ADDRESS}/{image.name}:{image.tag}",
            )
            digest = digest_file.read().strip()
        _log(f"pushed {image.name}:{image.tag} in {time.monotonic() - started:.0f}s")
    return f"{ADDRESS}/{image.name}@{digest}"
