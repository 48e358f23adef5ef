"""Allowed values, patterns and defaults of the settings both sides check."""

from __future__ import annotations

QUANTIZATIONS = ("none", "dynamic-int8", "static-int8", "fp16")
DEVICES = ("auto", "cpu", "cuda")
URI_SCHEMES = ("https", "http", "s3", "gs", "pvc", "file")

SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
# A model's name appears in URLs (/v2/models/<name>) and as a metric label.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
MODEL_NAME_MAX_LENGTH = 63
# The path an Ingress or HTTPRoute serves ("/", "/ml", "/teams/ml/"), and the prefix the runtime
# then serves its routes under too: the path without its trailing slash ("", "/ml", "/teams/ml").
HTTP_PATH_PATTERN = r"^(/|(/[A-Za-z0-9._~-]+)+/?)$"
PATH_PREFIX_PATTERN = r"^(/[A-Za-z0-9._~-]+)*$"

MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_MS = 5
MAX_QUEUE_SIZE = 1024
THREADS = 0  # derived from the CPU limit
DEFAULT_MODEL_VERSION = "1"

# After SIGTERM the runtime stays up, not ready, for DRAIN_SECONDS (clients keep arriving until
# the endpoint's removal has spread), then in-flight requests get up to FINISH_SECONDS; the pod's
# termination grace period covers both.
DRAIN_SECONDS = 10
FINISH_SECONDS = 15

# The runtime's exit status when the warm-up the user asked for (spec.runtime.warmup) fails;
# the operator reports it as the Stalled reason WarmupFailed.
EXIT_WARMUP_FAILED = 3
# The runtime's exit status when the model fails its accuracy gate (spec.validation): the
# operator reports it as the Stalled reason ValidationFailed, with the runtime's one line.
EXIT_VALIDATION_FAILED = 4
# Relative and absolute tolerance within which a regressor's output agrees (spec.validation).
VALIDATION_TOLERANCE = 0.01
