"""The `modeldeploy-dev` command: the local cluster, the images, and the files generated from the
API models."""

from __future__ import annotations

import argparse
import sys


def _cluster(args: argparse.Namespace) -> int:
    from modeldeploy_dev import build, cluster

    if args.action == "up":
        cluster.up()
        print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product"), end="")
    elif args.action == "down":
        cluster.down()
    elif args.action == "kubeconfig":
        print(cluster.kubeconfig_path())
    elif args.action == "build":
        build.build_all()
        build.build_node()
        build.build_kube_router()
        build.build_registry()
    return 0


def _images(args: argparse.Namespace) -> int:
    from modeldeploy_dev import images, registry

    if args.action == "registry-down":
        registry.down()
        return 0
    built = images.build()
    if args.action == "push":
        registry.up()
    for image in built.values():
        layers = " + ".join(f"{size / 1e6:.0f}" for size in image.layers)
        print(f"{image.reference}  {image.size / 1e6:.0f} MB uncompressed ({layers} MB)")
        if args.action == "push":
            print(f"  {registry.push(image)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from modeldeploy_dev import crd

    for path in crd.generate():
        print(path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeldeploy-dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cluster = commands.add_parser(
        "cluster",
        help="a local Kubernetes cluster: its control plane (etcd, apiserver, ...), a real node "
        "(containerd, kubelet) and KWOK's simulated nodes",
    )
    cluster.add_argument(
        "action",
        choices=["up", "down", "kubeconfig", "build"],
        help="up: start (idempotent), down: stop and delete, kubeconfig: print its path, "
        "build: only build the binaries",
    )
    cluster.set_defaults(func=_cluster)
    images = commands.add_parser(
        "images",
        help="the operator and runtime images, built from the Dockerfile with buildah on a "
        "Debian-made Python base image (cached: an unchanged tree builds nothing)",
    )
    images.add_argument(
        "action",
        choices=["build", "push", "registry-down"],
        help="build: build what is missing and print the images' sizes, push: also push them "
        "by tag to the local registry (started on 127.0.0.1 when not running) and print their "
        "digests, registry-down: stop the local registry (its data stays)",
    )
    images.set_defaults(func=_images)
    generate = commands.add_parser(
        "generate",
        help="rewrite crds/, the chart's copy of the CRD and the README's API reference from "
        "the pydantic models",
    )
    generate.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RuntimeError as error:
        print(f"modeldeploy-dev: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
