"""The node agent of the local cluster's `pod-runner` node: real processes behind runtime pods.

`run-pods --namespace X` labels X so the CPU runtime pods created there are placed on this node
(see `network`); KWOK simulates every other pod. For each pod on the node the runner does what
the kubelet does, with local processes instead of containers: it gives the pod a network namespace
and an address on the cluster's bridge, runs the init containers in order and then the serving
container (the containers' own commands and arguments, volume mounts mapped to per-pod folders),
runs the startup, readiness and liveness probes as the pod spec says, and reports the pod's phase,
addresses, conditions (Initialized, ContainersReady, Ready) and container states with restart
counts. A container that exits, or fails its liveness probe, is restarted with the kubelet's
back-off. A deleted pod's containers get SIGTERM, then SIGKILL when its grace period is over, and
then the pod object is removed. So a pod is Ready only when its model answers, and Services
(kube-proxy) send traffic only to pods that are.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldeploy_contract import flags
from modeldeploy_dev import build, network
from modeldeploy_dev import cluster as localcluster

SELECTOR = "app.kubernetes.io/managed-by=modeldeploy"
_HEARTBEAT_S = 10
_BACKOFF_START_S = 10
_BACKOFF_MAX_S = 300
_MESSAGE_BYTES = 2048
_MESSAGE_LINES = 80
_SHUTDOWN_GRACE_S = 1.0


def _log(message: str) -> None:
    print(f"[modeldeploy pods] {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """The few API calls a node agent makes, under the local cluster's admin identity."""

    def __init__(self) -> None:
        state = localcluster.paths()
        self._base = f"https://127.0.0.1:{localcluster.APISERVER_PORT}"
        self._context = ssl.create_default_context(cafile=str(state.pki / "ca.crt"))
        self._context.load_cert_chain(str(state.pki / "admin.crt"), str(state.pki / "admin.key"))

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """The response's object; None for 404 (and 409 on create)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self._context, timeout=10) as response:
                result: dict[str, Any] = json.loads(response.read() or b"{}")
                return result
        except urllib.error.HTTPError as error:
            if error.code == 404 or (error.code == 409 and method == "POST"):
                return None
            detail = error.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {path}: {error.code} {detail}") from error

    def pods_on_node(self) -> list[dict[str, Any]]:
        selector = urllib.parse.quote(f"spec.nodeName={network.NODE_NAME}")
        result = self.call("GET", f"/api/v1/pods?fieldSelector={selector}") or {}
        items: list[dict[str, Any]] = result.get("items", [])
        return items


def serve_namespace(api: Api, namespace: str, timeout: float = 30) -> None:
    """Labels the namespace so its CPU runtime pods are placed on this runner's node; returns
    once the API server places them so (its admission caches follow the label a moment later)."""
    patch = {"metadata": {"labels": {network.NAMESPACE_LABEL: "true"}}}
    if api.call("PATCH", f"/api/v1/namespaces/{namespace}", patch,
                "application/merge-patch+json") is None:  # fmt: skip
        raise RuntimeError(f"namespace {namespace} does not exist")
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "placement-",
            "labels": {"app.kubernetes.io/managed-by": "modeldeploy"},
        },
        "spec": {"containers": [{"name": "probe", "image": "registry.invalid/none:1"}]},
    }
    deadline = time.monotonic() + timeout
    while True:
        try:
            pod = api.call("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", probe) or {}
            if pod.get("spec", {}).get("nodeSelector", {}).get(network.NAMESPACE_LABEL):
                return
        except RuntimeError:
            pass  # no default ServiceAccount yet in a new namespace
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"pods of namespace {namespace} are not placed on {network.NODE_NAME} after "
                f"{timeout:.0f}s: is the cluster's placement policy installed (`cluster up`)?"
            )
        time.sleep(0.2)


class _Node:
    """Keeps the runner's node Ready: its Ready condition and its Lease, renewed."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{network.NODE_NAME}"
        )

    def heartbeat(self) -> None:
        now = _now()
        node_path = f"/api/v1/nodes/{network.NODE_NAME}"
        if self._api.call("GET", node_path) is None:
            self._api.call("POST", "/api/v1/nodes", network.node())
        status = network.node()["status"] | {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "the modeldeploy pod runner is running",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ]
        }
        self._api.call(
            "PATCH", node_path + "/status", {"status": status},
            "application/strategic-merge-patch+json",
        )  # fmt: skip
        renew = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": network.NODE_NAME, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": network.NODE_NAME,
                "leaseDurationSeconds": 40,
                "renewTime": renew,
            },
        }
        if self._api.call("PATCH", self._lease_path, {"spec": {"renewTime": renew}},
                          "application/merge-patch+json") is None:  # fmt: skip
            self._api.call(
                "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease
            )


