"""The one module that talks to the Kubernetes API server (besides kopf's own watching).

Writes are server-side applies with the field manager `modeldeploy`, merge patches of the
ModelDeployment status, deletes and Events; besides them only the leader election's Lease is
written (see leader.py).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client import exceptions

from modeldeploy_operator import builders, opmetrics
from modeldeploy_operator import spec as api

Object = dict[str, Any]
FIELD_MANAGER = "modeldeploy"
USER_AGENT = "modeldeploy-operator"
ApiError = exceptions.ApiException

MODEL_DEPLOYMENT = builders.Kind(f"{api.GROUP}/{api.VERSION}", api.KIND, api.PLURAL)
EVENT = builders.Kind("v1", "Event", "events")
LEASE = builders.Kind("coordination.k8s.io/v1", "Lease", "leases")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_permanent(error: Exception) -> bool:
    """Whether retrying the same request cannot help (the server rejected its content)."""
    return isinstance(error, ApiError) and error.status in (400, 403, 409, 422)


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


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self._api.user_agent = USER_AGENT
        self._reporting_instance = socket.gethostname()

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials in a pod, else $KUBECONFIG or ~/.kube/config."""
        if "KUBERNETES_SERVICE_HOST" in os.environ:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return cls(client.ApiClient())
        # Read $KUBECONFIG now: the client library reads it once, when first imported.
        kubeconfig = os.environ.get("KUBECONFIG") or config.KUBE_CONFIG_DEFAULT_LOCATION
        return cls(config.new_client_from_config(config_file=kubeconfig))  # type: ignore[no-untyped-call]

    def _request(
        self,
        method: str,
        resource: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Object | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Object:
        request = self._api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        opmetrics.API_REQUESTS.labels(method, resource).inc()
        response = self._api.call_api(*request, _request_timeout=timeout)
        response.read()  # type: ignore[no-untyped-call]
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status <= 299:
            raise ApiError.from_response(http_resp=response, body=text, data=None)
        result: Object = json.loads(text) if text else {}
        return result

    def apply(self, kind: builders.Kind, obj: Object) -> Object:
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

    def get_model_deployment(self, namespace: str, name: str) -> Object | None:
        try:
            return self._request("GET", api.PLURAL, _path(MODEL_DEPLOYMENT, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: Object) -> Object:
        return self._request(
            "PATCH",
            f"{api.PLURAL}/status",
            _path(MODEL_DEPLOYMENT, namespace, name) + "/status",
            query=[("fieldManager", FIELD_MANAGER)],
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def emit_event(self, owner: Object, type_: str, reason: str, message: str) -> None:
        metadata = owner["metadata"]
        timestamp = now()
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

    def get_lease(self, namespace: str, name: str, *, timeout: float) -> Object | None:
        try:
            return self._request(
                "GET", LEASE.plural, _path(LEASE, namespace, name), timeout=timeout
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create_lease(self, lease: Object, *, timeout: float) -> Object:
        """Fails with 409 when the Lease exists already."""
        path = _path(LEASE, lease["metadata"]["namespace"])
        return self._request("POST", LEASE.plural, path, body=lease, timeout=timeout)

    def replace_lease(self, lease: Object, *, timeout: float) -> Object:
        """Fails with 409 unless `metadata.resourceVersion` is still the current one."""
        metadata = lease["metadata"]
        path = _path(LEASE, metadata["namespace"], metadata["name"])
        return self._request("PUT", LEASE.plural, path, body=lease, timeout=timeout)
