"""The one module that talks to the Kubernetes API server (besides kopf's own watching).

Writes are server-side applies with the field manager `modeldeploy`, merge patches of the
ModelDeployment status, deletes and Events; besides them only the leader election's Lease is
written (see leader.py).

The client is a few lines over `http.client`, not the `kubernetes` package: that package costs
the operator about 30 MiB of memory just by being importable (kopf imports it when present), for
the seven requests made here. Credentials come from the pod's service account or a kubeconfig
with client certificates or a token, what kopf's own login supports.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import yaml

from modeldeploy_operator import builders, opmetrics
from modeldeploy_operator import spec as api

FIELD_MANAGER = "modeldeploy"
USER_AGENT = "modeldeploy-operator"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

MODEL_DEPLOYMENT = builders.Kind(f"{api.GROUP}/{api.VERSION}", api.KIND, api.PLURAL)
EVENT = builders.Kind("v1", "Event", "events")
LEASE = builders.Kind("coordination.k8s.io/v1", "Lease", "leases")


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str = "", body: str = "") -> None:
        super().__init__(f"{status} {reason}: {body[:500]}" if body else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body


def is_permanent(error: Exception) -> bool:
    """Whether retrying the same request cannot help (the server rejected its content)."""
    return isinstance(error, ApiError) and error.status in (400, 403, 409, 422)


def is_unserved(error: Exception) -> bool:
    """Whether an apply failed because the API server does not serve the object's kind (its
    CRD is not installed): a server-side apply creates a missing object, so 404 means that."""
    return isinstance(error, ApiError) and error.status == 404


def error_message(error: Exception) -> str:
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


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to prove who we are."""

    server: str
    tls: ssl.SSLContext
    token_file: Path | None = None
    token: str | None = None

    def authorization(self) -> str | None:
        # A projected service-account token is rotated on disk: read it for every request.
        token = self.token_file.read_text().strip() if self.token_file else self.token
        return f"Bearer {token}" if token else None


def _pem(data: str | None, path: str | None, base: Path) -> str | None:
    if data:
        return base64.b64decode(data).decode()
    if path:
        return (base / path).read_text()
    return None


def _from_kubeconfig(path: Path) -> Credentials:
    config = yaml.safe_load(path.read_text()) or {}
    contexts = {c["name"]: c["context"] for c in config.get("contexts", [])}
    context = contexts[config["current-context"]]
    cluster = {c["name"]: c["cluster"] for c in config.get("clusters", [])}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users", [])}.get(context.get("user"), {})
    base = path.parent
    tls = ssl.create_default_context(
        cadata=_pem(
            cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), base
        )
    )
    if cluster.get("insecure-skip-tls-verify"):
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    certificate = _pem(user.get("client-certificate-data"), user.get("client-certificate"), base)
    key = _pem(user.get("client-key-data"), user.get("client-key"), base)
    if certificate and key:
        # ssl loads a client certificate from files only; they exist for the call's duration.
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "cert.pem").write_text(certificate)
            (Path(folder) / "key.pem").write_text(key)
            tls.load_cert_chain(Path(folder) / "cert.pem", Path(folder) / "key.pem")
    token_file = user.get("tokenFile")
    return Credentials(
        server=cluster["server"],
        tls=tls,
        token=user.get("token"),
        token_file=base / token_file if token_file else None,
    )


def credentials_from_environment() -> Credentials:
    """In-cluster credentials in a pod, else $KUBECONFIG (its first file) or ~/.kube/config."""
    if "KUBERNETES_SERVICE_HOST" in os.environ:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return Credentials(
            server=f"https://{host}:{port}",
            tls=ssl.create_default_context(cafile=SERVICE_ACCOUNT / "ca.crt"),
            token_file=SERVICE_ACCOUNT / "token",
        )
    kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return _from_kubeconfig(Path(kubeconfig) if kubeconfig else Path.home() / ".kube" / "config")


class Kube:
    """Blocking requests on one kept-alive connection per thread (kopf runs sync handlers in a
    thread pool)."""

    def __init__(self, credentials: Credentials, timeout: float = 30.0) -> None:
        self._credentials = credentials
        parts = urllib.parse.urlsplit(credentials.server)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 443
        self._base = parts.path.rstrip("/")
        self._timeout = timeout
        self._local = threading.local()
        self._reporting_instance = socket.gethostname()

    @classmethod
    def from_environment(cls) -> Kube:
        return cls(credentials_from_environment())

    def _connection(self, fresh: bool = False) -> http.client.HTTPSConnection:
        connection: http.client.HTTPSConnection | None = getattr(self._local, "connection", None)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPSConnection(
                self._host, self._port, context=self._credentials.tls, timeout=self._timeout
            )
            self._local.connection = connection
        return connection

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
        target = self._base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {
            "Accept": "application/json",
            "Content-Type": content_type,
            "User-Agent": USER_AGENT,
        }
        authorization = self._credentials.authorization()
        if authorization:
            headers["Authorization"] = authorization
        payload = json.dumps(body).encode() if body is not None else None
        opmetrics.API_REQUESTS.labels(method, resource).inc()
        status, reason, text = self._send(method, target, payload, headers, timeout)
        if not 200 <= status <= 299:
            raise ApiError(status, reason, text)
        result: api.Object = json.loads(text) if text else {}
        return result

    def _send(
        self,
        method: str,
        target: str,
        payload: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> tuple[int, str, str]:
        # A kept-alive connection the server closed fails on first use: one retry on a new one.
        for fresh in (False, True):
            connection = self._connection(fresh)
            connection.timeout = self._timeout if timeout is None else timeout
            if connection.sock is not None:
                connection.sock.settimeout(connection.timeout)
            try:
                connection.request(method, target, body=payload, headers=headers)
                response = connection.getresponse()
                return response.status, response.reason, response.read().decode()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                connection.close()
                if fresh:
                    raise
            except (OSError, http.client.HTTPException):
                connection.close()
                raise
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
