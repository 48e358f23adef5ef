"""Pure builders: the desired child objects of one ModelDeployment.

Each builder takes the owner and its validated spec and returns a plain dict ready for
server-side apply. Nothing here talks to the API server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from modeldeploy_contract import flags, metrics, paths, values
from modeldeploy_operator import spec as api

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONCURRENCY_METRIC = metrics.INFLIGHT
# The distroless "nonroot" user; the runtime image runs as it.
NONROOT_UID = 65532

MANAGED_BY = "modeldeploy"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL_VERSION = "modeldeploy.io/model-version"
# Set by the API server on every namespace: a NetworkPolicy names one namespace through it.
_NAMESPACE_NAME = "kubernetes.io/metadata.name"
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
# Last: of all children only its API may be missing (the Gateway API CRDs are an add-on).
HTTP_ROUTE = Kind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes")
CHILD_KINDS = (
    DEPLOYMENT,
    SERVICE,
    INGRESS,
    AUTOSCALER,
    DISRUPTION_BUDGET,
    NETWORK_POLICY,
    HTTP_ROUTE,
)


@dataclass(frozen=True)
class Owner:
    """The identity of a ModelDeployment, as its children refer to it."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class OperatorPods:
    """Where the operator's own pods run: it scrapes the runtime pods' metrics from there."""

    namespace: str
    labels: tuple[tuple[str, str], ...]


def selector_labels(owner: Owner) -> dict[str, str]:
    """The labels that select an owner's pods; immutable in a Deployment, so never change them."""
    return {LABEL_NAME: "modeldeploy-runtime", LABEL_INSTANCE: owner.name}


