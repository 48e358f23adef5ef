"""The ModelDeployment API (modeldeploy.io/v1alpha1) as pydantic models.

These models are the one source of truth for the CRD: `crd.py` generates the OpenAPI schema
(descriptions, defaults, CEL rules) from them, and the operator parses every object with them.
The CEL rules run in the API server; the Python validators repeat them for objects that never
went through it (for example `modeldeploy serve -f md.yaml`). Of ours, this module imports only
the operator-runtime contract, whose values and patterns it enforces.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from modeldeploy_contract import paths, values

GROUP = "modeldeploy.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SHORT_NAME = "md"

URI_SCHEMES = values.URI_SCHEMES
_URI_PATTERN = rf"^({'|'.join(URI_SCHEMES)})://.+$"
_URI_MESSAGE = "must start with one of " + ", ".join(f"{s}://" for s in URI_SCHEMES)
_SHA256_PATTERN = values.SHA256_PATTERN
_URI_MAX_LENGTH = 2048

# A Kubernetes object as plain JSON.
Object = dict[str, Any]
# The values of the contract's QUANTIZATIONS; a test checks that they agree.
Quantization = Literal["none", "dynamic-int8", "static-int8", "fp16"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
_INT8_ON_GPU = (
    "{mode} with an accelerator is refused: {why}; use quantization fp16 on a GPU "
    "(or remove the accelerator)"
)
DYNAMIC_INT8_ON_GPU = _INT8_ON_GPU.format(
    mode="dynamic-int8",
    why="ONNX Runtime runs its integer ops on the CPU, 6-8x slower than FP32 on the GPU",
)
STATIC_INT8_ON_GPU = _INT8_ON_GPU.format(
    mode="static-int8",
    why="INT8 on a GPU needs ONNX Runtime's TensorRT provider, which the runtime-cuda image "
    "does not carry",
)
FP16_ON_CPU = (
    "fp16 is for GPUs: on CPU ONNX Runtime converts most float16 work back to float32, slower "
    "than FP32; add an accelerator, or use dynamic-int8 on CPU"
)
BATCH_SIZES_MESSAGE = "the largest of batchSizes must equal maxBatchSize, and none exceed it"
WARMUP_ONE_OF = "warmup takes shapes or uri (sample inputs), exactly one of them"
WARMUP_SHA256 = "warmup.sha256 checks the file at warmup.uri, which is not given"
VALIDATION_FLOOR = "validation needs a floor: minAgreement, minAccuracy or both"
GATEWAY_AND_INGRESS = (
    "gateway and ingress are mutually exclusive: serve the model through an HTTPRoute or an "
    "Ingress, not both"
)
AutoscalingMetric = Literal["cpu", "memory", "concurrency"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
ConditionStatus = Literal["True", "False", "Unknown"]
# A Kubernetes quantity ("500m", "2Gi", 4) or, for a disruption budget, a count or "50%".
IntOrString = int | str


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    validation = {"rule": rule, "message": message}
    if field_path is not None:
        validation["fieldPath"] = field_path
    return validation


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _check_uri(value: str | None) -> str | None:
    if value is None:
        return value
    if not re.match(_URI_PATTERN, value):
        raise ValueError(_URI_MESSAGE)
    try:
        paths.artifact_name(value)
    except ValueError as error:
        raise ValueError(f"{error}: the path must end in the file's name") from None
    return value


def _check_sha256(value: str | None) -> str | None:
    if value is not None and not re.match(_SHA256_PATTERN, value):
        raise ValueError("must be 64 hexadecimal digits")
    return value


def _sha256_field(description: str) -> Any:
    return Field(
        default=None,
        max_length=64,
        description=description,
        json_schema_extra=_validations(
            _cel(f"self.matches('{_SHA256_PATTERN}')", "must be 64 hexadecimal digits")
        ),
    )


def now() -> str:
    """The current time as the API server writes timestamps (RFC 3339, UTC, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def problems(error: ValidationError, prefix: str = "spec") -> str:
    """A validation error as one line: `spec.model.uri: <message>; ...`."""
    return "; ".join(f"{prefix}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
        protected_namespaces=(),
    )


class ModelSource(_Model):
    """Where the model comes from and what it is called."""

    uri: str = Field(
        max_length=_URI_MAX_LENGTH,
        description="Location of the .onnx file: https://, http://, s3://, gs://, "
        "pvc://<claim>/<path> or file:// (local use).",
        json_schema_extra=_validations(_cel(f"self.matches('{_URI_PATTERN}')", _URI_MESSAGE)),
    )
    sha256: str | None = _sha256_field(
        "Expected SHA-256 of the file (64 hex digits); a mismatch means the model is never served."
    )
    version: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Model version, shown in status, pod labels and metrics (a label value).",
    )
    name: str | None = Field(
        default=None,
        max_length=values.MODEL_NAME_MAX_LENGTH,
        pattern=values.MODEL_NAME_PATTERN,
        description="Name under /v2/models/<name>; defaults to metadata.name.",
    )
    max_size_bytes: int | None = Field(
        default=None,
        ge=1,
        le=2**40,
        description="Largest model file accepted: the download stops past it, and it sizes the "
        "pod's model volume (sizeLimit).",
    )

    _uri = field_validator("uri")(_check_uri)
    _sha256 = field_validator("sha256")(_check_sha256)