def _executable(command: list[str]) -> list[str]:
    """The container's command, found next to this Python (the venv has both entry points)."""
    local = Path(sys.executable).parent / command[0]
    return [str(local) if local.exists() else command[0], *command[1:]]


# Flags whose value is a URL path, not a file: never mapped onto a volume, even when it starts
# like a mount path (a route path `/models/x` is not under the `/models` volume).
_URL_PATH_FLAGS = (flags.flag(flags.PATH_PREFIX),)


def _mapped_args(args: list[str], mounts: dict[str, Path]) -> list[str]:
    mapped = []
    for i, arg in enumerate(args):
        url_path = (i > 0 and args[i - 1] in _URL_PATH_FLAGS) or arg.startswith(
            tuple(f"{flag}=" for flag in _URL_PATH_FLAGS)
        )
        mapped.append(arg if url_path else _mapped(arg, mounts))
    return mapped


def _mapped(value: str, mounts: dict[str, Path]) -> str:
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path) :]
    return value


def plan(
    pod: dict[str, Any], workdir: Path, pvc_root: Path, pod_ip: str
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
        argv = _executable(container["command"]) + _mapped_args(container.get("args", []), mounts)
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        tmp = mounts.get("/tmp", workdir / "volumes" / "tmp")
        env |= {
            flags.env(flags.HOST): pod_ip,
            flags.env(flags.CACHE_DIR): str(tmp / "modeldeploy-cache"),
            flags.env(flags.PVC_ROOT): str(pvc_root),
            "TMPDIR": str(tmp),
        }
        commands.append((argv, env))
    return commands


def prepare(
    pod: dict[str, Any], workdir: Path, pvc_root: Path, pod_ip: str
) -> list[tuple[list[str], dict[str, str]]]:
    """Makes the pod's volume folders under `workdir`; returns its `plan`."""
    for volume in pod["spec"].get("volumes", []):
        (workdir / "volumes" / volume["name"]).mkdir(parents=True, exist_ok=True)
    return plan(pod, workdir, pvc_root, pod_ip)


class _Addresses:
    """Pod addresses, one file each under the cluster's state folder, taken under a file lock
    so that two runners never hand out the same one."""

    def __init__(self) -> None:
        self._dir = localcluster.paths().root / "pod-addresses"
        self._dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self._dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def take(self, uid: str, hostname: str) -> str:
        with self._locked():
            used = set()
            for path in self._dir.iterdir():
                if path.name == ".lock":
                    continue
                owner = path.read_text()
                if owner == uid or not Path(f"/run/netns/{network.netns_name(owner)}").exists():
                    path.unlink()  # a pod gone without its runner releasing the address
                else:
                    used.add(path.name)
            address = network.free_address(used)
            (self._dir / address).write_text(uid)
            network.attach(uid, address, hostname)
            return address

    def release(self, uid: str, address: str) -> None:
        with self._locked():
            network.detach(uid)
            (self._dir / address).unlink(missing_ok=True)


@dataclass
class _Probe:
    spec: dict[str, Any]
    host: str
    ports: dict[str, int]
    successes: int = 0
    failures: int = 0
    due: float = 0.0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    def check(self) -> bool:
        """One httpGet, as the kubelet sends it: 2xx and 3xx pass, anything else fails."""
        get = self.spec["httpGet"]
        port = get["port"]
        port = self.ports[port] if isinstance(port, str) else int(port)
        url = f"{get.get('scheme', 'HTTP').lower()}://{self.host}:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=self.spec.get("timeoutSeconds", 1)) as r:
                return bool(200 <= r.status < 400)
        except urllib.error.HTTPError as error:
            return 200 <= error.code < 400
        except (urllib.error.URLError, OSError):
            return False

    def run(self) -> bool | None:
        """Probes once; True/False once the success/failure threshold is reached, else None."""
        self.due = time.monotonic() + self.period
        if self.check():
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.spec.get("successThreshold", 1):
                return True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.spec.get("failureThreshold", 3):
                return False
        return None


@dataclass
class _Container:
    spec: dict[str, Any]
    restarts: int = 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "PodInitializing"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec["name"],
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }


