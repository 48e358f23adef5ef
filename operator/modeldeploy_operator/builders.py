"""Pure builders: the desired child objects of one ModelDeployment.

Each builder takes the owner and its validated spec and returns a plain dict ready for
server-side apply. Nothing here talks to the API server.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from modeldeploy_operator import spec as api

Object = dict[str, Any]

HTTP_PORT = 8080
GRPC_PORT = 8081
# After SIGTERM the runtime stays up, not ready, for DRAIN_SECONDS (clients keep arriving
# until the endpoint's removal has spread), then in-flight requests get up to
# FINISH_SECONDS (the runtime's frontend.FINISH_SECONDS).
DRAIN_SECONDS = 10
FINISH_SECONDS = 15
MODEL_DIR = "/models"
# The runtime reads pvc://<claim>/<path> from <PVC_ROOT>/<claim>/<path> (its MODELDEPLOY_PVC_ROOT).
PVC_ROOT = "/mnt/pvc"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONCURRENCY_METRIC = "modeldeploy_inflight_requests"
# The distroless "nonroot" user; the runtime image runs as it.
NONROOT_UID = 65532

MANAGED_BY = "modeldeploy"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL_VERSION = "modeldeploy.io/model-version"
# On the pod template: changes whenever the served model does, so that pods roll.
ANNOTATION_MODEL_DIGEST = "modeldeploy.io/model-digest"
# On every child: a digest of what the operator applied, so that a change of the desired object
# (including one that only removes fields) is noticed without a write.
ANNOTATION_APPLIED_DIGEST = "modeldeploy.io/applied-digest"


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
INGRESS = Kind("networking.k8s.io/v1", "Ingress", "ingresses")
AUTOSCALER = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
DISRUPTION_BUDGET = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
NETWORK_POLICY = Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
CHILD_KINDS = (DEPLOYMENT, SERVICE, INGRESS, AUTOSCALER, DISRUPTION_BUDGET, NETWORK_POLICY)


@dataclass(frozen=True)
class Owner:
    """The identity of a ModelDeployment, as its children refer to it."""

    name: str
    namespace: str
    uid: str


def selector_labels(owner: Owner) -> dict[str, str]:
    """The labels that select an owner's pods; immutable in a Deployment, so never change them."""
    return {LABEL_NAME: "modeldeploy-runtime", LABEL_INSTANCE: owner.name}