class PaddedInput(_Model):
    """One variable-length input: the axis it varies along and what pads it."""

    axis: int = Field(ge=1, le=16, description="The variable axis; 0 is the batch.")
    value: float = Field(
        default=0,
        allow_inf_nan=False,
        description="The pad value: 0 for input ids and attention masks.",
    )


class Padding(_Model):
    """Opt-in variable-length batching: requests whose variable-length inputs differ in
    length share a batch, each padded to the batch's longest (or to its bucket); outputs
    having that axis are cut back to each request's own length. The model must ignore the
    padding (an attention mask)."""

    inputs: dict[str, PaddedInput] = Field(
        min_length=1,
        max_length=64,
        description="Padded inputs by name; a request's padded inputs have one length.",
    )
    outputs: dict[str, Annotated[int, Field(ge=1, le=16)]] | None = Field(
        default=None,
        max_length=64,
        description="Outputs to cut back, by name, with their axis of that length. Default: "
        "every output whose axis the model names like a padded input's (`sequence`).",
    )
    buckets: list[Annotated[int, Field(ge=1, le=1_048_576)]] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Lengths to pad up to; requests of one bucket share batches, and a "
        "longer request is refused. Default: the longest request of each batch.",
    )


class Warmup(_Model):
    """What the runtime warms the model up with before the pod is Ready: example shapes
    (zeros) or sample inputs (.npz). Without it the model's own dims are used when all are
    known, and nothing when one is not: a size is never invented."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel("has(self.shapes) != has(self.uri)", WARMUP_ONE_OF),
            _cel("!has(self.sha256) || has(self.uri)", WARMUP_SHA256, ".sha256"),
        )
    )

    shapes: (
        dict[str, Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(max_length=16)]]
        | None
    ) = Field(
        default=None,
        max_length=256,
        description="One request's shape per input, e.g. {images: [1, 3, 640, 640]}; the "
        "runtime warms up with zeros of these shapes (at every batch size, on axis 0).",
    )
    uri: str | None = Field(
        default=None,
        max_length=_URI_MAX_LENGTH,
        description="Sample inputs (.npz, one array per input, one request's worth); same "
        "schemes as model.uri. For models that need real values (a sample rate, token ids).",
        json_schema_extra=_validations(_cel(f"self.matches('{_URI_PATTERN}')", _URI_MESSAGE)),
    )
    sha256: str | None = _sha256_field(
        "Expected SHA-256 of the samples; a mismatch means the model is never served."
    )

    _uri = field_validator("uri")(_check_uri)
    _sha256 = field_validator("sha256")(_check_sha256)

    @model_validator(mode="after")
    def _one_of(self) -> Warmup:
        if (self.shapes is None) == (self.uri is None):
            raise ValueError(WARMUP_ONE_OF)
        if self.sha256 is not None and self.uri is None:
            raise ValueError(WARMUP_SHA256)
        return self


class RuntimeSettings(_Model):
    """How the runtime serves the model."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!has(self.batchSizes) || (self.batchSizes.all(s, s <= self.maxBatchSize) && "
                "self.batchSizes.exists(s, s == self.maxBatchSize))",
                BATCH_SIZES_MESSAGE,
                ".batchSizes",
            )
        )
    )

    image: str | None = Field(
        default=None,
        max_length=512,
        description="Runtime image; defaults to the operator's configured runtime image.",
    )
    max_batch_size: int = Field(
        default=values.MAX_BATCH_SIZE,
        ge=0,
        le=4096,
        description="Largest batch the dynamic batcher forms; 0 never merges requests (each "
        "runs alone), as is done anyway for a model whose axis 0 is not a batch axis.",
    )
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Sizes every batch is padded up to, so the model only ever runs at these; "
        "the largest is maxBatchSize. Default: powers of two up to maxBatchSize on a GPU, every "
        "size (no padding) on CPU.",
    )
    max_batch_delay_ms: int = Field(
        default=values.MAX_BATCH_DELAY_MS,
        ge=0,
        le=10_000,
        description="Longest time a request waits for others to share its batch while the "
        "model is busy; a request that arrives while the model is idle runs at once.",
    )
    max_queue_size: int = Field(
        default=values.MAX_QUEUE_SIZE,
        ge=1,
        le=1_000_000,
        description="Queued requests beyond this get 429 / RESOURCE_EXHAUSTED.",
    )
    max_queue_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        le=64 * 1024**3,
        description="Bytes of queued request tensors beyond which requests get 429 / "
        "RESOURCE_EXHAUSTED; count it in the memory limit.",
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Front-end processes that accept and decode requests for the one model "
        "process; 0 derives them: 1 on CPU, about half the CPU limit on a GPU.",
    )
    cudnn_conv_algo_search: ConvAlgoSearch = Field(
        default="EXHAUSTIVE",
        description="cuDNN convolution algorithm search on a GPU; it runs once per batch size "
        "before the pod is Ready.",
    )
    threads: int = Field(
        default=values.THREADS,
        ge=0,
        le=1024,
        description="Inference threads; 0 derives them from the CPU limit.",
    )
    padding: Padding | None = Field(
        default=None,
        description="Variable-length batching (opt-in): requests of different lengths share "
        "padded batches.",
    )
    warmup: Warmup | None = Field(
        default=None,
        description="Shapes or sample inputs (.npz) to warm up with before the pod is Ready; "
        "if that warm-up fails the ModelDeployment is Stalled (WarmupFailed). On a GPU it is "
        "how the shapes of every batch size's session are known.",
    )

    @model_validator(mode="after")
    def _sizes(self) -> RuntimeSettings:
        sizes = self.batch_sizes
        if sizes is not None and max(sizes) != self.max_batch_size:
            raise ValueError(BATCH_SIZES_MESSAGE)
        return self


