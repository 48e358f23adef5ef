"""The operator and the runtime agree: what the builders put into a pod is what the runtime reads.

The pod's container arguments and environment go through the runtime's own command-line and
settings parser, and the fetcher's output file is the one the server is told to load, including
for URIs with %-escapes, query strings and no extension.
"""

from __future__ import annotations

import http.server
import threading
import typing
from collections.abc import Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from modeldeploy_contract import flags, metrics, paths, values
from modeldeploy_operator import builders
from modeldeploy_operator import spec as api
from modeldeploy_runtime import cli as runtime_cli
from modeldeploy_runtime import fetch
from modeldeploy_runtime import metrics as runtime_metrics
from modeldeploy_runtime import settings as runtime_settings

OWNER = builders.Owner(name="iris", namespace="ml", uid="u-1")

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {"model": {"uri": "s3://models/iris/3/model.onnx"}},
    "everything": {
        "model": {"uri": "https://h/m.onnx", "version": "3", "name": "iris-v3", "sha256": "A" * 64},
        "quantization": "static-int8",
        "calibrationUri": "gs://b/calibration/samples.npz",
        "runtime": {
            "maxBatchSize": 64,
            "maxBatchDelayMs": 0,
            "maxQueueSize": 7,
            "threads": 3,
            "warmup": {"uri": "s3://b/warm/samples.npz", "sha256": "B" * 64},
        },
    },
    "unbatched": {
        "model": {"uri": "s3://models/vad/model.onnx"},
        "runtime": {"maxBatchSize": 0, "warmup": {"shapes": {"input": [1, 512], "sr": []}}},
    },
    "gpu": {
        "model": {"uri": "s3://models/resnet/model"},
        "quantization": "fp16",
        "runtime": {
            "maxBatchSize": 16,
            "batchSizes": [16, 1, 4],
            "workers": 3,
            "maxQueueBytes": 2**21,
            "cudnnConvAlgoSearch": "HEURISTIC",
            "padding": {
                "inputs": {"input_ids": {"axis": 1}, "attention_mask": {"axis": 1, "value": 0}},
                "outputs": {"last_hidden_state": 1},
                "buckets": [128, 32, 64],
            },
        },
        "accelerator": {"count": 1},
    },
    "pvc": {"model": {"uri": "pvc://claim/dir/my%20model.onnx"}, "quantization": "dynamic-int8"},
    "ingress": {
        "model": {"uri": "s3://models/iris/3/model.onnx"},
        "ingress": {"host": "iris.example.com", "path": "/ml/"},
    },
    "gateway": {
        "model": {"uri": "s3://models/iris/3/model.onnx"},
        "gateway": {"parentRefs": [{"name": "gw"}], "hostnames": ["h.example"], "path": "/a/b"},
    },
}


