"""Builds the local control plane's binaries from Go modules into a cache outside the repository.

Nothing is downloaded prebuilt: kube-apiserver, kube-controller-manager, kube-scheduler,
kube-proxy, kubectl and etcd come from the wrapper module in `tools/controlplane` (which pins
k8s.io/kubernetes and its staging modules), kwok and helm from `go install` at pinned versions,
Traefik from the wrapper module in `tools/traefik`, next to the Gateway API CRDs it implements,
copied from the `sigs.k8s.io/gateway-api` module in the Go module cache. Each set lands in a folder
named after its versions, written to a temporary folder first and renamed when complete, so an
interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from modeldeploy_dev import checkout

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"  # the etcd that k8s.io/kubernetes v1.34.4 itself requires
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.21.4"
# v3.7.x does not build from the module proxy: it serves neither Traefik's fork
# github.com/containous/go-http-auth at the pseudo-version v3.7.13 pins, nor a dozen ACME DNS SDKs.
TRAEFIK_VERSION = "v3.6.12"
GATEWAY_API_VERSION = "v1.4.0"  # the version Traefik v3.6.12 is built against
REGISTRY_VERSION = "v3.1.2"  # github.com/distribution/distribution/v3: the local image registry
# The real node (started by `cluster up`): containerd with its runc shim, the CNI reference
# plugins, and the kubelet from the same pinned k8s.io/kubernetes module as the control plane.
CONTAINERD_VERSION = "v2.4.2"
CNI_PLUGINS_VERSION = "v1.10.0"
CRI_TOOLS_VERSION = "v1.34.0"  # crictl: the node's pods removed through CRI at teardown
# NetworkPolicy on the node: kube-router's network policy controller alone (iptables + ipset).
# The newest v2 the Go module proxy serves; its published advisory (GHSA-phqm-jgc3-qf8g) is in
# the service proxy, which is not run here.
KUBE_ROUTER_VERSION = "v2.1.0"
_CNI_PLUGINS = ("main/bridge", "main/loopback", "ipam/host-local", "meta/portmap")

_VERSION_PACKAGES = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")


def cache_dir() -> Path:
    return Path(os.environ.get("MODELDEPLOY_CACHE", Path.home() / ".cache" / "modeldeploy"))


@dataclass(frozen=True)
class Binaries:
    """Paths of every binary the local cluster and the tests use."""

    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    etcd: Path
    kwok: Path
    helm: Path
    traefik: Path
    gateway_api_crds: Path
    kube_proxy: Path

    def all_present(self) -> bool:
        return all(path.is_file() for path in vars(self).values())


def binaries() -> Binaries:
    root = cache_dir() / "bin"
    controlplane = root / f"kubernetes-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"
    ingress = root / f"traefik-{TRAEFIK_VERSION}-gateway-api-{GATEWAY_API_VERSION}"
    return Binaries(
        kube_apiserver=controlplane / "kube-apiserver",
        kube_controller_manager=controlplane / "kube-controller-manager",
        kube_scheduler=controlplane / "kube-scheduler",
        kubectl=controlplane / "kubectl",
        etcd=controlplane / "etcd",
        kwok=root / f"kwok-{KWOK_VERSION}" / "kwok",
        helm=root / f"helm-{HELM_VERSION}-kube-{KUBERNETES_VERSION}" / "helm",
        traefik=ingress / "traefik",
        gateway_api_crds=ingress / "gateway-api-standard.yaml",
        kube_proxy=root / f"kube-proxy-{KUBERNETES_VERSION}" / "kube-proxy",
    )


def _version_ldflags() -> str:
    major, minor, _ = KUBERNETES_VERSION.lstrip("v").split(".")
    flags = ["-s", "-w"]
    for package in _VERSION_PACKAGES:
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _helm_ldflags() -> str:
    """Helm's own version, and the Kubernetes version `helm template` and `lint` assume."""
    major, minor, _ = KUBERNETES_VERSION.lstrip("v").split(".")
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
    for package in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def _log(message: str) -> None:
    print(f"[modeldeploy build] {message}", file=sys.stderr, flush=True)