class _PodWorker:
    """One pod's life on this node, in a thread of its own."""

    def __init__(self, api: Api, addresses: _Addresses, pod: dict[str, Any], root: Path) -> None:
        self.api = api
        self.addresses = addresses
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.name = f"{meta['namespace']}/{meta['name']}"
        self.path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        self.workdir = root / meta["namespace"] / meta["name"]
        self.pvc_root = root / "pvc"
        self.deleting = threading.Event()
        self.deleted_in_api = False
        self.grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.process: subprocess.Popen[bytes] | None = None
        self.init = [_Container(c) for c in pod["spec"].get("initContainers", [])]
        self.main = [_Container(c) for c in pod["spec"]["containers"]]
        self.ip = ""
        self.phase = "Pending"
        self.started_at = _now()
        self.transitions: dict[str, tuple[bool, str]] = {}
        self.reported: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._live, name=self.name, daemon=True)

    def delete(self, grace: float | None) -> None:
        """The pod was deleted: stop it within `grace`, then remove it from the API."""
        if grace is not None:
            self.grace = min(self.grace, grace)
        self.deleted_in_api = True
        self.deleting.set()

    def shut_down(self) -> None:
        """The runner stops: so do the pod's processes, at once (no drain: nothing routes to a
        node without its agent for long), but the pod object stays, as when a node goes down."""
        self.grace = _SHUTDOWN_GRACE_S
        self.deleting.set()

    def _condition(self, kind: str, value: bool) -> dict[str, Any]:
        before = self.transitions.get(kind)
        if before is None or before[0] != value:
            self.transitions[kind] = (value, _now())
        return {
            "type": kind,
            "status": "True" if value else "False",
            "lastProbeTime": None,
            "lastTransitionTime": self.transitions[kind][1],
        }

    def report(self) -> None:
        initialized = all(c.state.get("terminated", {}).get("exitCode") == 0 for c in self.init)
        ready = initialized and all(c.ready for c in self.main)
        status = {
            "phase": self.phase,
            "hostIP": network.GATEWAY,
            "hostIPs": [{"ip": network.GATEWAY}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started_at,
            "conditions": [
                self._condition("Initialized", initialized),
                self._condition("ContainersReady", ready),
                self._condition("Ready", ready),
            ],
            "initContainerStatuses": [c.status() for c in self.init],
            "containerStatuses": [c.status() for c in self.main],
        }
        if status == self.reported:
            return
        try:
            self.api.call("PATCH", self.path + "/status", {"status": status},
                          "application/strategic-merge-patch+json")  # fmt: skip
            self.reported = status
        except RuntimeError as error:
            _log(f"{self.name}: status not written: {error}")

    def _live(self) -> None:
        try:
            self.ip = self.addresses.take(self.uid, self.pod["metadata"]["name"])
            _log(
                f"{self.name}: network namespace {network.netns_name(self.uid)}, address {self.ip}"
            )
            shutil.rmtree(self.workdir, ignore_errors=True)
            steps = prepare(self.pod, self.workdir, self.pvc_root, self.ip)
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
            self.report()
            init_steps, main_steps = steps[: len(self.init)], steps[len(self.init) :]
            if self._initialize(init_steps):
                self.phase = "Running"
                self._serve(self.main[0], main_steps[0])
        except Exception as error:  # a broken pod must not take the node agent down
            _log(f"{self.name}: {error!r}")
        finally:
            if self.ip:
                self.addresses.release(self.uid, self.ip)
            self.report()
            if self.deleted_in_api:
                body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
                try:
                    self.api.call("DELETE", self.path, body)
                except RuntimeError as error:
                    _log(f"{self.name}: not deleted: {error}")
            _log(f"{self.name}: stopped")

    def _start(self, container: _Container, step: tuple[list[str], dict[str, str]]) -> int:
        argv, env = step
        log = self.workdir / "logs" / f"{container.spec['name']}.log"
        with log.open("ab") as out:
            offset: int = out.tell()
            self.process = subprocess.Popen(
                network.in_namespace(network.netns_name(self.uid), argv),
                env=os.environ | env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        container.state = {"running": {"startedAt": _now()}}
        return offset

    def _finished(self, container: _Container, code: int, log_offset: int) -> None:
        """Records a terminated run; the message is its log's tail (FallbackToLogsOnError)."""
        if code < 0:
            code = 128 - code  # killed by a signal: the exit code a container runtime reports
        log = self.workdir / "logs" / f"{container.spec['name']}.log"
        with log.open("rb") as f:
            f.seek(log_offset)
            tail = f.read()[-_MESSAGE_BYTES:].decode(errors="replace")
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": container.state.get("running", {}).get("startedAt"),
            "finishedAt": _now(),
        }
        if code != 0:
            terminated["message"] = "\n".join(tail.splitlines()[-_MESSAGE_LINES:])
        container.state = {"terminated": terminated}
        container.ready = container.started = False

    def _back_off(self, container: _Container) -> bool:
        """Waits out the restart back-off (CrashLoopBackOff); False when the pod is deleted."""
        delay = min(_BACKOFF_START_S * 2 ** max(container.restarts - 1, 0), _BACKOFF_MAX_S)
        container.last_state = container.state
        container.restarts += 1
        container.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay}s restarting failed container="
                f"{container.spec['name']} pod={self.pod['metadata']['name']}",
            }
        }
        self.report()
        return not self.deleting.wait(delay)

    def _initialize(self, steps: list[tuple[list[str], dict[str, str]]]) -> bool:
        for container, step in zip(self.init, steps, strict=True):
            while True:
                if self.deleting.is_set():
                    return False
                offset = self._start(container, step)
                self.report()
                code = self._wait_or_stop()
                self._finished(container, code, offset)
                self.report()
                if code == 0:
                    break
                _log(f"{self.name}: init container {container.spec['name']} exited with {code}")
                if not self._back_off(container):
                    return False
        return True

    def _wait_or_stop(self) -> int:
        assert self.process is not None
        while self.process.poll() is None:
            if self.deleting.wait(0.2):
                return self._stop()
        return self.process.returncode

    def _stop(self) -> int:
        """SIGTERM, then SIGKILL once the grace period is over, as the kubelet does."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def _serve(self, container: _Container, step: tuple[list[str], dict[str, str]]) -> None:
        ports = {
            p["name"]: p["containerPort"] for p in container.spec.get("ports", []) if "name" in p
        }
        while not self.deleting.is_set():
            offset = self._start(container, step)
            probes: dict[str, _Probe] = {
                kind: _Probe(container.spec[kind], self.ip, ports)
                for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                if kind in container.spec
            }
            now = time.monotonic()
            for probe in probes.values():
                probe.due = now + probe.spec.get("initialDelaySeconds", 0)
            container.started = "startupProbe" not in probes
            self.report()
            code = self._probe_until_exit(container, probes)
            self._finished(container, code, offset)
            self.report()
            if self.deleting.is_set():
                return
            _log(f"{self.name}: {container.spec['name']} exited with {code}; restarting")
            if not self._back_off(container):
                return

    def _probe_until_exit(self, container: _Container, probes: dict[str, _Probe]) -> int:
        """Runs the probes on their schedules while the process lives; returns its exit code."""
        assert self.process is not None
        terminating_since: float | None = None
        while True:
            if self.process.poll() is not None:
                return self.process.returncode
            now = time.monotonic()
            if self.deleting.is_set() and terminating_since is None:
                terminating_since = now
                self.process.send_signal(signal.SIGTERM)
                self.report()
            if terminating_since is not None and now - terminating_since > self.grace:
                self.process.kill()
                return self.process.wait()
            startup = probes.get("startupProbe")
            if not container.started and startup is not None:
                if now >= startup.due:
                    verdict = startup.run()
                    if verdict is True:
                        container.started = True
                        for kind in ("readinessProbe", "livenessProbe"):
                            if kind in probes:
                                probes[kind].due = now + probes[kind].spec.get(
                                    "initialDelaySeconds", 0
                                )
                        self.report()
                    elif verdict is False and terminating_since is None:
                        _log(f"{self.name}: startup probe failed; restarting")
                        return self._stop()
            else:
                readiness = probes.get("readinessProbe")
                if readiness is not None and now >= readiness.due:
                    verdict = readiness.run()
                    if verdict is not None and verdict != container.ready:
                        container.ready = verdict
                        self.report()
                elif readiness is None and not container.ready:
                    container.ready = True
                    self.report()
                liveness = probes.get("livenessProbe")
                if (
                    liveness is not None
                    and terminating_since is None
                    and now >= liveness.due
                    and liveness.run() is False
                ):
                    _log(f"{self.name}: liveness probe failed; restarting")
                    return self._stop()
            active = (
                [startup]
                if startup is not None and not container.started
                else [p for kind, p in probes.items() if kind != "startupProbe"]
            )
            due = min((p.due for p in active), default=now + 1)
            self.deleting.wait(max(0.05, min(due - time.monotonic(), 0.5)))


def run(stop: threading.Event, namespace: str, interval: float = 1.0) -> None:
    """The node agent for `namespace`'s pods on the runner's node, until `stop` is set."""
    api = Api()
    if not network.is_set_up():
        raise RuntimeError("the local cluster's pod network is missing: run `cluster up` first")
    serve_namespace(api, namespace)
    node = _Node(api)
    addresses = _Addresses()
    root = build.cache_dir() / "pods"
    workers: dict[str, _PodWorker] = {}
    _log(f"node {network.NODE_NAME}: running the pods of namespace {namespace} (under {root})")
    last_beat = 0.0
    try:
        while not stop.is_set():
            try:
                if time.monotonic() - last_beat >= _HEARTBEAT_S:
                    node.heartbeat()
                    last_beat = time.monotonic()
                pods = {p["metadata"]["uid"]: p for p in api.pods_on_node()}
            except (RuntimeError, OSError) as error:
                _log(f"the API server did not answer: {error}")
                stop.wait(interval)
                continue
            for uid, pod in pods.items():
                meta = pod["metadata"]
                worker = workers.get(uid)
                if "deletionTimestamp" in meta:
                    if worker is not None:
                        worker.delete(meta.get("deletionGracePeriodSeconds"))
                    elif meta["namespace"] == namespace:
                        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
                        api.call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{meta['name']}",
                                 body)  # fmt: skip
                elif worker is None and meta["namespace"] == namespace:
                    worker = workers[uid] = _PodWorker(api, addresses, pod, root)
                    worker.thread.start()
            for uid in [uid for uid in workers if uid not in pods]:
                workers[uid].delete(None)
            for uid in [uid for uid, w in workers.items() if not w.thread.is_alive()]:
                del workers[uid]
            stop.wait(interval)
    finally:
        for worker in workers.values():
            worker.shut_down()
        for worker in workers.values():
            worker.thread.join(timeout=worker.grace + 5)


def main(namespace: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(stop, namespace)
    except KeyboardInterrupt:
        stop.set()