class Validation(_Model):
    """An accuracy gate: before a pod is Ready, the runtime measures the model it is about to
    serve on sample inputs; below a floor the pod never is, and the ModelDeployment is Stalled
    (ValidationFailed) with the figure and the floor."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel("has(self.minAgreement) || has(self.minAccuracy)", VALIDATION_FLOOR)
        )
    )

    uri: str = Field(
        max_length=_URI_MAX_LENGTH,
        description="Sample inputs (.npz: one array per input, samples on axis 0) and, for "
        "minAccuracy, the outputs expected for them as arrays named expected.<output> (class "
        "indices for an output of scores, values otherwise); same schemes as model.uri.",
        json_schema_extra=_validations(_cel(f"self.matches('{_URI_PATTERN}')", _URI_MESSAGE)),
    )
    sha256: str | None = _sha256_field(
        "Expected SHA-256 of the samples; a mismatch means the model is never served."
    )
    min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Floor of the quantized model's agreement with the unquantized one on the "
        "samples: the same top-1 class for an output of scores, values within tolerance "
        "otherwise. Not measured without quantization.",
    )
    min_accuracy: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Floor of the served model's accuracy against the expected outputs.",
    )
    tolerance: float = Field(
        default=values.VALIDATION_TOLERANCE,
        gt=0,
        le=1000,
        description="Relative and absolute tolerance within which values agree.",
    )

    _uri = field_validator("uri")(_check_uri)
    _sha256 = field_validator("sha256")(_check_sha256)

    @model_validator(mode="after")
    def _floor(self) -> Validation:
        if self.min_agreement is None and self.min_accuracy is None:
            raise ValueError(VALIDATION_FLOOR)
        return self


class Autoscaling(_Model):
    """A HorizontalPodAutoscaler owns the replica count."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "self.minReplicas <= self.maxReplicas",
                "minReplicas must not exceed maxReplicas",
                ".minReplicas",
            )
        )
    )

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=10, ge=1, le=1000, description="Most replicas.")
    metric: AutoscalingMetric = Field(
        default="cpu",
        description="cpu or memory (utilisation of the request) or concurrency "
        "(in-flight requests per pod).",
    )
    target: int = Field(
        default=70,
        ge=1,
        description="Target: percent of the request for cpu/memory, in-flight requests per pod "
        "for concurrency.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class Resources(_Model):
    """Compute resources of the serving container."""

    requests: dict[str, IntOrString] | None = Field(
        default=None, description="Resource requests, for example cpu: '1', memory: 1Gi."
    )
    limits: dict[str, IntOrString] | None = Field(
        default=None, description="Resource limits, for example memory: 2Gi."
    )


class Accelerator(_Model):
    """NVIDIA GPUs for the serving container."""

    count: int = Field(default=1, ge=1, le=16, description="GPUs per pod (nvidia.com/gpu).")
    product: str | None = Field(
        default=None,
        max_length=63,
        description="Required GPU model, matched against the node label nvidia.com/gpu.product.",
    )


class ServiceSettings(_Model):
    """The Service in front of the runtime pods."""

    type: ServiceType = Field(default="ClusterIP", description="Service type.")


def _path_field(what: str) -> Any:
    return Field(
        default="/",
        max_length=1024,
        pattern=values.HTTP_PATH_PATTERN,
        description=f"Path prefix the {what} serves (/ or /segment/...). The runtime serves "
        "the model under it too, so status.url answers with no rewrite.",
    )


class IngressSettings(_Model):
    """An Ingress to the HTTP port; absent means no Ingress."""

    host: str = Field(max_length=253, description="Host name the Ingress serves.")
    path: str = _path_field("Ingress")
    class_name: str | None = Field(default=None, max_length=253, description="IngressClass.")
    tls_secret_name: str | None = Field(
        default=None, max_length=253, description="Secret with the TLS certificate for the host."
    )


class ParentReference(_Model):
    """A Gateway (or one of its listeners) the HTTPRoute attaches to."""

    name: str = Field(min_length=1, max_length=253, description="The Gateway's name.")
    namespace: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="The Gateway's namespace; defaults to the ModelDeployment's.",
    )
    section_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="The listener's name."
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="The listener's port.")