def child_labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        LABEL_COMPONENT: "model-server",
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def model_name(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    return spec.model.name or owner.name


def artifact_path(directory: str, uri: str) -> str:
    """Where `modeldeploy-runtime fetch --dest DIR` puts the file at URI: DIR/<its base name>."""
    return posixpath.join(directory, posixpath.basename(urlparse(uri).path) or "model.onnx")


def model_digest(spec: api.ModelDeploymentSpec) -> str:
    served = {
        "model": spec.model.model_dump(mode="json"),
        "quantization": spec.quantization,
        "calibrationUri": spec.calibration_uri,
    }
    return _digest(served)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _metadata(owner: Owner, **extra: Any) -> Object:
    return {
        "name": owner.name,
        "namespace": owner.namespace,
        "labels": child_labels(owner),
        "ownerReferences": [
            {
                "apiVersion": f"{api.GROUP}/{api.VERSION}",
                "kind": api.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        **extra,
    }


def _object(kind: Kind, owner: Owner, spec: Object) -> Object:
    body: Object = {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": _metadata(owner),
        "spec": spec,
    }
    body["metadata"]["annotations"] = {ANNOTATION_APPLIED_DIGEST: _digest(body)}
    return body


def _quantities(values: dict[str, api.IntOrString] | None) -> dict[str, str]:
    return {name: str(value) for name, value in (values or {}).items()}


def _pvc_mounts(uris: list[str]) -> tuple[list[Object], list[Object]]:
    """Volumes and read-only mounts for the claims that pvc:// URIs name."""
    claims = sorted({urlparse(uri).netloc for uri in uris if uri.startswith("pvc://")})
    volumes = [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for i, claim in enumerate(claims)
    ]
    mounts = [
        {"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}
        for i, claim in enumerate(claims)
    ]
    return volumes, mounts


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def _fetch_container(name: str, image: str, uri: str, sha256: str | None, dest: str) -> Object:
    args = ["fetch", "--uri", uri, "--dest", dest]
    if sha256:
        args += ["--sha256", sha256.lower()]
    return {
        "name": name,
        "image": image,
        "command": ["modeldeploy-runtime"],
        "args": args,
        # The status reports why a fetch failed from the tail of its log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _CONTAINER_SECURITY,
    }


def _serve_args(owner: Owner, spec: api.ModelDeploymentSpec, calibration_dir: str) -> list[str]:
    runtime = spec.runtime
    args = [
        "serve",
        "--model-path",
        artifact_path(f"{MODEL_DIR}/model", spec.model.uri),
        "--model-name",
        model_name(owner, spec),
        "--quantization",
        spec.quantization,
        "--max-batch-size",
        str(runtime.max_batch_size),
        "--max-batch-delay-ms",
        str(runtime.max_batch_delay_ms),
        "--max-queue-size",
        str(runtime.max_queue_size),
        "--max-queue-bytes",
        str(runtime.max_queue_bytes),
        "--workers",
        str(runtime.workers),
        "--threads",
        str(runtime.threads),
        "--device",
        "cuda" if spec.accelerator else "cpu",
        "--drain-seconds",
        str(DRAIN_SECONDS),
        "--http-port",
        str(HTTP_PORT),
        "--grpc-port",
        str(GRPC_PORT),
    ]
    if runtime.batch_sizes:
        args += ["--batch-sizes", ",".join(str(size) for size in sorted(set(runtime.batch_sizes)))]
    if spec.accelerator:
        args += ["--cudnn-conv-algo-search", runtime.cudnn_conv_algo_search]
    if spec.model.version:
        args += ["--model-version", spec.model.version]
    if spec.calibration_uri:
        args += ["--calibration-path", artifact_path(calibration_dir, spec.calibration_uri)]
    return args


def _probe(path: str, period: int, failures: int) -> Object:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def deployment(owner: Owner, spec: api.ModelDeploymentSpec, default_image: str) -> Object:
    image = spec.runtime.image or default_image
    model_dir = f"{MODEL_DIR}/model"
    calibration_dir = f"{MODEL_DIR}/calibration"
    uris = [spec.model.uri] + ([spec.calibration_uri] if spec.calibration_uri else [])
    pvc_volumes, pvc_mounts = _pvc_mounts(uris)
    work_mounts = [
        {"name": "models", "mountPath": MODEL_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]

    init_containers = [
        _fetch_container("fetch-model", image, spec.model.uri, spec.model.sha256, model_dir)
    ]
    if spec.calibration_uri:
        init_containers.append(
            _fetch_container(
                "fetch-calibration", image, spec.calibration_uri, None, calibration_dir
            )
        )
    for container in init_containers:
        container["volumeMounts"] = work_mounts + pvc_mounts

    requests = _quantities(spec.resources.requests if spec.resources else None)
    limits = _quantities(spec.resources.limits if spec.resources else None)
    node_selector = dict(spec.node_selector or {})
    tolerations = list(spec.tolerations or [])
    if spec.accelerator:
        limits[GPU_RESOURCE] = str(spec.accelerator.count)
        if spec.accelerator.product:
            node_selector[GPU_PRODUCT_LABEL] = spec.accelerator.product
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    serve: Object = {
        "name": "runtime",
        "image": image,
        "command": ["modeldeploy-runtime"],
        "args": _serve_args(owner, spec, calibration_dir),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        # Loading (and quantizing) a large model can take minutes; liveness waits for it.
        "startupProbe": _probe("/v2/health/live", period=2, failures=300),
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if resources:
        serve["resources"] = resources

    pod_labels = child_labels(owner)
    if spec.model.version:
        pod_labels[LABEL_MODEL_VERSION] = spec.model.version
    pod_spec: Object = {
        "automountServiceAccountToken": False,
        # The runtime's SIGTERM sequence: serve on (not ready) through the drain delay,
        # then give in-flight requests their time; the grace period covers both.
        "terminationGracePeriodSeconds": DRAIN_SECONDS + FINISH_SECONDS + 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NONROOT_UID,
            "runAsGroup": NONROOT_UID,
            "fsGroup": NONROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init_containers,
        "containers": [serve],
        "volumes": [
            {"name": "models", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            *pvc_volumes,
        ],
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity

    deployment_spec: Object = {
        "selector": {"matchLabels": selector_labels(owner)},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {ANNOTATION_MODEL_DIGEST: model_digest(spec)},
            },
            "spec": pod_spec,
        },
    }
    # Under autoscaling the HPA owns replicas: leaving the field out of the applied
    # configuration is what keeps server-side apply from ever resetting it.
    if spec.autoscaling is None:
        deployment_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return _object(DEPLOYMENT, owner, deployment_spec)


def service(owner: Owner, spec: api.ModelDeploymentSpec) -> Object:
    return _object(
        SERVICE,
        owner,
        {
            "type": spec.service.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
            ],
        },
    )


def ingress(owner: Owner, settings: api.IngressSettings) -> Object:
    ingress_spec: Object = {
        "rules": [
            {
                "host": settings.host,
                "http": {
                    "paths": [
                        {
                            "path": settings.path,
                            "pathType": "Prefix",
                            "backend": {"service": {"name": owner.name, "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ]
    }
    if settings.class_name:
        ingress_spec["ingressClassName"] = settings.class_name
    if settings.tls_secret_name:
        ingress_spec["tls"] = [{"hosts": [settings.host], "secretName": settings.tls_secret_name}]
    return _object(INGRESS, owner, ingress_spec)


def autoscaler(owner: Owner, settings: api.Autoscaling) -> Object:
    metric: Object
    if settings.metric == "concurrency":
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": CONCURRENCY_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(settings.target)},
            },
        }
    else:
        metric = {
            "type": "Resource",
            "resource": {
                "name": settings.metric,
                "target": {"type": "Utilization", "averageUtilization": settings.target},
            },
        }
    return _object(
        AUTOSCALER,
        owner,
        {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [metric],
        },
    )


def disruption_budget(owner: Owner, settings: api.DisruptionBudget) -> Object:
    budget: Object = {"selector": {"matchLabels": selector_labels(owner)}}
    if settings.min_available is not None:
        budget["minAvailable"] = settings.min_available
    if settings.max_unavailable is not None:
        budget["maxUnavailable"] = settings.max_unavailable
    return _object(DISRUPTION_BUDGET, owner, budget)


def network_policy(owner: Owner, settings: api.NetworkPolicySettings) -> Object:
    rule: Object = {
        "ports": [
            {"port": HTTP_PORT, "protocol": "TCP"},
            {"port": GRPC_PORT, "protocol": "TCP"},
        ]
    }
    if settings.allow_from:
        rule["from"] = settings.allow_from
    return _object(
        NETWORK_POLICY,
        owner,
        {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    )


def children(owner: Owner, spec: api.ModelDeploymentSpec, default_image: str) -> dict[Kind, Object]:
    """Every child the spec asks for; a kind missing from the result is not wanted."""
    wanted = {
        DEPLOYMENT: deployment(owner, spec, default_image),
        SERVICE: service(owner, spec),
    }
    if spec.ingress:
        wanted[INGRESS] = ingress(owner, spec.ingress)
    if spec.autoscaling:
        wanted[AUTOSCALER] = autoscaler(owner, spec.autoscaling)
    if spec.disruption_budget:
        wanted[DISRUPTION_BUDGET] = disruption_budget(owner, spec.disruption_budget)
    if spec.network_policy:
        wanted[NETWORK_POLICY] = network_policy(owner, spec.network_policy)
    return wanted


def url(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    """Where clients send inference requests: the Ingress if any, else the Service."""
    path = f"/v2/models/{model_name(owner, spec)}"
    if spec.ingress:
        scheme = "https" if spec.ingress.tls_secret_name else "http"
        return f"{scheme}://{spec.ingress.host}{spec.ingress.path.rstrip('/')}{path}"
    return f"http://{owner.name}.{owner.namespace}.svc:{HTTP_PORT}{path}"
