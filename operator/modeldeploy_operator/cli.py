"""`modeldeploy run`: the operator, against the current cluster."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pydantic

from modeldeploy_operator import settings as config


def run(settings: config.OperatorSettings) -> int:
    # Imported here: importing the handlers registers them with kopf.
    import kopf
    import prometheus_client

    from modeldeploy_operator import handlers, kube

    # Loaded now, so that a kubeconfig or context that cannot be used stops the start with its
    # reason; kopf's login and our client then share this configuration.
    kube.configuration(settings.kubeconfig, settings.context)

    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=settings.verbose, log_format=log_format)
    if not settings.verbose:
        # kopf logs every handled watch event; at a thousand models that is noise. Failures
        # are still logged, and the reconciler logs every write it makes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    prometheus_client.start_http_server(settings.metrics_port, addr=settings.bind_address)
    elector = _lead(settings) if settings.leader_election_namespace else None
    memo = handlers.memo(settings)
    try:
        kopf.run(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,
            liveness_endpoint=f"http://{settings.bind_address}:{settings.health_port}/healthz",
            memo=memo,
            insights=memo.insights,
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


def _lead(settings: config.OperatorSettings) -> Any:
    """Blocks until this replica holds the Lease, then keeps renewing it in a thread."""
    from modeldeploy_operator import kube, leader

    assert settings.leader_election_namespace is not None
    elector = leader.Elector(
        kube.Kube.shared(settings.kubeconfig, settings.context),
        settings.leader_election_namespace,
        settings.leader_election_id,
        identity=leader.identity(),
        lease_seconds=settings.leader_election_lease_seconds,
    )
    with _standby_liveness(settings.bind_address, settings.health_port):
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
def _standby_liveness(address: str, port: int) -> Iterator[None]:
    """Answers the liveness probe while standing by; kopf answers it on that port once leading."""

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass  # a probe every few seconds is not news

    server = http.server.ThreadingHTTPServer((address, port), Healthz)
    threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _help(field: str) -> str:
    info = config.OperatorSettings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = f"; default {default}" if default not in (None, (), False) else ""
    return f"{info.description or field}{shown} (${config.ENV_PREFIX}{field.upper()})"


def parser() -> argparse.ArgumentParser:
    """The flags of `modeldeploy run`. They default to None: the settings model decides between
    the environment and its defaults, and validates whatever was given."""
    run = argparse.ArgumentParser(
        prog="modeldeploy run",
        description="Run the operator against a cluster: in a pod its own, else the kubeconfig's "
        "(--kubeconfig, $KUBECONFIG or ~/.kube/config) current or chosen (--context) context.",
        argument_default=None,
    )
    run.add_argument("--kubeconfig", metavar="PATH", help=_help("kubeconfig"))
    run.add_argument("--context", metavar="NAME", help=_help("context"))
    run.add_argument("--namespace", dest="namespaces", action="append", metavar="NS",
                     help=_help("namespaces") + "; repeatable")  # fmt: skip
    run.add_argument("--runtime-image", help=_help("runtime_image"))
    run.add_argument("--prometheus-url", help=_help("prometheus_url"))
    run.add_argument("--metrics-interval", metavar="S", help=_help("metrics_interval"))
    run.add_argument("--metrics-window", metavar="S", help=_help("metrics_window"))
    run.add_argument("--resync-interval", metavar="S", help=_help("resync_interval"))
    run.add_argument("--reconcile-workers", metavar="N", help=_help("reconcile_workers"))
    run.add_argument("--log-format", choices=["json", "plain"], help=_help("log_format"))
    run.add_argument("--verbose", action="store_const", const=True, help="debug logging")
    run.add_argument("--bind-address", metavar="IP", help=_help("bind_address"))
    run.add_argument("--health-port", metavar="PORT", help=_help("health_port"))
    run.add_argument("--metrics-port", metavar="PORT", help=_help("metrics_port"))
    run.add_argument("--leader-election-namespace", metavar="NS",
                     help=_help("leader_election_namespace"))  # fmt: skip
    run.add_argument("--leader-election-id", metavar="NAME", help=_help("leader_election_id"))
    run.add_argument("--leader-election-lease-seconds", metavar="S",
                     help=_help("leader_election_lease_seconds"))  # fmt: skip
    return run


def settings_from(argv: Sequence[str]) -> config.OperatorSettings:
    """Flags over environment over defaults, validated once; exits 2 naming a bad setting."""
    run = parser()
    given = {k: v for k, v in vars(run.parse_args(argv)).items() if v is not None}
    try:
        return config.OperatorSettings(**given)
    except pydantic.ValidationError as error:
        run.error("\n".join(config.problems(error)))


def main(argv: Sequence[str] | None = None) -> int:
    """`modeldeploy run [flags]`; `argv` excludes `run`."""
    settings = settings_from(sys.argv[1:] if argv is None else argv)
    try:
        return run(settings)
    except RuntimeError as error:
        print(f"modeldeploy: {error}", file=sys.stderr)
        return 1