class GatewaySettings(_Model):
    """An HTTPRoute (Gateway API) to the HTTP port; absent means no HTTPRoute."""

    parent_refs: list[ParentReference] = Field(
        min_length=1, max_length=32, description="Gateways the route attaches to."
    )
    hostnames: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        min_length=1,
        max_length=16,
        description="Host names the route serves; the first one is in status.url.",
    )
    path: str = _path_field("HTTPRoute")


class DisruptionBudget(_Model):
    """A PodDisruptionBudget; give exactly one of its fields."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "has(self.minAvailable) != has(self.maxUnavailable)",
                "give exactly one of minAvailable and maxUnavailable",
            )
        )
    )

    min_available: IntOrString | None = Field(
        default=None, description="Pods that must stay available (a count or a percentage)."
    )
    max_unavailable: IntOrString | None = Field(
        default=None, description="Pods that may be unavailable (a count or a percentage)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DisruptionBudget:
        if (self.min_available is None) == (self.max_unavailable is None):
            raise ValueError("give exactly one of minAvailable and maxUnavailable")
        return self


class NetworkPolicySettings(_Model):
    """A NetworkPolicy admitting traffic to the serving ports only."""

    allow_from: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=64,
        description="NetworkPolicyPeers allowed to connect; absent or empty allows any source.",
    )


class ModelDeploymentSpec(_Model):
    """The desired state: one model served by a set of runtime pods."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!(has(self.replicas) && has(self.autoscaling))",
                "replicas and autoscaling are mutually exclusive: with autoscaling the "
                "HorizontalPodAutoscaler owns the replica count",
                ".replicas",
            ),
            _cel(
                "self.quantization != 'static-int8' || has(self.calibrationUri)",
                "calibrationUri is required when quantization is static-int8",
                ".calibrationUri",
            ),
            _cel(
                "!has(self.accelerator) || self.quantization != 'dynamic-int8'",
                DYNAMIC_INT8_ON_GPU,
                ".quantization",
            ),
            _cel(
                "!has(self.accelerator) || self.quantization != 'static-int8'",
                STATIC_INT8_ON_GPU,
                ".quantization",
            ),
            _cel(
                "has(self.accelerator) || self.quantization != 'fp16'", FP16_ON_CPU, ".quantization"
            ),
            _cel("!(has(self.gateway) && has(self.ingress))", GATEWAY_AND_INGRESS, ".gateway"),
        )
    )

    model: ModelSource = Field(description="The model to serve.")
    quantization: Quantization = Field(
        default="none",
        description="Precision the runtime converts the model to at load: INT8 on CPU, "
        "float16 on a GPU (inputs and outputs stay FP32).",
    )
    calibration_uri: str | None = Field(
        default=None,
        max_length=_URI_MAX_LENGTH,
        description="Sample inputs (.npz) for static-int8 calibration; same schemes as model.uri.",
        json_schema_extra=_validations(_cel(f"self.matches('{_URI_PATTERN}')", _URI_MESSAGE)),
    )
    calibration_sha256: str | None = _sha256_field(
        "Expected SHA-256 of the calibration file; a mismatch means the model is never served."
    )
    runtime: RuntimeSettings = Field(
        default=RuntimeSettings(), description="Runtime image and batching settings."
    )
    validation: Validation | None = Field(
        default=None,
        description="An accuracy gate the model must pass before its pods are Ready.",
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Pods without autoscaling; absent means 1. Also the scale subresource.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Autoscaling; when set the operator never sets replicas."
    )
    resources: Resources | None = Field(
        default=None, description="Resources of the serving container."
    )
    accelerator: Accelerator | None = Field(default=None, description="GPUs for the model.")
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels; merged with the accelerator's."
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=64,
        description="Pod tolerations; GPU models also get the nvidia.com/gpu NoSchedule one.",
    )
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity.")
    service: ServiceSettings = Field(
        default=ServiceSettings(), description="The Service in front of the pods."
    )
    ingress: IngressSettings | None = Field(default=None, description="An optional Ingress.")
    gateway: GatewaySettings | None = Field(
        default=None, description="An optional HTTPRoute (Gateway API); excludes ingress."
    )
    disruption_budget: DisruptionBudget | None = Field(
        default=None, description="An optional PodDisruptionBudget."
    )
    network_policy: NetworkPolicySettings | None = Field(
        default=None, description="An optional NetworkPolicy."
    )

    _calibration_uri = field_validator("calibration_uri")(_check_uri)

    _calibration_sha256 = field_validator("calibration_sha256")(_check_sha256)

    @model_validator(mode="after")
    def _cross_field(self) -> ModelDeploymentSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("replicas and autoscaling are mutually exclusive")
        if self.quantization == "static-int8" and self.calibration_uri is None:
            raise ValueError("calibrationUri is required when quantization is static-int8")
        if self.accelerator is not None and self.quantization == "dynamic-int8":
            raise ValueError(DYNAMIC_INT8_ON_GPU)
        if self.accelerator is not None and self.quantization == "static-int8":
            raise ValueError(STATIC_INT8_ON_GPU)
        if self.accelerator is None and self.quantization == "fp16":
            raise ValueError(FP16_ON_CPU)
        if self.gateway is not None and self.ingress is not None:
            raise ValueError(GATEWAY_AND_INGRESS)
        return self


