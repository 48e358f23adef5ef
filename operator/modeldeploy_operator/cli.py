"""The `modeldeploy` command."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modeldeploy_operator import leader


def _cluster(args: argparse.Namespace) -> int:
    # Imported here: the operator image does not need the local-cluster tooling's dependencies.
    from modeldeploy_operator.localcluster import build, cluster

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
        from modeldeploy_operator.localcluster import podrunner

        podrunner.main(args.namespace)
    return 0


def _run(args: argparse.Namespace) -> int:
    # Imported here: importing the handlers registers them with kopf.
    import kopf
    import prometheus_client

    from modeldeploy_operator import handlers  # noqa: F401 (registers the handlers)

    log_format = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format)
    if not args.verbose:
        # kopf logs every handled watch event; at a thousand models that is noise. Failures
        # are still logged, and the reconciler logs every write it makes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    prometheus_client.start_http_server(args.metrics_port)
    elector = _lead(args) if args.leader_election_namespace else None
    try:
        kopf.run(
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
            memo=kopf.Memo(
                runtime_image=args.runtime_image,
                prometheus_url=args.prometheus_url,
                metrics_interval=args.metrics_interval,
                metrics_window=args.metrics_window,
            ),
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


def _lead(args: argparse.Namespace) -> leader.Elector:
    """Blocks until this replica holds the Lease, then keeps renewing it in a thread."""
    from modeldeploy_operator import kube, leader

    elector = leader.Elector(
        kube.Kube.from_environment(),
        args.leader_election_namespace,
        args.leader_election_id,
        identity=leader.identity(),
        lease_seconds=args.leader_election_lease_seconds,
    )
    with _standby_liveness(args.health_port):
        elector.acquire()
    elector.keep_renewing(on_lost=_stop_acting)
    return elector


def _stop_acting() -> None:
    # Another replica may start acting any moment now: no graceful shutdown, which would still
    # run handlers. The exit status makes Kubernetes restart this one, as a standby.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


@contextlib.contextmanager
def _standby_liveness(port: int) -> Iterator[None]:
    """Answers the liveness probe while standing by; kopf answers it on that port once leading."""

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass  # a probe every few seconds is not news

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Healthz)
    threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser("run", help="run the operator against the current cluster")
    run.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="serve this namespace (repeatable; exact names: the operator is not allowed to "
        "list namespaces); default: all",
    )
    run.add_argument(
        "--runtime-image",
        default=os.environ.get("MODELDEPLOY_RUNTIME_IMAGE"),
        help="runtime image for ModelDeployments that name none "
        "(default: $MODELDEPLOY_RUNTIME_IMAGE or the release's image)",
    )
    run.add_argument(
        "--prometheus-url",
        help="summarise status.metrics with PromQL from this Prometheus "
        "(default: $MODELDEPLOY_PROMETHEUS_URL, else scrape the ready pods directly)",
    )
    run.add_argument(
        "--metrics-interval",
        type=_positive_float,
        help="seconds between status.metrics updates (default 30; $MODELDEPLOY_METRICS_INTERVAL)",
    )
    run.add_argument(
        "--metrics-window",
        type=_positive_int,
        help="seconds of history PromQL rates cover (default 60; $MODELDEPLOY_METRICS_WINDOW)",
    )
    run.add_argument("--log-format", choices=["json", "plain"], default="plain")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.add_argument("--health-port", type=int, default=8080, help="serves /healthz (default 8080)")
    run.add_argument(
        "--metrics-port", type=int, default=9090, help="serves Prometheus /metrics (default 9090)"
    )
    run.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        help="of all replicas only the one holding a Lease in this namespace acts; the others "
        "stand by (default: no election, for a single replica)",
    )
    run.add_argument(
        "--leader-election-id",
        metavar="NAME",
        default="modeldeploy-operator",
        help="the Lease's name (default modeldeploy-operator)",
    )
    run.add_argument(
        "--leader-election-lease-seconds",
        type=_positive_int,
        default=15,
        metavar="S",
        help="a leader that has not renewed the Lease for this long is replaced (default 15)",
    )
    run.set_defaults(func=_run)


def _serve(args: argparse.Namespace) -> int:
    from modeldeploy_operator import localserve

    try:
        return localserve.serve(
            args.file,
            name=args.name,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            workdir=args.workdir,
            pvc_root=args.pvc_root,
        )
    except localserve.ServeError as error:
        print(f"modeldeploy serve: {error}", file=sys.stderr)
        return 2


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", help="serve a ModelDeployment's model on this machine, no cluster needed"
    )
    serve.add_argument("-f", "--file", type=Path, required=True, help="a ModelDeployment YAML")
    serve.add_argument("--name", help="which ModelDeployment, when the file holds several")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--http-port", type=int, default=8080)
    serve.add_argument("--grpc-port", type=int, default=8081)
    serve.add_argument(
        "--workdir",
        type=Path,
        default=Path(".modeldeploy"),
        help="where the model is fetched and cached (default ./.modeldeploy)",
    )
    serve.add_argument(
        "--pvc-root", type=Path, default=Path("."), help="pvc://<claim>/<path> reads <root>/<claim>"
    )
    serve.set_defaults(func=_serve)


def _positive_float(text: str) -> float:
    """An argparse type: a number above zero, or an error that names the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _positive_int(text: str) -> int:
    value = _positive_float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeldeploy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser(
        "cluster", help="a local Kubernetes control plane (etcd, apiserver, KWOK nodes)"
    )
    cluster.add_argument(
        "action",
        choices=["up", "down", "kubeconfig", "build", "run-pods"],
        help="up: start (idempotent), down: stop and delete, kubeconfig: print its path, "
        "build: only build the binaries, run-pods: run real runtime processes behind the "
        "simulated runtime pods (foreground)",
    )
    cluster.add_argument("--namespace", help="run-pods: only this namespace's pods")
    cluster.set_defaults(func=_cluster)
    _add_run(commands)
    _add_serve(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RuntimeError as error:
        print(f"modeldeploy: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
