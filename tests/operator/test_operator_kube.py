"""The client's retries, over real HTTP: 429 waits for Retry-After, a lost answer is retried only
when repeating the request is harmless, never for a POST.

The server here stands in for the API server because a 429, or a connection dropped after the
request was read, cannot be provoked on demand from the real one; everything between the
operator's call and the socket (the kubernetes package, urllib3) is real.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from modeldeploy_operator import builders, kube

Answer = Callable[[http.server.BaseHTTPRequestHandler, int], bool]


class _Server:
    """Answers each request with `answer(handler, n)`; False means: drop the connection."""

    def __init__(self, answer: Answer) -> None:
        self.requests: list[tuple[str, str, float]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append((self.command, self.path, time.monotonic()))
                if not answer(self, len(server.requests)):
                    self.close_connection = True
                    self.connection.close()  # the request was read; its answer is lost

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, **headers: str) -> bool:
    body = json.dumps({"kind": "Status", "message": f"status {status}"}).encode()
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    return True


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], tuple[_Server, kube.Kube]]]:
    servers: list[_Server] = []

    def start(answer: Answer) -> tuple[_Server, kube.Kube]:
        server = _Server(answer)
        servers.append(server)
        configuration = k8s.Configuration(host=server.url)
        configuration.api_key["BearerToken"] = "Bearer t0ken"
        return server, kube.Kube(configuration, timeout=10)

    yield start
    for server in servers:
        server.close()


MD = {
    "apiVersion": "modeldeploy.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "iris", "namespace": "ml", "uid": "u1"},
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "iris", "namespace": "ml"}}


def test_429_waits_for_retry_after_then_succeeds(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    server, client = serve(
        lambda h, n: _reply(h, 429, **{"Retry-After": "1"}) if n < 3 else _reply(h, 200)
    )
    started = time.monotonic()
    client.apply(builders.SERVICE, SERVICE)
    assert [method for method, _, _ in server.requests] == ["PATCH"] * 3
    gaps = [b[2] - a[2] for a, b in zip(server.requests, server.requests[1:], strict=False)]
    assert all(1.0 <= gap <= 1.5 + 0.3 for gap in gaps), gaps  # Retry-After, plus jitter
    assert time.monotonic() - started < 5


def test_a_post_throttled_with_429_is_retried_too(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    """429 means the server did not act on the request: even a POST is safe to send again."""
    server, client = serve(
        lambda h, n: _reply(h, 429, **{"Retry-After": "0"}) if n == 1 else _reply(h, 201)
    )
    client.emit_event(MD, "Normal", "Ready", "serving")
    assert [method for method, _, _ in server.requests] == ["POST", "POST"]


def test_throttling_that_does_not_end_is_an_error_in_time(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    server, client = serve(lambda h, n: _reply(h, 429, **{"Retry-After": "0"}))
    with pytest.raises(kube.ApiError) as raised:
        client.apply(builders.SERVICE, SERVICE)
    assert raised.value.status == 429
    assert len(server.requests) == kube.MAX_THROTTLED_RETRIES + 1


def test_a_post_whose_answer_was_lost_is_not_sent_again(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    """An Event the server may have created: sending it again could post it twice."""
    server, client = serve(lambda h, n: n > 1 and _reply(h, 201))
    with pytest.raises(Exception):  # noqa: B017 - urllib3's error, whatever its class
        client.emit_event(MD, "Normal", "Ready", "serving")
    assert [method for method, _, _ in server.requests] == ["POST"]


def test_an_apply_whose_answer_was_lost_is_sent_again(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    """A server-side apply is idempotent: repeating it is harmless."""
    server, client = serve(lambda h, n: n > 1 and _reply(h, 200))
    client.apply(builders.SERVICE, SERVICE)
    assert [method for method, _, _ in server.requests] == ["PATCH", "PATCH"]


def test_lease_requests_are_never_repeated_behind_the_electors_back(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    """The leader's deadline bounds each attempt: a lost answer is the elector's to handle."""
    server, client = serve(lambda h, n: n > 1 and _reply(h, 200))
    with pytest.raises(Exception):  # noqa: B017
        client.get_lease("ml", "modeldeploy-operator", timeout=2)
    assert len(server.requests) == 1


def test_errors_carry_the_servers_status_and_message(
    serve: Callable[..., tuple[_Server, kube.Kube]],
) -> None:
    server, client = serve(lambda h, n: _reply(h, 422))
    with pytest.raises(kube.ApiError) as raised:
        client.apply(builders.SERVICE, SERVICE)
    assert raised.value.status == 422 and kube.is_permanent(raised.value)
    assert kube.error_message(raised.value) == "status 422"
    assert len(server.requests) == 1  # a refusal is not retried


def test_a_context_that_is_not_there_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "here", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "here",
            }
        )
    )
    with pytest.raises(RuntimeError, match="context 'elsewhere'"):
        kube.configuration(str(config), "elsewhere")
    assert kube.configuration(str(config), "here").host == "https://127.0.0.1:1"
