"""The `modeldeploy-dev` command: the local cluster, and the files generated from the API models."""

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
    elif args.action == "run-pods":
        from modeldeploy_dev import podrunner

        if not args.namespace:
            raise RuntimeError("run-pods needs --namespace: the namespace whose pods it runs")
        podrunner.main(args.namespace)
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
        "cluster", help="a local Kubernetes control plane (etcd, apiserver, KWOK nodes)"
    )
    cluster.add_argument(
        "action",
        choices=["up", "down", "kubeconfig", "build", "run-pods"],
        help="up: start (idempotent), down: stop and delete, kubeconfig: print its path, "
        "build: only build the binaries, run-pods: be the node agent that runs the real runtime "
        "behind a namespace's runtime pods, each in its own network namespace (foreground)",
    )
    cluster.add_argument(
        "--namespace", help="run-pods (required): the namespace whose runtime pods to run"
    )
    cluster.set_defaults(func=_cluster)
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