class Condition(_Model):
    """A kstatus condition."""

    type: str = Field(max_length=64, description="Ready, Reconciling or Stalled.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=128, description="Why, in one CamelCase word.")
    message: str = Field(max_length=4096, description="What a person can act on.")
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When status last changed.",
    )


class ModelStatus(_Model):
    """The model the current generation serves."""

    uri: str = Field(description="Model URI.")
    sha256: str | None = Field(default=None, description="Expected SHA-256.")
    version: str | None = Field(default=None, description="Model version.")
    quantization: Quantization = Field(description="Quantization applied at load.")


class MetricsStatus(_Model):
    """Traffic summarised from the runtime pods' metrics."""

    requests_per_second: float | None = Field(default=None, description="Requests per second.")
    latency_p50_ms: float | None = Field(default=None, description="Median latency (ms).")
    latency_p99_ms: float | None = Field(default=None, description="99th percentile latency (ms).")
    mean_batch_size: float | None = Field(default=None, description="Mean batch size.")
    error_rate: float | None = Field(default=None, description="Failed / all requests.")
    updated_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When computed."
    )


class ModelDeploymentStatus(_Model):
    """The observed state, written by the operator."""

    observed_generation: int | None = Field(
        default=None, description="The generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=8,
        description="Ready, Reconciling and Stalled (kstatus conventions).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int | None = Field(default=None, description="Pods of the Deployment.")
    ready_replicas: int | None = Field(default=None, description="Ready pods.")
    updated_replicas: int | None = Field(default=None, description="Pods of the current spec.")
    replica_summary: str | None = Field(
        default=None, description="Ready/desired pods, for kubectl get."
    )
    url: str | None = Field(default=None, description="Where to send inference requests.")
    model: ModelStatus | None = Field(default=None, description="The model being served.")
    metrics: MetricsStatus | None = Field(
        default=None, description="Traffic summary from the runtime pods."
    )
    kopf: dict[str, Any] | None = Field(
        default=None, description="The operator framework's own bookkeeping."
    )
