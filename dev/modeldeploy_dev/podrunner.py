"""Runs real processes behind the local cluster's simulated runtime pods.

KWOK schedules pods and marks them Running, but runs nothing. For every running pod of a
ModelDeployment this runner executes the pod's own init containers and then its serving container,
as local processes with the containers' commands and arguments, bound to the pod's IP (KWOK hands
out loopback addresses). So clients of the pod IPs, a Prometheus scrape of them and the
operator's direct scrape all reach a real model server (Services do not: the API server refuses
loopback addresses as endpoints). Volume mount paths are mapped to per-pod
folders; when a pod goes away its process gets SIGTERM, as the kubelet would send.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldeploy_contract import flags
from modeldeploy_dev import build
from modeldeploy_dev import cluster as localcluster

SELECTOR = "app.kubernetes.io/managed-by=modeldeploy"


def _log(message: str) -> None:
    print(f"[modeldeploy pods] {message}", file=sys.stderr, flush=True)


@dataclass
class _RunningPod:
    name: str
    stop: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None


def _executable(command: list[str]) -> list[str]:
    """The container's command, found next to this Python (the venv has both entry points)."""
    local = Path(sys.executable).parent / command[0]
    return [str(local) if local.exists() else command[0], *command[1:]]


def _mapped(value: str, mounts: dict[str, Path]) -> str:
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path) :]
    return value


def plan(
    pod: dict[str, Any], workdir: Path, pvc_root: Path
) -> list[tuple[list[str], dict[str, str]]]:
    """The commands (argv, extra environment) that stand in for a pod's containers, in order."""
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    commands = []
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                mounts[mount["mountPath"]] = pvc_root / volume["persistentVolumeClaim"]["claimName"]
            else:
                mounts[mount["mountPath"]] = workdir / "volumes" / mount["name"]
        argv = _executable(container["command"]) + [
            _mapped(arg, mounts) for arg in container.get("args", [])
        ]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        tmp = mounts.get("/tmp", workdir / "volumes" / "tmp")
        env |= {
            flags.env(flags.HOST): pod["status"]["podIP"],
            flags.env(flags.CACHE_DIR): str(tmp / "modeldeploy-cache"),
            flags.env(flags.PVC_ROOT): str(pvc_root),
            "TMPDIR": str(tmp),
        }
        commands.append((argv, env))
    return commands


def prepare(
    pod: dict[str, Any], workdir: Path, pvc_root: Path
) -> list[tuple[list[str], dict[str, str]]]:
    """Makes the pod's volume folders under `workdir`; returns its `plan`."""
    for volume in pod["spec"].get("volumes", []):
        (workdir / "volumes" / volume["name"]).mkdir(parents=True, exist_ok=True)
    return plan(pod, workdir, pvc_root)


def _run_pod(pod: dict[str, Any], running: _RunningPod, workdir: Path, pvc_root: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    steps = prepare(pod, workdir, pvc_root)
    with (workdir / "pod.log").open("ab") as log:
        for index, (argv, env) in enumerate(steps):
            if running.stop.is_set():
                return
            process = subprocess.Popen(
                argv,
                env=os.environ | env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            running.process = process
            code = process.wait()
            is_init = index < len(steps) - 1
            if is_init and code != 0:
                _log(f"{running.name}: init step {argv[1]} failed (exit {code}); see {workdir}")
                return
            if not is_init:
                _log(f"{running.name}: server exited with {code}")


def _pods(namespace: str | None) -> list[dict[str, Any]]:
    where = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    out = localcluster.kubectl("get", "pods", *where, "-l", SELECTOR, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def run(stop: threading.Event, namespace: str | None = None, interval: float = 1.0) -> None:
    """Keeps one local process tree per running runtime pod until `stop` is set."""
    root = build.cache_dir() / "pods"
    pvc_root = root / "pvc"
    running: dict[str, _RunningPod] = {}
    _log(f"running the runtime pods of the local cluster (work folders under {root})")
    try:
        while not stop.is_set():
            live = {}
            for pod in _pods(namespace):
                meta = pod["metadata"]
                if pod.get("status", {}).get("podIP") and "deletionTimestamp" not in meta:
                    live[meta["uid"]] = pod
            for uid in set(running) - set(live):
                _terminate(running.pop(uid))
            for uid in set(live) - set(running):
                pod = live[uid]
                name = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                entry = running[uid] = _RunningPod(name=name)
                workdir = root / pod["metadata"]["namespace"] / pod["metadata"]["name"]
                threading.Thread(
                    target=_run_pod, args=(pod, entry, workdir, pvc_root), daemon=True
                ).start()
                _log(f"{name}: starting on {pod['status']['podIP']}")
            stop.wait(interval)
    finally:
        for entry in running.values():
            _terminate(entry)


def _terminate(entry: _RunningPod) -> None:
    entry.stop.set()
    process = entry.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    _log(f"{entry.name}: stopped")


def main(namespace: str | None = None) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(stop, namespace)
    except KeyboardInterrupt:
        stop.set()
