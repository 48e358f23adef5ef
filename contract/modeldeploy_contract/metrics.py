"""The runtime's Prometheus metric names (without the `_total`/`_bucket` suffixes).

The operator summarises them into status.metrics, the autoscaler scales on the in-flight gauge,
and the Grafana dashboard queries them.
"""

from __future__ import annotations

REQUESTS = "modeldeploy_requests"
REQUEST_DURATION = "modeldeploy_request_duration_seconds"
BATCH_SIZE = "modeldeploy_batch_size"
QUEUE_DURATION = "modeldeploy_queue_duration_seconds"
INFERENCE_DURATION = "modeldeploy_inference_duration_seconds"
INFLIGHT = "modeldeploy_inflight_requests"
MODEL_INFO = "modeldeploy_model_info"
QUANTIZATION_TOP1_AGREEMENT = "modeldeploy_quantization_top1_agreement"
VALIDATION = "modeldeploy_validation"
QUANTIZATION_MAX_ABS_ERROR = "modeldeploy_quantization_max_abs_error"

# Labels every series carries, and the outcomes of modeldeploy_requests.
MODEL_LABEL = "model"
OUTCOME_SUCCESS = "success"
OUTCOME_CLIENT_ERROR = "client_error"
OUTCOME_REJECTED = "rejected"
OUTCOME_SERVER_ERROR = "server_error"
