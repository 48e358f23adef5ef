"""A real node for the local cluster: containerd with runc, the CNI reference plugins on the
cluster's bridge, and a kubelet, all built from their Go modules (`build.build_node`).

The kubelet registers the node `modeldeploy-node` (address 10.244.0.1, the bridge's own), tainted
so that only pods meant for it land there: pods in namespaces labelled
`modeldeploy.io/node=kubelet` get its toleration and node selector from a MutatingAdmissionPolicy.
Their containers are real: images pulled from the local registry (127.0.0.1:15000, plain HTTP),
security contexts, cgroup limits and volume mounts as the kubelet makes them. Pod addresses come
from the CNI bridge plugin's host-local range 10.244.0.0/16 on `mdbr0`, which `network` sets up
with the guard that keeps every cluster packet on the machine; kube-proxy routes Services to them.
Pods of other namespaces stay on KWOK's simulated nodes (`cluster`): scheduled and reported Ready,
with nothing running.

What this machine forces is written where it is configured: a cgroup v1 hierarchy and no
systemd (cgroupfs driver, `failCgroupV1: false`), no CAP_SYS_RESOURCE (containerd's
`restrict_oom_score_adj`), no reachable public registry (the pod sandbox image is the locally
built one, pulled from the local registry), no iptables (portmap's nftables backend).
Everything lives under the cluster's state folder, except what the kubelet writes whatever it is
told: /var/lib/kubelet/device-plugins, /var/log/pods and /var/log/containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modeldeploy_dev import build, network

NAME = "modeldeploy-node"
NAMESPACE_LABEL = "modeldeploy.io/node"
NAMESPACE_VALUE = "kubelet"
TAINT = {"key": NAMESPACE_LABEL, "value": NAMESPACE_VALUE, "effect": "NoSchedule"}
CGROUP_ROOT = "/modeldeploy-node"
_CNI_NETWORK = "modeldeploy"
API_SERVER_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
# The kubelet stops a pod's sandbox through CNI DEL; these tables stay behind empty.
_CNI_TABLES = (("inet", "cni_plugins_masquerade"), ("ip", "cni_hostport"))
_CGROUP_FS = Path("/sys/fs/cgroup")
# GPU pods stay on KWOK's simulated GPU nodes.
_USES_GPU = (
    "object.spec.containers.exists(c, has(c.resources) && has(c.resources.limits) && "
    "'nvidia.com/gpu' in c.resources.limits)"
)


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def registry_hosts(self) -> Path:
        return self.root / "certs.d"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"


def paths(cluster_root: Path) -> Paths:
    return Paths(cluster_root / "node")


def containerd_config(state: Paths, sandbox_image: str, registry: str) -> str:
    """containerd 2.x (config version 3): CRI with runc on cgroupfs, CNI from our folders, the
    local registry by plain HTTP, everything else under the node's folder."""
    node = build.node_binaries()
    return f"""version = 3
# Pulled images outlive the cluster: a cached image is not pulled again after `down`.
root = "{build.cache_dir() / "containerd"}"
state = "{state.root / "containerd" / "state"}"
[grpc]
  address = "{state.containerd_socket}"
[ttrpc]
  address = "{state.containerd_socket}.ttrpc"
[plugins.'io.containerd.shim.v1.manager']
  socket_dir = "{state.root / "s"}"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{sandbox_image}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{state.registry_hosts}"
[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: runc cannot lower a sandbox's oom_score_adj below containerd's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{node.cni_bin_dir}"]
    conf_dir = "{state.cni_conf_dir}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      # cgroup v1 and no systemd on this machine: cgroupfs.
      SystemdCgroup = false
      Root = "{state.root / "runc"}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def registry_hosts(registry: str) -> dict[str, str]:
    """containerd's hosts.toml per registry host: the local registry speaks plain HTTP."""
    return {registry: f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n'}  # fmt: skip


def cni_config(state: Paths) -> dict[str, Any]:
    """The bridge plugin on the cluster's bridge (which `network` owns: its address, forwarding
    on it alone and the guard), host-local addresses from our range, portmap for hostPorts."""
    return {
        "cniVersion": "1.0.0",
        "name": _CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.BRIDGE,
                # Not the gateway: the plugin would switch on forwarding for every interface.
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(state.root / "cni" / "networks"),
                    "ranges": [[{"subnet": network.POD_CIDR, "gateway": network.GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": network.GATEWAY}],
                },
            },
            {"type": "portmap", "backend": "nftables", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(state: Paths, pki: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.GATEWAY,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{state.containerd_socket}",
        # cgroup v1, no systemd: cgroupfs, and v1 allowed explicitly (1.35 refuses it otherwise).
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupRoot": CGROUP_ROOT,
        "failSwapOn": False,
        "resolvConf": str(state.resolv_conf),
        "clusterDomain": "cluster.local",
        "registerWithTaints": [TAINT],
        "serializeImagePulls": False,
        "maxPods": 110,
        # A shared development machine: its disk is not the node's to keep free.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
    }  # fmt: skip


def _make_cgroup_root() -> None:
    """The kubelet's cgroupRoot must exist in every v1 hierarchy (and runc's unified one);
    cpuset needs its cpus and mems filled before a task may join."""
    for hierarchy in _CGROUP_FS.iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue
        target = hierarchy / CGROUP_ROOT.lstrip("/")
        target.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            for name in ("cpuset.cpus", "cpuset.mems"):
                (target / name).write_text((hierarchy / name).read_text())


def _remove_cgroup_root() -> None:
    for hierarchy in _CGROUP_FS.iterdir():
        target = hierarchy / CGROUP_ROOT.lstrip("/")
        if not target.is_dir():
            continue
        # Leaves first; a cgroup with no tasks is removed by rmdir even though it lists files.
        for directory in sorted(
            (p for p in target.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            target.rmdir()


def prepare(state: Paths, pki: Path, registry: str, sandbox_image: str, port: int) -> None:
    """Writes every configuration file the node's daemons read; `sandbox_image` is the pod
    sandbox image's reference in the local registry at `registry` (host:port)."""
    state.root.mkdir(parents=True, exist_ok=True)
    state.containerd_config.write_text(containerd_config(state, sandbox_image, registry))
    for host, text in registry_hosts(registry).items():
        (state.registry_hosts / host).mkdir(parents=True, exist_ok=True)
        (state.registry_hosts / host / "hosts.toml").write_text(text)
    state.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (state.cni_conf_dir / "10-modeldeploy.conflist").write_text(json.dumps(cni_config(state)))
    # No DNS in this cluster: a lookup fails at once instead of waiting on a server pods cannot
    # reach.
    state.resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    state.kubelet_config.write_text(yaml.safe_dump(kubelet_config(state, pki, port, port + 1)))
    state.kubelet_root.mkdir(parents=True, exist_ok=True)
    _make_cgroup_root()


def containerd_argv(state: Paths) -> list[str]:
    return [str(build.node_binaries().containerd), "--config", str(state.containerd_config)]


def containerd_env() -> dict[str, str]:
    """containerd finds its shim on PATH, and the shim finds runc there."""
    node = build.node_binaries()
    return {"PATH": f"{node.containerd.parent}:{os.environ.get('PATH', '/usr/bin:/usr/sbin')}"}


def kubelet_argv(state: Paths, kubeconfig: Path) -> list[str]:
    return [
        str(build.node_binaries().kubelet),
        f"--config={state.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={state.kubelet_root}",
        f"--cert-dir={state.root / 'kubelet-pki'}",
        f"--hostname-override={NAME}",
        f"--node-ip={network.GATEWAY}",
        f"--node-labels={NAMESPACE_LABEL}={NAMESPACE_VALUE}",
    ]


def crictl(state: Paths, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    endpoint = f"unix://{state.containerd_socket}"
    result = subprocess.run(
        [str(build.node_binaries().crictl), "--runtime-endpoint", endpoint,
         "--image-endpoint", endpoint, "--timeout", "30s", *args],
        capture_output=True, text=True,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"crictl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def containerd_ready(state: Paths) -> bool:
    return state.containerd_socket.exists() and crictl(state, "info", check=False).returncode == 0


def remove_pods(state: Paths) -> None:
    """Stops and removes every pod sandbox through CRI (so CNI gives its addresses back)."""
    if containerd_ready(state):
        crictl(state, "rmp", "--all", "--force", check=False)


def _mounts_under(root: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            mounts.append(point)
    return mounts


def clean(state: Paths) -> None:
    """What the stopped daemons leave: mounts (volumes, netns, the kubelet's root bind mount,
    snapshots), the CNI plugins' empty nftables tables and our cgroups."""
    for _ in range(3):
        points = _mounts_under(state.root)
        if not points:
            break
        for point in sorted(points, key=lambda p: -len(p)):
            subprocess.run(["umount", "-l", point], capture_output=True)
        time.sleep(0.2)
    if shutil.which("nft"):
        for family, table in _CNI_TABLES:
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True)
    _remove_kubelet_chains()
    _remove_cgroup_root()


def _remove_kubelet_chains() -> None:
    """The kubelet adds its KUBE-* chains through iptables (nft backend) whether or not anything
    uses them: a canary, a hint, and a firewall against DNAT to 127.0.0.0/8. They go, and so
    does a table left with nothing else in it."""
    for command, family in (("iptables", "ip"), ("ip6tables", "ip6")):
        if shutil.which(command) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run([command, "-t", table, "-S"], capture_output=True, text=True)
            rules = listed.stdout.splitlines()
            for rule in rules:
                if (
                    rule.startswith("-A ")
                    and " -j KUBE-" in rule
                    and not rule[3:].startswith("KUBE-")
                ):
                    subprocess.run(
                        [command, "-t", table, "-D", *rule[3:].split()], capture_output=True
                    )
            for rule in rules:
                if rule.startswith("-N KUBE-"):
                    subprocess.run([command, "-t", table, "-F", rule[3:]], capture_output=True)
                    subprocess.run([command, "-t", table, "-X", rule[3:]], capture_output=True)
            left = subprocess.run([command, "-t", table, "-S"], capture_output=True, text=True)
            if all(
                line.startswith("-P ") and line.endswith(" ACCEPT")
                for line in left.stdout.splitlines()
            ):
                subprocess.run(["nft", "delete", "table", family, table], capture_output=True)


def placement_policy() -> list[dict[str, Any]]:
    """Every pod created in a namespace labelled `modeldeploy.io/node=kubelet` goes to the real
    node: its toleration and node selector are added at admission."""
    api = "admissionregistration.k8s.io/v1beta1"
    name = "modeldeploy-node"
    toleration = json.dumps(TAINT | {"operator": "Equal"})
    selector = json.dumps({NAMESPACE_LABEL: NAMESPACE_VALUE})
    key = f"jsonpatch.escapeKey('{NAMESPACE_LABEL}')"
    names = json.dumps(list(API_SERVER_NAMES))
    alias = f"{{'ip': dyn('{network.kubernetes_service_address()}'), 'hostnames': dyn({names})}}"
    patch = (
        "(has(object.spec.tolerations) ? "
        f"[JSONPatch{{op: 'add', path: '/spec/tolerations/-', value: {toleration}}}] : "
        f"[JSONPatch{{op: 'add', path: '/spec/tolerations', value: [{toleration}]}}]) + "
        "(has(object.spec.nodeSelector) ? "
        f"[JSONPatch{{op: 'add', path: '/spec/nodeSelector/' + {key}, "
        f"value: '{NAMESPACE_VALUE}'}}] : "
        f"[JSONPatch{{op: 'add', path: '/spec/nodeSelector', value: {selector}}}]) + "
        # No cluster DNS here: the API server's Service names resolve through /etc/hosts (kopf
        # calls https://kubernetes.default.svc in a pod).
        "(has(object.spec.hostAliases) ? "
        f"[JSONPatch{{op: 'add', path: '/spec/hostAliases/-', value: {alias}}}] : "
        f"[JSONPatch{{op: 'add', path: '/spec/hostAliases', value: [{alias}]}}])"
    )
    return [
        {
            "apiVersion": api,
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ]
                },
                "matchConditions": [{"name": "no-gpu", "expression": f"!({_USES_GPU})"}],
                "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": patch}}],
            },
        },
        {
            "apiVersion": api,
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: NAMESPACE_VALUE}}
                },
            },
        },
    ]
