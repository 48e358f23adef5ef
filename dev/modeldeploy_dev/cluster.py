"""A real local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, KWOK (which simulates nodes, so pods get scheduled and report Ready without
running), a real node (`node`: containerd and a kubelet, whose pods are containers on the bridge
that `network` sets up) and kube-proxy (nftables), which routes Services to them.

TLS everywhere, RBAC on, every component under its own identity. The processes run detached and
outlive the command that started them; their pids, logs and data live in the state folder.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modeldeploy_dev import build, netpol, network, node, pki

APISERVER_PORT = int(os.environ.get("MODELDEPLOY_CLUSTER_PORT", "16443"))
_ETCD_CLIENT_PORT = APISERVER_PORT - 4000
_ETCD_PEER_PORT = _ETCD_CLIENT_PORT + 1
_ETCD_METRICS_PORT = _ETCD_CLIENT_PORT + 2
_CONTROLLER_MANAGER_PORT = APISERVER_PORT + 1
_SCHEDULER_PORT = APISERVER_PORT + 2
_KWOK_PORT = APISERVER_PORT + 3
_KUBE_PROXY_METRICS_PORT = APISERVER_PORT + 10
_KUBE_PROXY_HEALTHZ_PORT = APISERVER_PORT + 11
_KUBELET_PORT = APISERVER_PORT + 20  # and its healthz on the next port
# The pods KWOK simulates get loopback addresses: nothing runs behind them (the scale benchmark
# answers for them on 0.0.0.0). The real node's pods get real ones from network.POD_CIDR.
SIMULATED_POD_CIDR = "127.64.0.0/16"
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kube-proxy",
)
# The real node's daemons, started before kube-proxy (which takes its address from the Node).
NODE_COMPONENTS = ("containerd", "kubelet", "kube-router")

GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1")
CPU_NODES = ("kwok-cpu-0", "kwok-cpu-1")

_AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # Writes are what the tests count; reads and the components' own leases are noise.
        {"level": "None", "resources": [{"group": "coordination.k8s.io"}]},
        {
            "level": "None",
            "verbs": ["get", "list", "watch"],
            "userGroups": ["system:serviceaccounts:kube-system"],
        },
        # Except the lists and watches of the service accounts tests run operators as: who
        # watched is compared with who wrote (one identity for kopf and the operator's client).
        {
            "level": "Metadata",
            "verbs": ["list", "watch"],
            "userGroups": ["system:serviceaccounts"],
        },
        {"level": "None", "verbs": ["get", "list", "watch"]},
        {"level": "Metadata"},
    ],
}


def _log(message: str) -> None:
    print(f"[modeldeploy cluster] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "audit.log"

    def log(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    def pid(self, component: str) -> Path:
        return self.root / "run" / f"{component}.pid"

    def component_kubeconfig(self, stem: str) -> Path:
        return self.root / f"{stem}.kubeconfig"


def paths() -> Paths:
    return Paths(build.cache_dir() / "cluster")


def kubeconfig_path() -> Path:
    return paths().kubeconfig


def _write_kubeconfig(target: Path, state: Paths, client: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "modeldeploy-local",
                "cluster": {
                    "server": f"https://127.0.0.1:{APISERVER_PORT}",
                    "certificate-authority": str(state.pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": client,
                "user": {
                    "client-certificate": str(state.pki / f"{client}.crt"),
                    "client-key": str(state.pki / f"{client}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "modeldeploy-local",
                "context": {"cluster": "modeldeploy-local", "user": client},
            }
        ],
        "current-context": "modeldeploy-local",
    }
    target.write_text(yaml.safe_dump(config))
    target.chmod(0o600)


def _pid_alive(path: Path) -> bool:
    try:
        os.kill(int(path.read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _https_ok(state: Paths, url: str) -> bool:
    context = ssl.create_default_context(cafile=str(state.pki / "ca.crt"))
    context.load_cert_chain(str(state.pki / "admin.crt"), str(state.pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(
    what: str, check: Callable[[], bool], timeout: float, state: Paths, component: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _pid_alive(state.pid(component)):
            break
        time.sleep(0.3)
    tail = state.log(component).read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{what} did not come up; last lines of {state.log(component)}:\n{tail}")


def _start(
    state: Paths, component: str, argv: list[str], env: dict[str, str] | None = None
) -> None:
    state.log(component).parent.mkdir(parents=True, exist_ok=True)
    state.pid(component).parent.mkdir(parents=True, exist_ok=True)
    with state.log(component).open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else os.environ | env,
        )
    state.pid(component).write_text(str(process.pid))


def is_running() -> bool:
    state = paths()
    return all(_pid_alive(state.pid(c)) for c in COMPONENTS + NODE_COMPONENTS) and _https_ok(
        state, f"https://127.0.0.1:{APISERVER_PORT}/readyz"
    )


def run_kubectl(
    kubeconfig: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the locally built kubectl with this kubeconfig, capturing its output."""
    return subprocess.run(
        [str(build.binaries().kubectl), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
    )


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    """Runs kubectl against the local cluster; returns its stdout, raises when it fails."""
    result = run_kubectl(kubeconfig_path(), *args, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _node(name: str, gpu: bool) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    # Room for the scale benchmark's thousands of pods: these nodes run nothing.
    capacity = {"cpu": "64", "memory": "256Gi", "pods": "2500", "ephemeral-storage": "1Ti"}
    spec: dict[str, object] = {}
    if gpu:
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": GPU_PRODUCT}
        capacity["nvidia.com/gpu"] = "8"
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _apply_nodes() -> None:
    nodes = [_node(n, gpu=False) for n in CPU_NODES] + [_node(n, gpu=True) for n in GPU_NODES]
    kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
    )
    for simulated in nodes:
        # A Node's status is a subresource: apply sets it at creation only.
        patch = json.dumps({"status": simulated["status"]})
        name = simulated["metadata"]["name"]
        kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", patch)
    names = [node["metadata"]["name"] for node in nodes]
    kubectl("wait", "--for=condition=Ready", *(f"node/{n}" for n in names), "--timeout=120s")


def _etcd_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    p = state.pki
    return [
        str(binaries.etcd),
        "--name=modeldeploy",
        f"--data-dir={state.root / 'etcd'}",
        f"--listen-client-urls=https://127.0.0.1:{_ETCD_CLIENT_PORT}",
        f"--advertise-client-urls=https://127.0.0.1:{_ETCD_CLIENT_PORT}",
        f"--listen-peer-urls=http://127.0.0.1:{_ETCD_PEER_PORT}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{_ETCD_PEER_PORT}",
        f"--initial-cluster=modeldeploy=http://127.0.0.1:{_ETCD_PEER_PORT}",
        f"--listen-metrics-urls=http://127.0.0.1:{_ETCD_METRICS_PORT}",
        f"--cert-file={p / 'etcd.crt'}",
        f"--key-file={p / 'etcd.key'}",
        f"--trusted-ca-file={p / 'ca.crt'}",
        "--client-cert-auth",
        # A throwaway local cluster: durability is worth less than speed here.
        "--unsafe-no-fsync",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def _apiserver_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    p = state.pki
    return [
        str(binaries.kube_apiserver),
        f"--etcd-servers=https://127.0.0.1:{_ETCD_CLIENT_PORT}",
        f"--etcd-cafile={p / 'ca.crt'}",
        f"--etcd-certfile={p / 'apiserver-etcd-client.crt'}",
        f"--etcd-keyfile={p / 'apiserver-etcd-client.key'}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={APISERVER_PORT}",
        f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--service-account-key-file={p / 'service-account.pub'}",
        f"--service-account-signing-key-file={p / 'service-account.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        # Node: the real node's kubelet gets what its pods need and no more (with NodeRestriction).
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        # No DNS here: the kubelet's Hostname address would not resolve.
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-cluster-ip-range={network.SERVICE_CIDR}",
        # The real node takes the pods of the namespaces labelled for it (node.placement_policy).
        "--feature-gates=MutatingAdmissionPolicy=true",
        "--runtime-config=admissionregistration.k8s.io/v1beta1=true",
        # The "kubernetes" Service endpoints cannot point at a loopback address.
        "--endpoint-reconciler-type=none",
        f"--audit-policy-file={state.root / 'audit-policy.yaml'}",
        f"--audit-log-path={state.audit_log}",
        "--audit-log-format=json",
        "--audit-log-maxsize=200",
        "--audit-log-mode=batch",
        "--audit-log-batch-max-wait=1s",
        "--max-requests-inflight=1000",
        "--max-mutating-requests-inflight=500",
    ]


def _controller_manager_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    p = state.pki
    return [
        str(binaries.kube_controller_manager),
        f"--kubeconfig={state.component_kubeconfig('controller-manager')}",
        f"--authentication-kubeconfig={state.component_kubeconfig('controller-manager')}",
        f"--authorization-kubeconfig={state.component_kubeconfig('controller-manager')}",
        "--bind-address=127.0.0.1",
        f"--secure-port={_CONTROLLER_MANAGER_PORT}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={p / 'service-account.key'}",
        f"--root-ca-file={p / 'ca.crt'}",
        f"--cluster-signing-cert-file={p / 'ca.crt'}",
        f"--cluster-signing-key-file={p / 'ca.key'}",
        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
        "--concurrent-deployment-syncs=20",
        "--concurrent-replicaset-syncs=20",
        "--concurrent-gc-syncs=40",
        "--kube-api-qps=400",
        "--kube-api-burst=800",
    ]


def _scheduler_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    return [
        str(binaries.kube_scheduler),
        f"--kubeconfig={state.component_kubeconfig('scheduler')}",
        f"--authentication-kubeconfig={state.component_kubeconfig('scheduler')}",
        f"--authorization-kubeconfig={state.component_kubeconfig('scheduler')}",
        "--bind-address=127.0.0.1",
        f"--secure-port={_SCHEDULER_PORT}",
        "--leader-elect=false",
        "--kube-api-qps=400",
        "--kube-api-burst=800",
    ]


def _kwok_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    return [
        str(binaries.kwok),
        f"--kubeconfig={state.component_kubeconfig('kwok')}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--cidr={SIMULATED_POD_CIDR}",
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{_KWOK_PORT}",
        "--node-lease-duration-seconds=40",
    ]


def _kube_proxy_argv(state: Paths, binaries: build.Binaries) -> list[str]:
    return [
        str(binaries.kube_proxy),
        f"--kubeconfig={state.component_kubeconfig('kube-proxy')}",
        "--proxy-mode=nftables",
        f"--hostname-override={node.NAME}",
        f"--bind-address={network.GATEWAY}",
        f"--cluster-cidr={network.POD_CIDR}",
        f"--nodeport-addresses={network.GATEWAY}/32",
        f"--metrics-bind-address=127.0.0.1:{_KUBE_PROXY_METRICS_PORT}",
        f"--healthz-bind-address=127.0.0.1:{_KUBE_PROXY_HEALTHZ_PORT}",
        # This machine's conntrack settings are not the dev cluster's to change.
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
    ]


_ARGV: dict[str, Callable[[Paths, build.Binaries], list[str]]] = {
    "etcd": _etcd_argv,
    "kube-apiserver": _apiserver_argv,
    "kube-controller-manager": _controller_manager_argv,
    "kube-scheduler": _scheduler_argv,
    "kwok": _kwok_argv,
    "kube-proxy": _kube_proxy_argv,
}


def _start_component(state: Paths, binaries: build.Binaries, component: str) -> None:
    """Starts one component; etcd and the API server are waited for, as the others need them."""
    if component == "kube-apiserver":
        (state.root / "audit-policy.yaml").write_text(yaml.safe_dump(_AUDIT_POLICY))
    _start(state, component, _ARGV[component](state, binaries))
    if component == "etcd":
        etcd_health = f"http://127.0.0.1:{_ETCD_METRICS_PORT}/health"
        _wait("etcd", lambda: _http_ok(etcd_health), 60, state, "etcd")
    elif component == "kube-apiserver":
        readyz = f"https://127.0.0.1:{APISERVER_PORT}/readyz"
        _wait("kube-apiserver", lambda: _https_ok(state, readyz), 180, state, "kube-apiserver")


def _start_control_plane(state: Paths, binaries: build.Binaries) -> None:
    """etcd, then the API server, then the components that talk to it, each once the one before
    answers; the real node before kube-proxy, which waits for its Node's address."""
    for component in COMPONENTS:
        if component == "kube-proxy":
            _start_node(state)
        _start_component(state, binaries, component)


def stop_component(component: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Stops one component of the running cluster and waits until it is gone; the others keep
    running. SIGKILL (the default) is a crash: the fault-injection tests use it."""
    _stop_processes(paths(), (component,), sig)


def start_component(component: str) -> None:
    """Starts a stopped component again, as `up` does; returns once it answers (etcd, the API
    server). A running one is left alone."""
    state = paths()
    if not _pid_alive(state.pid(component)):
        _start_component(state, build.binaries(), component)


def up() -> Paths:
    """Brings the cluster up (building binaries first if needed); a running one is reused."""
    from modeldeploy_dev import ingress

    started = time.monotonic()
    binaries = build.build_all()
    state = paths()
    if is_running():
        _log(f"already running; kubeconfig: {state.kubeconfig}")
        _apply_nodes()
        ingress.up(state, binaries)
        return state
    ingress.down(state)
    _stop_node(state)
    _stop_processes(state)
    network.setup(APISERVER_PORT)
    if not all((state.pki / f"{stem}.crt").is_file() for stem, _, _ in pki.CLIENTS):
        # An older cluster's PKI lacks a newer component's identity: start that cluster afresh.
        subprocess.run(["rm", "-rf", str(state.root)], check=True)
        pki.generate(state.pki)
        _write_kubeconfig(state.kubeconfig, state, "admin")
        for stem in ("controller-manager", "scheduler", "kwok", "kube-proxy", "traefik", "node"):
            _write_kubeconfig(state.component_kubeconfig(stem), state, stem)
    _log(
        "starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, the node, "
        "kube-proxy"
    )
    _start_control_plane(state, binaries)
    _apply_nodes()
    healthz = f"http://127.0.0.1:{_KUBE_PROXY_HEALTHZ_PORT}/healthz"
    _wait("kube-proxy", lambda: _http_ok(healthz), 60, state, "kube-proxy")
    _log(f"starting traefik; Ingresses and the Gateway are served on {ingress.url()}")
    ingress.up(state, binaries)
    _log(f"up in {time.monotonic() - started:.1f}s; kubeconfig: {state.kubeconfig}")
    return state


def _start_node(state: Paths) -> None:
    """containerd, then the kubelet (which registers the node); the pod sandbox image is pushed
    to the local registry first, which the node pulls it from."""
    from modeldeploy_dev import images, registry

    started = time.monotonic()
    missing = netpol.required_tools()
    if missing:
        raise RuntimeError(
            f"the node's NetworkPolicy enforcer needs {' and '.join(missing)} (Debian: iptables, "
            "ipset; `make tools` installs them)"
        )
    build.build_node()
    build.build_kube_router()
    address = registry.up()
    sandbox = registry.push(images.describe("pause", images.build_pause_image()))
    node_state = node.paths(state.root)
    node.prepare(node_state, state.pki, address, sandbox, _KUBELET_PORT)
    _log("starting the node: containerd and the kubelet")
    _start(state, "containerd", node.containerd_argv(node_state), env=node.containerd_env())
    _wait("containerd", lambda: node.containerd_ready(node_state), 60, state, "containerd")
    policy = {"apiVersion": "v1", "kind": "List", "items": node.placement_policy()}
    kubectl("apply", "-f", "-", input=json.dumps(policy))
    kubelet = node.kubelet_argv(node_state, state.component_kubeconfig("node"))
    _start(state, "kubelet", kubelet)

    def node_ready() -> bool:
        result = run_kubectl(state.kubeconfig, "get", "node", node.NAME, "-o", "json")
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    _wait("the kubelet's node", node_ready, 120, state, "kubelet")
    # NetworkPolicy: kube-router's policy controller, once the node it enforces on is registered.
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": netpol.rbac()}))  # fmt: skip
    _write_kubeconfig(state.component_kubeconfig("kube-router"), state, "kube-router")
    _start(state, "kube-router", netpol.argv(state.component_kubeconfig("kube-router"), node.NAME))
    _wait("kube-router", netpol.ready, 60, state, "kube-router")
    _log(f"node {node.NAME} Ready, NetworkPolicy enforced, in {time.monotonic() - started:.1f}s")


def _stop_node(state: Paths) -> None:
    """kube-router and its rules first; then the kubelet, then every pod through CRI (so CNI
    releases their addresses), then containerd; then what they leave mounted, in nftables and in
    cgroups."""
    node_state = node.paths(state.root)
    if not node_state.root.is_dir():
        return
    _stop_processes(state, ("kube-router",))
    # Before the kubelet's chains go: those are removed by a looser rule that would leave
    # kube-router's ipsets referenced and so undeletable.
    netpol.clean()
    _stop_processes(state, ("kubelet",))
    node.remove_pods(node_state)
    _stop_processes(state, ("containerd",))
    node.clean(node_state)


def _stop_processes(
    state: Paths, components: tuple[str, ...] = COMPONENTS, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Signals the components (last started first), then waits up to 15 s for them to go and
    kills what is left."""
    alive: list[int] = []
    for component in reversed(components):
        pid_file = state.pid(component)
        if _pid_alive(pid_file):
            pid = int(pid_file.read_text())
            os.killpg(pid, sig)
            alive.append(pid)
        pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + 15
    for pid in alive:
        while time.monotonic() < deadline and _process_exists(pid):
            time.sleep(0.1)
        if _process_exists(pid):
            os.killpg(pid, signal.SIGKILL)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def down() -> None:
    """Stops every component and removes the cluster's data, so the next `up` starts clean."""
    from modeldeploy_dev import ingress

    state = paths()
    ingress.down(state)
    _stop_node(state)
    _stop_processes(state)
    network.teardown()
    if state.root.is_dir():
        subprocess.run(["rm", "-rf", str(state.root)], check=True)
    _log("down")
