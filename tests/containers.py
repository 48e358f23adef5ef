"""Runs a built image's root filesystem with runc, as a kubelet's runtime would run a restricted
pod's container: the root filesystem read-only, the image's (non-root) user, every capability
dropped, no privilege escalation, its own PID, mount, IPC, UTS and network namespaces (the network
namespace has only its loopback interface), and volumes bind-mounted from host folders.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mount:
    source: Path
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class Process:
    """What runs: the image's user, environment and working directory, and the arguments."""

    args: list[str]
    env: list[str]
    uid: int
    gid: int
    cwd: str = "/"


def process_of(config: dict[str, Any], args: list[str]) -> Process:
    """The image configuration's user, environment and working directory, running `args`."""
    uid, _, gid = str(config["User"]).partition(":")
    return Process(
        args, list(config["Env"]), int(uid), int(gid or uid), config.get("WorkingDir") or "/"
    )


def spec(
    base: dict[str, Any], rootfs: Path, process: Process, mounts: list[Mount]
) -> dict[str, Any]:
    """runc's default configuration (`runc spec`) made into a restricted container's."""
    config: dict[str, Any] = json.loads(json.dumps(base))
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"] |= {
        "terminal": False,
        "user": {"uid": process.uid, "gid": process.gid},
        "args": process.args,
        "env": process.env,
        "cwd": process.cwd,
        "noNewPrivileges": True,
        "capabilities": {kind: [] for kind in ("bounding", "effective", "permitted", "ambient")},
    }
    config["hostname"] = "container"
    config["mounts"] += [
        {
            "destination": mount.destination,
            "type": "bind",
            "source": str(mount.source),
            "options": ["rbind", "nosuid", "nodev", "ro" if mount.read_only else "rw"],
        }
        for mount in mounts
    ]
    return config


class Runc:
    """runc with its own state folder; each container gets a bundle folder under `work`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.state = work / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        template = work / "template"
        template.mkdir(exist_ok=True)
        subprocess.run(["runc", "spec", "--bundle", str(template)], check=True)
        self.base: dict[str, Any] = json.loads((template / "config.json").read_text())

    def _runc(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.state), *args]

    def _bundle(self, rootfs: Path, process: Process, mounts: list[Mount]) -> tuple[str, Path]:
        name = f"md-{uuid.uuid4().hex[:12]}"
        bundle = self.work / name
        bundle.mkdir()
        config = spec(self.base, rootfs, process, mounts)
        (bundle / "config.json").write_text(json.dumps(config))
        return name, bundle

    def run(
        self, rootfs: Path, process: Process, mounts: Sequence[Mount] = (), timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Runs the container to its end; returns its exit status and output."""
        name, bundle = self._bundle(rootfs, process, list(mounts))
        try:
            return subprocess.run(
                self._runc("run", "--bundle", str(bundle), name),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            subprocess.run(self._runc("delete", "--force", name), capture_output=True, check=False)

    @contextmanager
    def started(
        self, rootfs: Path, process: Process, mounts: Sequence[Mount] = ()
    ) -> Iterator[Running]:
        """A long-running container (a server), killed and deleted on exit."""
        name, bundle = self._bundle(rootfs, process, list(mounts))
        log = bundle / "output.log"
        with log.open("wb") as output:
            runner = subprocess.Popen(
                self._runc("run", "--bundle", str(bundle), name),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            yield Running(self, name, process, runner, log)
        finally:
            subprocess.run(self._runc("kill", name, "KILL"), capture_output=True, check=False)
            try:
                runner.wait(timeout=30)
            finally:
                subprocess.run(
                    self._runc("delete", "--force", name), capture_output=True, check=False
                )


@dataclass
class Running:
    runc: Runc
    name: str
    process: Process
    runner: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exec(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs `args` inside the container (its namespaces, user and environment)."""
        env = [f"--env={pair}" for pair in self.process.env]
        return subprocess.run(
            self.runc._runc(
                "exec", f"--user={self.process.uid}:{self.process.gid}", *env, self.name, *args
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def wait_until(self, args: list[str], timeout: float) -> None:
        """Runs `args` inside the container until it succeeds; fails with the container's output
        when the container ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.runner.poll() is None, f"the container ended:\n{self.output()[-4000:]}"
            if self.exec(args).returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"not ready after {timeout}s:\n{self.output()[-4000:]}"
            )
            time.sleep(0.5)