def child_labels(owner: Owner) -> dict[str, str]:
    return {
        **selector_labels(owner),
        LABEL_COMPONENT: "model-server",
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def owned_by(obj: api.Object, uid: str) -> bool:
    """Whether the owner with this uid is among the object's owner references."""
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


def model_name(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    return spec.model.name or owner.name


def model_digest(spec: api.ModelDeploymentSpec) -> str:
    served = {
        "model": spec.model.model_dump(mode="json"),
        "quantization": spec.quantization,
        "calibrationUri": spec.calibration_uri,
    }
    return _digest(served)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _metadata(owner: Owner, **extra: Any) -> api.Object:
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


def _object(kind: Kind, owner: Owner, spec: api.Object) -> api.Object:
    body: api.Object = {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": _metadata(owner),
        "spec": spec,
    }
    body["metadata"]["annotations"] = {ANNOTATION_APPLIED_DIGEST: _digest(body)}
    return body


def _quantities(values: dict[str, api.IntOrString] | None) -> dict[str, str]:
    return {name: str(value) for name, value in (values or {}).items()}


# Room beside the artifacts: file system overhead, and on /tmp the metrics files.
_VOLUME_SLACK = 16 * 2**20
_TMP_SLACK = 256 * 2**20


def fetch_settings(
    uri: str, sha256: str | None, dest: str, max_bytes: int | None = None
) -> dict[str, str]:
    """The runtime settings of `modeldeploy-runtime fetch` for one artifact."""
    settings = {flags.URI: uri, flags.DEST: dest}
    if sha256:
        settings[flags.SHA256] = sha256.lower()
    if max_bytes:
        settings[flags.MAX_BYTES] = str(max_bytes)
    return settings


def serve_settings(
    owner: Owner, spec: api.ModelDeploymentSpec, models_dir: str = paths.MODELS_DIR
) -> dict[str, str]:
    """The runtime settings of `modeldeploy-runtime serve` for a spec whose artifacts were
    fetched under `models_dir`, each into its folder (`artifacts`). Pods get them as flags;
    `modeldeploy serve` passes them to the runtime the same way, with its work folder."""

    def fetched(directory: str, uri: str) -> str:
        return paths.artifact_path(models_dir + directory.removeprefix(paths.MODELS_DIR), uri)

    runtime = spec.runtime
    settings = {
        flags.MODEL_PATH: fetched(paths.MODEL_DIR, spec.model.uri),
        flags.MODEL_NAME: model_name(owner, spec),
        flags.QUANTIZATION: spec.quantization,
        flags.MAX_BATCH_SIZE: str(runtime.max_batch_size),
        flags.MAX_BATCH_DELAY_MS: str(runtime.max_batch_delay_ms),
        flags.MAX_QUEUE_SIZE: str(runtime.max_queue_size),
        flags.MAX_QUEUE_BYTES: str(runtime.max_queue_bytes),
        flags.WORKERS: str(runtime.workers),
        flags.THREADS: str(runtime.threads),
        flags.DEVICE: "cuda" if spec.accelerator else "cpu",
        flags.DRAIN_SECONDS: str(values.DRAIN_SECONDS),
        flags.HTTP_PORT: str(paths.HTTP_PORT),
        flags.GRPC_PORT: str(paths.GRPC_PORT),
    }
    if runtime.batch_sizes:
        settings[flags.BATCH_SIZES] = ",".join(str(s) for s in sorted(set(runtime.batch_sizes)))
    if runtime.padding:
        settings[flags.PADDING] = runtime.padding.model_dump_json(exclude_none=True)
    if spec.accelerator:
        settings[flags.CUDNN_CONV_ALGO_SEARCH] = runtime.cudnn_conv_algo_search
    if spec.model.version:
        settings[flags.MODEL_VERSION] = spec.model.version
    if prefix := path_prefix(spec):
        settings[flags.PATH_PREFIX] = prefix
    if spec.calibration_uri:
        settings[flags.CALIBRATION_PATH] = fetched(paths.CALIBRATION_DIR, spec.calibration_uri)
    if warmup := runtime.warmup:
        if warmup.uri:
            settings[flags.WARMUP_PATH] = fetched(paths.WARMUP_DIR, warmup.uri)
        if warmup.shapes is not None:
            settings[flags.WARMUP_SHAPES] = json.dumps(warmup.shapes, separators=(",", ":"))
    if gate := spec.validation:
        settings[flags.VALIDATION_PATH] = fetched(paths.VALIDATION_DIR, gate.uri)
        if gate.min_agreement is not None:
            settings[flags.MIN_AGREEMENT] = str(gate.min_agreement)
        if gate.min_accuracy is not None:
            settings[flags.MIN_ACCURACY] = str(gate.min_accuracy)
        settings[flags.VALIDATION_TOLERANCE] = str(gate.tolerance)
    return settings


def path_prefix(spec: api.ModelDeploymentSpec) -> str:
    """The path the Ingress or HTTPRoute serves, without its trailing slash ("" for "/")."""
    routed = spec.ingress or spec.gateway
    return routed.path.rstrip("/") if routed else ""


def _pvc_mounts(uris: list[str]) -> tuple[list[api.Object], list[api.Object]]:
    """Volumes and read-only mounts for the claims that pvc:// URIs name."""
    claims = sorted({urlparse(uri).netloc for uri in uris if uri.startswith("pvc://")})
    volumes = [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for i, claim in enumerate(claims)
    ]
    mounts = [
        {"name": f"pvc-{i}", "mountPath": f"{paths.PVC_ROOT}/{claim}", "readOnly": True}
        for i, claim in enumerate(claims)
    ]
    return volumes, mounts


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}

_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": NONROOT_UID,
    "runAsGroup": NONROOT_UID,
    "fsGroup": NONROOT_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container(name: str, image: str, command: str, settings: dict[str, str]) -> api.Object:
    return {
        "name": name,
        "image": image,
        "command": [flags.COMMAND],
        "args": flags.argv(command, settings),
        # The status reports why a container failed from the tail of its log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _CONTAINER_SECURITY,
    }


def _uris(spec: api.ModelDeploymentSpec) -> list[str]:
    return [uri for uri, _, _ in artifacts(spec)]


def artifacts(spec: api.ModelDeploymentSpec) -> list[tuple[str, str | None, str]]:
    """Every file a pod fetches before serving: URI, expected sha256, folder (under
    paths.MODELS_DIR)."""
    artifacts = [(spec.model.uri, spec.model.sha256, paths.MODEL_DIR)]
    if spec.calibration_uri:
        artifacts.append((spec.calibration_uri, spec.calibration_sha256, paths.CALIBRATION_DIR))
    warmup = spec.runtime.warmup
    if warmup is not None and warmup.uri:
        artifacts.append((warmup.uri, warmup.sha256, paths.WARMUP_DIR))
    if spec.validation is not None:
        artifacts.append((spec.validation.uri, spec.validation.sha256, paths.VALIDATION_DIR))
    return artifacts


def _init_containers(spec: api.ModelDeploymentSpec, image: str) -> list[api.Object]:
    """One container per artifact: fetch, verify, write it into the shared volume."""
    names = {
        paths.MODEL_DIR: "fetch-model",
        paths.CALIBRATION_DIR: "fetch-calibration",
        paths.WARMUP_DIR: "fetch-warmup",
        paths.VALIDATION_DIR: "fetch-validation",
    }
    fetches = [(names[dest], uri, sha256, dest) for uri, sha256, dest in artifacts(spec)]
    _, pvc_mounts = _pvc_mounts(_uris(spec))
    work_mounts = [
        {"name": "models", "mountPath": paths.MODELS_DIR},
        {"name": "tmp", "mountPath": paths.TMP_DIR},
    ]
    return [
        _container(
            name,
            image,
            flags.FETCH,
            fetch_settings(uri, sha256, dest, spec.model.max_size_bytes),
        )
        | {"volumeMounts": work_mounts + pvc_mounts}
        for name, uri, sha256, dest in fetches
    ]


def _probe(path: str, period: int, failures: int) -> api.Object:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def _probes() -> api.Object:
    return {
        # Loading (and quantizing) a large model can take minutes; liveness waits for it.
        "startupProbe": _probe(paths.LIVE_PATH, period=2, failures=300),
        "readinessProbe": _probe(paths.READY_PATH, period=5, failures=3),
        "livenessProbe": _probe(paths.LIVE_PATH, period=10, failures=3),
    }


def _resources(spec: api.ModelDeploymentSpec) -> api.Object:
    requests = _quantities(spec.resources.requests if spec.resources else None)
    limits = _quantities(spec.resources.limits if spec.resources else None)
    if spec.accelerator:
        limits[GPU_RESOURCE] = str(spec.accelerator.count)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _serving_container(owner: Owner, spec: api.ModelDeploymentSpec, image: str) -> api.Object:
    settings = serve_settings(owner, spec)
    serve = _container("runtime", image, flags.SERVE, settings) | {
        "ports": [
            {"name": "http", "containerPort": paths.HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": paths.GRPC_PORT, "protocol": "TCP"},
        ],
        **_probes(),
        "volumeMounts": [
            {"name": "models", "mountPath": paths.MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": paths.TMP_DIR},
        ],
    }
    # The key order of the applied object is kept as it was: the applied digest hashes it.
    serve["securityContext"] = serve.pop("securityContext")
    serve["volumeMounts"] = serve.pop("volumeMounts")
    resources = _resources(spec)
    if resources:
        serve["resources"] = resources
    return serve


def _scheduling(spec: api.ModelDeploymentSpec) -> api.Object:
    """Node selector, tolerations and affinity; GPU models go to the nodes of their product."""
    node_selector = dict(spec.node_selector or {})
    tolerations = list(spec.tolerations or [])
    if spec.accelerator:
        if spec.accelerator.product:
            node_selector[GPU_PRODUCT_LABEL] = spec.accelerator.product
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    scheduling: api.Object = {}
    if node_selector:
        scheduling["nodeSelector"] = node_selector
    if tolerations:
        scheduling["tolerations"] = tolerations
    if spec.affinity:
        scheduling["affinity"] = spec.affinity
    return scheduling


def _work_volumes(spec: api.ModelDeploymentSpec) -> list[api.Object]:
    """The shared model volume and /tmp, sized by model.maxSizeBytes when it is given: each
    artifact may be that large, and /tmp holds at most a converted copy of the model."""
    limit = spec.model.max_size_bytes
    if limit is None:
        return [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    artifacts = len(_uris(spec))
    return [
        {"name": "models", "emptyDir": {"sizeLimit": str(artifacts * limit + _VOLUME_SLACK)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": str(limit + _TMP_SLACK)}},
    ]


def _pod_template(owner: Owner, spec: api.ModelDeploymentSpec, image: str) -> api.Object:
    pvc_volumes, _ = _pvc_mounts(_uris(spec))
    labels = child_labels(owner)
    if spec.model.version:
        labels[LABEL_MODEL_VERSION] = spec.model.version
    pod_spec: api.Object = {
        "automountServiceAccountToken": False,
        # The runtime's SIGTERM sequence: serve on (not ready) through the drain delay,
        # then give in-flight requests their time; the grace period covers both.
        "terminationGracePeriodSeconds": values.DRAIN_SECONDS + values.FINISH_SECONDS + 5,
        "securityContext": _POD_SECURITY,
        "initContainers": _init_containers(spec, image),
        "containers": [_serving_container(owner, spec, image)],
        "volumes": [*_work_volumes(spec), *pvc_volumes],
        **_scheduling(spec),
    }
    return {
        "metadata": {
            "labels": labels,
            "annotations": {ANNOTATION_MODEL_DIGEST: model_digest(spec)},
        },
        "spec": pod_spec,
    }


def deployment(owner: Owner, spec: api.ModelDeploymentSpec, default_image: str) -> api.Object:
    image = spec.runtime.image or default_image
    deployment_spec: api.Object = {
        "selector": {"matchLabels": selector_labels(owner)},
        "template": _pod_template(owner, spec, image),
    }
    # Under autoscaling the HPA owns replicas: leaving the field out of the applied
    # configuration is what keeps server-side apply from ever resetting it.
    if spec.autoscaling is None:
        deployment_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return _object(DEPLOYMENT, owner, deployment_spec)


def service(owner: Owner, spec: api.ModelDeploymentSpec) -> api.Object:
    return _object(
        SERVICE,
        owner,
        {
            "type": spec.service.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": "http", "port": paths.HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": paths.GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",
                },
            ],
        },
    )


def ingress(owner: Owner, settings: api.IngressSettings) -> api.Object:
    ingress_spec: api.Object = {
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


def http_route(owner: Owner, settings: api.GatewaySettings) -> api.Object:
    """An HTTPRoute from the Gateways' listeners to the Service's HTTP port; the path is kept,
    since the runtime serves under it."""
    return _object(
        HTTP_ROUTE,
        owner,
        {
            "parentRefs": [
                ref.model_dump(by_alias=True, exclude_none=True) for ref in settings.parent_refs
            ],
            "hostnames": list(settings.hostnames),
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": settings.path}}],
                    "backendRefs": [{"name": owner.name, "port": paths.HTTP_PORT}],
                }
            ],
        },
    )


def autoscaler(owner: Owner, settings: api.Autoscaling) -> api.Object:
    metric: api.Object
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


def disruption_budget(owner: Owner, settings: api.DisruptionBudget) -> api.Object:
    budget: api.Object = {"selector": {"matchLabels": selector_labels(owner)}}
    if settings.min_available is not None:
        budget["minAvailable"] = settings.min_available
    if settings.max_unavailable is not None:
        budget["maxUnavailable"] = settings.max_unavailable
    return _object(DISRUPTION_BUDGET, owner, budget)


def network_policy(
    owner: Owner, settings: api.NetworkPolicySettings, operator: OperatorPods | None = None
) -> api.Object:
    """Admits `allowFrom` to the serving ports; and the operator's own pods, when it runs in
    one, to the HTTP port, whose /metrics it scrapes for status.metrics."""
    rule: api.Object = {
        "ports": [
            {"port": paths.HTTP_PORT, "protocol": "TCP"},
            {"port": paths.GRPC_PORT, "protocol": "TCP"},
        ]
    }
    rules = [rule]
    if settings.allow_from:
        rule["from"] = settings.allow_from
        if operator is not None:
            scrape = {
                "namespaceSelector": {"matchLabels": {_NAMESPACE_NAME: operator.namespace}},
                "podSelector": {"matchLabels": dict(operator.labels)},
            }
            http = {"port": paths.HTTP_PORT, "protocol": "TCP"}
            rules.append({"from": [scrape], "ports": [http]})
    return _object(
        NETWORK_POLICY,
        owner,
        {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    )


def children(
    owner: Owner,
    spec: api.ModelDeploymentSpec,
    default_image: str,
    operator: OperatorPods | None = None,
) -> dict[Kind, api.Object]:
    """Every child the spec asks for; a kind missing from the result is not wanted. `operator`:
    where the operator runs, if in a pod (its NetworkPolicy admits the operator's scrape)."""
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
        wanted[NETWORK_POLICY] = network_policy(owner, spec.network_policy, operator)
    if spec.gateway:
        wanted[HTTP_ROUTE] = http_route(owner, spec.gateway)
    return wanted


def url(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    """Where clients send inference requests: the Ingress or HTTPRoute if any, else the Service.

    Through a Gateway the scheme is https when a parent reference names port 443: the route does
    not say more about its listeners.
    """
    path = f"{path_prefix(spec)}/v2/models/{model_name(owner, spec)}"
    if spec.ingress:
        scheme = "https" if spec.ingress.tls_secret_name else "http"
        return f"{scheme}://{spec.ingress.host}{path}"
    if spec.gateway:
        secure = any(ref.port == 443 for ref in spec.gateway.parent_refs)
        return f"{'https' if secure else 'http'}://{spec.gateway.hostnames[0]}{path}"
    return f"http://{owner.name}.{owner.namespace}.svc:{paths.HTTP_PORT}{path}"
