"""The one module that talks to the Kubernetes API server (besides kopf's own watching).

Writes are server-side applies with the field manager `modeldeploy`, merge patches of the
ModelDeployment status, deletes and Events; besides them only the leader election's Lease is
written (see leader.py).

The client is the `kubernetes` package's `ApiClient`, and its configuration is the operator's
one source of credentials: in a pod the service account (its projected token re-read as it
rotates), else a kubeconfig with all the package supports (exec plugins, auth providers,
several files in $KUBECONFIG, contexts, proxies, `tls-server-name`). kopf logs in from the same
configuration (`login_info`), so its watches and these writes act as one identity.

Requests are sent through `ApiClient.call_api` and answered as plain JSON: the generated typed
APIs and models would cost memory and time for the seven requests made here.

Retries: a connection that could not be made is retried for any request (nothing was sent); a
request whose answer was lost only when repeating it is harmless (not a POST, which could post
an Event twice); a 429 is retried after the server's Retry-After, whatever the method (the
server did not act on it). Every wait has jitter, so that clients that failed together do not
come back together.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from modeldeploy_operator import builders, opmetrics
from modeldeploy_operator import spec as api

FIELD_MANAGER = "modeldeploy"
USER_AGENT = "modeldeploy-operator"

MODEL_DEPLOYMENT = builders.Kind(f"{api.GROUP}/{api.VERSION}", api.KIND, api.PLURAL)
EVENT = builders.Kind("v1", "Event", "events")
LEASE = builders.Kind("coordination.k8s.io/v1", "Lease", "leases")

# 429 Too Many Requests: waits of at most this long, this many times, before giving up.
MAX_RETRY_AFTER_S = 10.0
MAX_THROTTLED_RETRIES = 5

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """The API server answered with an error status (0: no answer, e.g. a TLS failure)."""

    def __init__(self, status: int, reason: str = "", body: str = "") -> None:
        super().__init__(f"{status} {reason}: {body[:500]}" if body else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body


def is_permanent(error: BaseException) -> bool:
    """Whether retrying the same request cannot help (the server rejected its content)."""
    return isinstance(error, ApiError) and error.status in (400, 403, 409, 422)


def is_unserved(error: BaseException) -> bool:
    """Whether an apply failed because the API server does not serve the object's kind (its
    CRD is not installed): a server-side apply creates a missing object, so 404 means that."""
    return isinstance(error, ApiError) and error.status == 404


def error_message(error: BaseException) -> str:
    if isinstance(error, ApiError) and error.body:
        try:
            return str(json.loads(error.body).get("message", error.body))
        except ValueError:
            return str(error.body)
    return str(error)


def _path(kind: builders.Kind, namespace: str, name: str | None = None) -> str:
    prefix = "/api" if kind.group == "" else "/apis"
    path = f"{prefix}/{kind.api_version}/namespaces/{namespace}/{kind.plural}"
    return f"{path}/{name}" if name else path


def in_cluster() -> bool:
    """The one test of "in a pod" (the kubernetes package's): its service's host and port."""
    return bool(
        os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
    )


@functools.cache
def configuration(kubeconfig: str | None = None, context: str | None = None) -> k8s.Configuration:
    """The process's one configuration for a given choice, loaded once and shared.

    In a pod, unless a kubeconfig or a context is chosen, the service account; else the
    kubeconfig: `kubeconfig`, or $KUBECONFIG (its files merged), or ~/.kube/config, with
    `context` or the current one.
    """
    loaded = k8s.Configuration()
    if kubeconfig is None and context is None and in_cluster():
        try:
            k8s_config.load_incluster_config(client_configuration=loaded)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as error:
            raise RuntimeError(f"cannot use the pod's service account: {error}") from error
        return loaded
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=loaded, persist_config=False
        )
    except (k8s_config.ConfigException, OSError) as error:
        where = f"context {context!r} of {path}" if context else path
        raise RuntimeError(f"cannot use the kubeconfig ({where}): {error}") from error
    return loaded


@dataclass(frozen=True)
class Login:
    """What kopf needs to log in as the configuration does (see handlers.login)."""

    server: str
    ca_path: str | None
    insecure: bool
    scheme: str | None
    token: str | None
    certificate_path: str | None
    private_key_path: str | None
    username: str | None
    password: str | None
    proxy_url: str | None


def login_info(loaded: k8s.Configuration) -> Login:
    """The credentials of `loaded` as they are now: reading the token runs its refresh (an exec
    plugin past its expiry, a rotated service-account token), as for our own requests."""
    header = loaded.get_api_key_with_prefix("BearerToken", alias="authorization")
    scheme, _, token = (header or "").partition(" ")
    if not token:
        scheme, token = "", scheme
    return Login(
        server=loaded.host,
        ca_path=loaded.ssl_ca_cert,
        insecure=not loaded.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=loaded.cert_file,
        private_key_path=loaded.key_file,
        username=loaded.username or None,
        password=loaded.password or None,
        proxy_url=loaded.proxy,
    )


def _retry_after(error: k8s.ApiException, attempt: int) -> float:
    """The server's Retry-After (seconds), else a growing delay; capped, with jitter."""
    headers = error.headers or {}
    try:
        wanted = float(headers.get("Retry-After", ""))
    except ValueError:
        wanted = 0.5 * 2.0 ** (attempt - 1)
    return min(MAX_RETRY_AFTER_S, max(0.0, wanted)) * random.uniform(1.0, 1.5)


class Kube:
    """Blocking requests (kopf runs the reconciler in a thread pool); urllib3 keeps up to `pool`
    connections open, opened as threads need them: room for one per reconcile worker (at most
    64, see settings) and for the metrics writes. A request past the pool would open a connection
    (a TLS handshake) and drop it after."""

    def __init__(self, loaded: k8s.Configuration, timeout: float = 30.0, pool: int = 80) -> None:
        # Connections that failed are retried, requests that were sent only when idempotent;
        # statuses (429) are ours to handle.
        loaded.retries = urllib3.Retry(
            total=3,
            connect=3,
            read=2,
            status=0,
            other=0,
            allowed_methods=frozenset({"GET", "PUT", "PATCH", "DELETE"}),
            backoff_factor=0.2,
            backoff_jitter=0.3,
            raise_on_status=False,
        )
        loaded.connection_pool_maxsize = pool
        self._client = k8s.ApiClient(loaded)
        self._client.user_agent = USER_AGENT
        # Requests with a deadline of their own (the Lease's) are never repeated behind the
        # caller's back: its deadline is what makes a leader step down in time.
        once = copy.deepcopy(loaded)
        once.retries = False
        once.connection_pool_maxsize = 1
        self._once = k8s.ApiClient(once)
        self._once.user_agent = USER_AGENT
        self._timeout = timeout
        self._reporting_instance = socket.gethostname()

    _shared: dict[tuple[str | None, str | None], Kube] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        """The process's client for this choice of kubeconfig and context: one pool, one
        identity for the reconciler, the metrics writer and the leader election."""
        with cls._shared_lock:
            key = (kubeconfig, context)
            if key not in cls._shared:
                cls._shared[key] = cls(configuration(kubeconfig, context))
            return cls._shared[key]

    def _request(
        self,
        method: str,
        resource: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: api.Object | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> api.Object:
        client = self._client if timeout is None else self._once
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for attempt in range(1, MAX_THROTTLED_RETRIES + 2):
            request = client.param_serialize(
                method,
                path,
                query_params=query or [],
                header_params=dict(headers),
                body=body,
                auth_settings=["BearerToken"],
            )
            opmetrics.API_REQUESTS.labels(method, resource).inc()
            left = deadline - time.monotonic()
            try:
                response = client.call_api(*request, _request_timeout=max(left, 0.1))
                response.read()  # type: ignore[no-untyped-call]
            except k8s.ApiException as error:  # raised without an answer (TLS and the like)
                raise ApiError(
                    error.status or 0, str(error.reason or ""), error.body or ""
                ) from error
            if response.status == 429 and attempt <= MAX_THROTTLED_RETRIES:
                throttled = k8s.ApiException(http_resp=response)
                wait = _retry_after(throttled, attempt)
                if time.monotonic() + wait < deadline:
                    logger.info("%s %s throttled (429); again in %.1fs", method, path, wait)
                    time.sleep(wait)
                    continue
            text = response.data.decode() if response.data else ""
            if not 200 <= response.status <= 299:
                raise ApiError(response.status, response.reason or "", text)
            result: api.Object = json.loads(text) if text else {}
            return result
        raise AssertionError("unreachable")

    def apply(self, kind: builders.Kind, obj: api.Object) -> api.Object:
        """Server-side apply; `force` takes back fields someone else changed by hand."""
        metadata = obj["metadata"]
        return self._request(
            "PATCH",
            kind.plural,
            _path(kind, metadata["namespace"], metadata["name"]),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def delete(self, kind: builders.Kind, namespace: str, name: str, uid: str) -> None:
        """Deletes exactly that object: the uid precondition spares a newer one of that name."""
        try:
            self._request(
                "DELETE",
                kind.plural,
                _path(kind, namespace, name),
                body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def get_model_deployment(self, namespace: str, name: str) -> api.Object | None:
        try:
            return self._request("GET", api.PLURAL, _path(MODEL_DEPLOYMENT, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: api.Object) -> api.Object:
        return self._request(
            "PATCH",
            f"{api.PLURAL}/status",
            _path(MODEL_DEPLOYMENT, namespace, name) + "/status",
            query=[("fieldManager", FIELD_MANAGER)],
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def emit_event(self, owner: api.Object, type_: str, reason: str, message: str) -> None:
        metadata = owner["metadata"]
        timestamp = api.now()
        self._request(
            "POST",
            EVENT.plural,
            _path(EVENT, metadata["namespace"]),
            body={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "generateName": f"{metadata['name']}.",
                    "namespace": metadata["namespace"],
                },
                "involvedObject": {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": metadata["name"],
                    "namespace": metadata["namespace"],
                    "uid": metadata["uid"],
                },
                "type": type_,
                "reason": reason,
                "message": message,
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "reportingInstance": self._reporting_instance,
                "firstTimestamp": timestamp,
                "lastTimestamp": timestamp,
                "count": 1,
            },
        )

    def get_lease(self, namespace: str, name: str, *, timeout: float) -> api.Object | None:
        try:
            return self._request(
                "GET", LEASE.plural, _path(LEASE, namespace, name), timeout=timeout
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create_lease(self, lease: api.Object, *, timeout: float) -> api.Object:
        """Fails with 409 when the Lease exists already."""
        path = _path(LEASE, lease["metadata"]["namespace"])
        return self._request("POST", LEASE.plural, path, body=lease, timeout=timeout)

    def replace_lease(self, lease: api.Object, *, timeout: float) -> api.Object:
        """Fails with 409 unless `metadata.resourceVersion` is still the current one."""
        metadata = lease["metadata"]
        path = _path(LEASE, metadata["namespace"], metadata["name"])
        return self._request("PUT", LEASE.plural, path, body=lease, timeout=timeout)