def _go(
    args: list[str], *, what: str, cwd: Path | None = None, gobin: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs one `go` command, reporting elapsed time while it runs (a cold build takes minutes)."""
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    if gobin is not None:
        env["GOBIN"] = str(gobin)
    started = time.monotonic()
    _log(f"building {what} ...")
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(60):
            _log(f"still building {what} ({time.monotonic() - started:.0f}s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        result = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    finally:
        done.set()
    if result.returncode != 0:
        raise RuntimeError(f"building {what} failed: go {' '.join(args)}\n{result.stderr[-4000:]}")
    _log(f"built {what} in {time.monotonic() - started:.0f}s")
    return result


def _build_into(final: Path, build: list[tuple[str, list[str], Path | None]]) -> None:
    if final.is_dir():
        return
    if shutil.which("go") is None:
        raise RuntimeError(f"the Go toolchain is needed to build {final.name}: no `go`")
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for what, args, cwd in build:
        gobin = staging if args[0] == "install" else None
        _go(args, what=what, cwd=cwd, gobin=gobin)
    staging.rename(final)


def _build_ingress(final: Path) -> None:
    """Traefik, and the standard-channel Gateway API CRDs as one YAML stream beside it."""
    if final.is_dir():
        return
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    wrapper = checkout.root() / "tools" / "traefik"
    ldflags = f"-s -w -X github.com/traefik/traefik/v3/pkg/version.Version={TRAEFIK_VERSION}"
    package = "github.com/traefik/traefik/v3/cmd/traefik"
    _go(
        ["build", "-trimpath", "-ldflags", ldflags, "-o", str(staging / "traefik"), package],
        what=f"traefik {TRAEFIK_VERSION}",
        cwd=wrapper,
    )
    module = f"sigs.k8s.io/gateway-api@{GATEWAY_API_VERSION}"
    downloaded = _go(["mod", "download", "-json", module], what=module, cwd=wrapper)
    standard = Path(json.loads(downloaded.stdout)["Dir"]) / "config" / "crd" / "standard"
    documents = [path.read_text() for path in sorted(standard.glob("*.yaml"))]
    (staging / "gateway-api-standard.yaml").write_text("---\n".join(documents))
    staging.rename(final)


def build_all() -> Binaries:
    """Builds whatever is missing; returns at once when everything is cached."""
    wanted = binaries()
    if wanted.all_present():
        return wanted
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain is needed to build the local control plane: no `go`")
    started = time.monotonic()
    controlplane = wanted.kubectl.parent
    staging = controlplane.with_name(controlplane.name + ".partial")
    ldflags = _version_ldflags()
    packages = {
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        "etcd": "go.etcd.io/etcd/server/v3",
    }
    _build_into(
        controlplane,
        [
            (
                f"{name} {KUBERNETES_VERSION if name != 'etcd' else ETCD_VERSION}",
                ["build", "-trimpath", "-ldflags", ldflags, "-o", str(staging / name), package],
                checkout.root() / "tools" / "controlplane",
            )
            for name, package in packages.items()
        ],
    )
    proxy_staging = wanted.kube_proxy.parent.with_name(wanted.kube_proxy.parent.name + ".partial")
    _build_into(
        wanted.kube_proxy.parent,
        [
            (
                f"kube-proxy {KUBERNETES_VERSION}",
                [
                    "build",
                    "-trimpath",
                    "-ldflags",
                    ldflags,
                    "-o",
                    str(proxy_staging / "kube-proxy"),
                    "k8s.io/kubernetes/cmd/kube-proxy",
                ],
                checkout.root() / "tools" / "controlplane",
            )
        ],
    )
    _build_into(
        wanted.kwok.parent,
        [(f"kwok {KWOK_VERSION}", ["install", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"], None)],
    )
    _build_into(
        wanted.helm.parent,
        [
            (
                f"helm {HELM_VERSION}",
                [
                    "install",
                    "-ldflags",
                    _helm_ldflags(),
                    f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
                ],
                None,
            )
        ],
    )
    _build_ingress(wanted.traefik.parent)
    _log(f"all binaries ready in {time.monotonic() - started:.0f}s under {cache_dir() / 'bin'}")
    return wanted


def registry_binary() -> Path:
    return cache_dir() / "bin" / f"registry-{REGISTRY_VERSION}" / "registry"


def build_registry() -> Path:
    """The distribution v3 registry, built once."""
    binary = registry_binary()
    _build_into(
        binary.parent,
        [
            (
                f"registry {REGISTRY_VERSION}",
                [
                    "install",
                    f"github.com/distribution/distribution/v3/cmd/registry@{REGISTRY_VERSION}",
                ],
                None,
            )
        ],
    )
    return binary


@dataclass(frozen=True)
class NodeBinaries:
    """A real node's binaries: containerd, ctr and the runc shim; the CNI plugins; the kubelet."""

    containerd: Path
    ctr: Path
    containerd_shim_runc_v2: Path
    cni_bin_dir: Path  # bridge, loopback, host-local, portmap
    kubelet: Path
    crictl: Path


def node_binaries() -> NodeBinaries:
    root = cache_dir() / "bin"
    containerd = root / f"containerd-{CONTAINERD_VERSION}"
    return NodeBinaries(
        containerd=containerd / "containerd",
        ctr=containerd / "ctr",
        containerd_shim_runc_v2=containerd / "containerd-shim-runc-v2",
        cni_bin_dir=root / f"cni-plugins-{CNI_PLUGINS_VERSION}",
        kubelet=root / f"kubelet-{KUBERNETES_VERSION}" / "kubelet",
        crictl=root / f"cri-tools-{CRI_TOOLS_VERSION}" / "crictl",
    )


def build_node() -> NodeBinaries:
    """Builds whatever of the node's binaries is missing (static, like the rest)."""
    wanted = node_binaries()
    containerd = "github.com/containerd/containerd/v2/cmd"
    _build_into(
        wanted.containerd.parent,
        [
            (
                f"{name} {CONTAINERD_VERSION}",
                ["install", f"{containerd}/{name}@{CONTAINERD_VERSION}"],
                None,
            )
            for name in ("containerd", "ctr", "containerd-shim-runc-v2")
        ],
    )
    plugins = "github.com/containernetworking/plugins/plugins"
    _build_into(
        wanted.cni_bin_dir,
        [
            (
                f"CNI {plugin} {CNI_PLUGINS_VERSION}",
                ["install", f"{plugins}/{plugin}@{CNI_PLUGINS_VERSION}"],
                None,
            )
            for plugin in _CNI_PLUGINS
        ],
    )
    staging = wanted.kubelet.parent.with_name(wanted.kubelet.parent.name + ".partial")
    _build_into(
        wanted.kubelet.parent,
        [
            (
                f"kubelet {KUBERNETES_VERSION}",
                ["build", "-trimpath", "-ldflags", _version_ldflags(), "-o",
                 str(staging / "kubelet"), "k8s.io/kubernetes/cmd/kubelet"],
                checkout.root() / "tools" / "controlplane",
            )
        ],
    )  # fmt: skip
    crictl = f"sigs.k8s.io/cri-tools/cmd/crictl@{CRI_TOOLS_VERSION}"
    _build_into(wanted.crictl.parent, [(f"crictl {CRI_TOOLS_VERSION}", ["install", crictl], None)])
    return wanted


def kube_router_binary() -> Path:
    return cache_dir() / "bin" / f"kube-router-{KUBE_ROUTER_VERSION}" / "kube-router"


def build_kube_router() -> Path:
    """kube-router, built once (the node's NetworkPolicy enforcer, `netpol`)."""
    binary = kube_router_binary()
    version = "github.com/cloudnativelabs/kube-router/v2/pkg/version"
    ldflags = f"-s -w -X {version}.Version={KUBE_ROUTER_VERSION} -X {version}.BuildDate=1970-01-01"
    package = f"github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@{KUBE_ROUTER_VERSION}"
    _build_into(
        binary.parent,
        [(f"kube-router {KUBE_ROUTER_VERSION}", ["install", "-ldflags", ldflags, package], None)],
    )
    return binary