def _containers(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    parsed = api.ModelDeploymentSpec.model_validate(spec)
    pod = builders.deployment(OWNER, parsed, "runtime:1")["spec"]["template"]["spec"]
    return pod["initContainers"], pod["containers"][0]


def _settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """What the runtime makes of a container: its command and args, with its env set."""
    assert container["command"] == [flags.COMMAND]
    for variable in container.get("env", []):
        monkeypatch.setenv(variable["name"], variable["value"])
    return runtime_cli.parse(container["args"])


@pytest.mark.parametrize("case", SPECS)
def test_the_runtime_parses_the_pods_serving_container_into_the_specs_settings(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = api.ModelDeploymentSpec.model_validate(SPECS[case])
    _, serving = _containers(SPECS[case])
    settings = _settings_of(serving, monkeypatch)
    assert isinstance(settings, runtime_settings.ServeSettings)
    assert settings.model_name == (spec.model.name or OWNER.name)
    assert settings.model_version == (spec.model.version or values.DEFAULT_MODEL_VERSION)
    assert settings.quantization.value == spec.quantization
    assert settings.max_batch_size == spec.runtime.max_batch_size
    assert settings.max_batch_delay_ms == spec.runtime.max_batch_delay_ms
    assert settings.max_queue_size == spec.runtime.max_queue_size
    assert settings.threads == spec.runtime.threads
    assert settings.device.value == ("cuda" if spec.accelerator else "cpu")
    assert settings.max_queue_bytes == spec.runtime.max_queue_bytes
    assert settings.workers == spec.runtime.workers
    assert settings.batch_sizes == (
        tuple(sorted(set(spec.runtime.batch_sizes))) if spec.runtime.batch_sizes else None
    )
    if spec.accelerator:
        assert settings.cudnn_conv_algo_search.value == spec.runtime.cudnn_conv_algo_search
    padding = spec.runtime.padding
    if padding is None:
        assert settings.padding is None
    else:
        assert settings.padding is not None
        assert {n: (p.axis, p.value) for n, p in settings.padding.inputs.items()} == {
            n: (p.axis, p.value) for n, p in padding.inputs.items()
        }
        assert settings.padding.outputs == (padding.outputs or {})
        assert settings.padding.buckets == tuple(sorted(padding.buckets or ()))
    grace = builders.deployment(OWNER, spec, "runtime:1")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert settings.drain_seconds == values.DRAIN_SECONDS < grace
    ports = {p["name"]: p["containerPort"] for p in serving["ports"]}
    assert (settings.http_port, settings.grpc_port) == (ports["http"], ports["grpc"])
    probes = [serving[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
    assert probes == [paths.READY_PATH, paths.LIVE_PATH]
    mounts = {m["mountPath"] for m in serving["volumeMounts"]}
    assert str(PurePosixPath(settings.model_path).parent.parent) in mounts
    if spec.calibration_uri:
        assert settings.calibration_path is not None
    warmup = spec.runtime.warmup
    assert settings.warmup_shapes == (
        {name: tuple(shape) for name, shape in warmup.shapes.items()}
        if warmup and warmup.shapes is not None
        else None
    )
    assert (settings.warmup_path is not None) == bool(warmup and warmup.uri)
    # status.url's path is one the runtime serves.
    assert urlsplit(builders.url(OWNER, spec)).path == (
        f"{settings.path_prefix}/v2/models/{settings.model_name}"
    )


@pytest.mark.parametrize("case", SPECS)
def test_the_server_loads_the_file_that_the_init_container_writes(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    init, serving = _containers(SPECS[case])
    fetched = [_settings_of(container, monkeypatch) for container in init]
    assert all(isinstance(f, runtime_settings.FetchSettings) for f in fetched)
    served = _settings_of(serving, monkeypatch)
    written = [f.dest / PurePosixPath(paths.artifact_name(f.uri)) for f in fetched]
    assert served.model_path == written[0]
    expected = [served.model_path, served.calibration_path, served.warmup_path]
    assert written == [path for path in expected if path is not None]
    # A pvc:// claim is mounted where the fetcher reads it.
    for container, settings in zip(init, fetched, strict=True):
        if settings.uri.startswith("pvc://"):
            claim = settings.uri.removeprefix("pvc://").split("/")[0]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert str(settings.pvc_root / claim) in mounts


class _AnyPathServes(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(_AnyPathServes, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("models/my%20model.onnx", ""),
        ("models/model.onnx", "?X-Amz-Signature=abc%2Fdef&X-Amz-Expires=60"),
        ("models/3/model", ""),
        ("models/r%C3%A9sum%C3%A9%2Bv2.onnx", "?v=1"),
    ],
)
def test_awkward_uris_land_where_the_server_looks(
    path: str, query: str, file_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = file_server
    on_disk = root / unquote(path)
    on_disk.parent.mkdir(parents=True, exist_ok=True)
    on_disk.write_bytes(b"onnx bytes")
    uri = f"{base}/{path}{query}"
    spec = api.ModelDeploymentSpec.model_validate({"model": {"uri": uri}})
    model_dir = tmp_path / "model"
    settings = builders.serve_settings(OWNER, spec, str(tmp_path))
    written = fetch.fetch(uri, model_dir, None, pvc_root=tmp_path)
    assert written == Path(settings[flags.MODEL_PATH])
    assert written.read_bytes() == b"onnx bytes"
    assert "?" not in written.name and "%" not in written.name


@pytest.mark.parametrize("uri", ["s3://bucket", "https://host/dir/", "file:///"])
def test_a_uri_that_names_no_file_is_refused_by_the_spec(uri: str) -> None:
    with pytest.raises(ValueError, match="does not name a file"):
        api.ModelDeploymentSpec.model_validate({"model": {"uri": uri}})


def test_allowed_values_and_defaults_are_the_contracts() -> None:
    assert typing.get_args(api.Quantization) == values.QUANTIZATIONS
    assert tuple(q.value for q in runtime_settings.Quantization) == values.QUANTIZATIONS
    assert tuple(d.value for d in runtime_settings.Device) == values.DEVICES
    assert api.URI_SCHEMES == values.URI_SCHEMES
    runtime_defaults = runtime_settings.ServeSettings.model_fields
    crd_defaults = api.RuntimeSettings.model_fields
    for field in ("max_batch_size", "max_batch_delay_ms", "max_queue_size", "threads"):
        assert runtime_defaults[field].default == crd_defaults[field].default, field
    assert runtime_settings.FetchSettings.model_fields["pvc_root"].default == Path(paths.PVC_ROOT)


def test_the_runtime_exports_the_metric_names_the_operator_reads() -> None:
    exported = runtime_metrics.ModelMetrics("m")
    exported.observe_request(runtime_metrics.Protocol.HTTP, runtime_metrics.Outcome.SUCCESS, 0.1)
    text = exported.exposition().decode()
    for name in (metrics.REQUESTS, metrics.REQUEST_DURATION, metrics.BATCH_SIZE, metrics.INFLIGHT):
        assert f"\n{name}" in text or text.startswith(name), name
    assert f'{metrics.MODEL_LABEL}="m"' in text
    assert builders.CONCURRENCY_METRIC == metrics.INFLIGHT


def test_every_flag_the_builders_emit_is_a_runtime_flag() -> None:
    parser_help = runtime_cli._parser().format_help()
    assert flags.FETCH in parser_help and flags.SERVE in parser_help
    for case in SPECS:
        _, serving = _containers(SPECS[case])
        emitted = [arg for arg in serving["args"] if arg.startswith("--")]
        spec = api.ModelDeploymentSpec.model_validate(SPECS[case])
        settings = builders.serve_settings(OWNER, spec)
        assert emitted == [flags.flag(f) for f in settings]
        assert set(emitted) <= set(map(flags.flag, flags.SERVE_FLAGS))
