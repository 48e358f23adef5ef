"""The pure builders: one desired object per child."""

from __future__ import annotations

import json
from typing import Any

from modeldeploy_operator import builders
from modeldeploy_operator import spec as api

OWNER = builders.Owner(name="iris", namespace="ml", uid="uid-1")
IMAGE = "registry.example/runtime:1"


def _spec(**fields: Any) -> api.ModelDeploymentSpec:
    base = {"model": {"uri": "s3://models/iris/3/model.onnx", "version": "3"}}
    return api.ModelDeploymentSpec.model_validate(base | fields)


def _pod(spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    pod: dict[str, Any] = builders.deployment(OWNER, spec, IMAGE)["spec"]["template"]
    return pod


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


class TestDeployment:
    def test_fetches_then_serves_the_model_with_the_spec_settings(self) -> None:
        spec = _spec(
            model={"uri": "https://h/m/iris.onnx", "sha256": "A" * 64, "version": "3"},
            quantization="dynamic-int8",
            runtime={"maxBatchSize": 8, "maxBatchDelayMs": 2, "threads": 4},
        )
        pod = _pod(spec)["spec"]
        (fetch,) = pod["initContainers"]
        assert fetch["command"] == ["modeldeploy-runtime"]
        assert fetch["args"][0] == "fetch"
        assert _arg(fetch["args"], "--uri") == "https://h/m/iris.onnx"
        assert _arg(fetch["args"], "--sha256") == "a" * 64
        (serve,) = pod["containers"]
        args = serve["args"]
        assert args[0] == "serve"
        assert _arg(args, "--model-path") == f"{_arg(fetch['args'], '--dest')}/iris.onnx"
        assert _arg(args, "--model-name") == "iris"
        assert _arg(args, "--model-version") == "3"
        assert _arg(args, "--quantization") == "dynamic-int8"
        assert _arg(args, "--max-batch-size") == "8"
        assert _arg(args, "--max-batch-delay-ms") == "2"
        assert _arg(args, "--threads") == "4"
        assert _arg(args, "--device") == "cpu"
        assert _arg(args, "--workers") == "0"
        # The grace period covers the runtime's drain delay and the time to finish.
        assert _arg(args, "--drain-seconds") == "10"
        assert pod["terminationGracePeriodSeconds"] >= 10 + 15
        assert _arg(args, "--max-queue-bytes") == str(256 * 1024 * 1024)
        # CPU pods run every batch size as it comes; only a GPU model searches cuDNN.
        assert "--batch-sizes" not in args
        assert "--cudnn-conv-algo-search" not in args
        assert {p["name"]: p["containerPort"] for p in serve["ports"]} == {
            "http": 8080,
            "grpc": 8081,
        }

    def test_gpu_models_get_their_precision_batch_sizes_and_search_mode(self) -> None:
        spec = _spec(
            quantization="fp16",
            accelerator={"count": 1},
            runtime={
                "maxBatchSize": 64,
                "batchSizes": [64, 1, 8],
                "workers": 6,
                "cudnnConvAlgoSearch": "HEURISTIC",
            },
        )
        args = _pod(spec)["spec"]["containers"][0]["args"]
        assert _arg(args, "--quantization") == "fp16"
        assert _arg(args, "--device") == "cuda"
        assert _arg(args, "--batch-sizes") == "1,8,64"
        assert _arg(args, "--workers") == "6"
        assert _arg(args, "--cudnn-conv-algo-search") == "HEURISTIC"

    def test_max_size_bounds_the_downloads_and_sizes_the_volumes(self) -> None:
        spec = _spec(
            model={"uri": "s3://m/model.onnx", "maxSizeBytes": 10**9},
            quantization="static-int8",
            calibrationUri="gs://b/calib.npz",
            calibrationSha256="B" * 64,
        )
        pod = _pod(spec)["spec"]
        fetch_model, fetch_calibration = pod["initContainers"]
        assert _arg(fetch_model["args"], "--max-bytes") == str(10**9)
        assert _arg(fetch_calibration["args"], "--sha256") == "b" * 64
        volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
        # Two artifacts of up to 1 GB each, and room for a converted copy on /tmp.
        assert int(volumes["models"]["sizeLimit"]) >= 2 * 10**9
        assert int(volumes["tmp"]["sizeLimit"]) >= 10**9
        assert (
            "sizeLimit"
            not in {v["name"]: v["emptyDir"] for v in _pod(_spec())["spec"]["volumes"]}["models"]
        )

    def test_static_int8_fetches_the_calibration_data(self) -> None:
        spec = _spec(quantization="static-int8", calibrationUri="gs://b/calib.npz")
        pod = _pod(spec)["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-model", "fetch-calibration"]
        calibration = _arg(pod["containers"][0]["args"], "--calibration-path")
        assert calibration.endswith("/calib.npz")

    def test_warmup_samples_are_fetched_and_verified_like_calibration_data(self) -> None:
        spec = _spec(runtime={"warmup": {"uri": "s3://b/warm.npz", "sha256": "C" * 64}})
        pod = _pod(spec)["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-model", "fetch-warmup"]
        fetch_warmup = pod["initContainers"][1]
        assert _arg(fetch_warmup["args"], "--sha256") == "c" * 64
        assert _arg(fetch_warmup["args"], "--dest") == "/models/warmup"
        assert _arg(pod["containers"][0]["args"], "--warmup-path") == "/models/warmup/warm.npz"

    def test_the_accuracy_gate_fetches_its_samples_and_gives_the_runtime_its_floors(self) -> None:
        gate = {"uri": "https://h/v.npz", "sha256": "D" * 64, "minAccuracy": 0.9}
        spec = _spec(quantization="dynamic-int8", validation=gate)
        pod = _pod(spec)["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-model", "fetch-validation"]
        fetch = pod["initContainers"][1]
        assert _arg(fetch["args"], "--sha256") == "d" * 64
        assert _arg(fetch["args"], "--dest") == "/models/validation"
        args = pod["containers"][0]["args"]
        assert _arg(args, "--validation-path") == "/models/validation/v.npz"
        assert _arg(args, "--min-accuracy") == "0.9"
        assert _arg(args, "--validation-tolerance") == "0.01"
        assert "--min-agreement" not in args

    def test_warmup_shapes_and_max_batch_size_0_reach_the_runtime(self) -> None:
        spec = _spec(runtime={"maxBatchSize": 0, "warmup": {"shapes": {"x": [1, 3], "s": []}}})
        args = _pod(spec)["spec"]["containers"][0]["args"]
        assert json.loads(_arg(args, "--warmup-shapes")) == {"x": [1, 3], "s": []}
        assert _arg(args, "--max-batch-size") == "0"
        assert "--warmup-path" not in " ".join(args)

    def test_probes_use_the_health_endpoints(self) -> None:
        serve = _pod(_spec())["spec"]["containers"][0]
        assert serve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert serve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert serve["startupProbe"]["httpGet"]["path"] == "/v2/health/live"

    def test_runs_locked_down(self) -> None:
        pod = _pod(_spec())["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["initContainers"] + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}

    def test_labels_owner_and_model_version(self) -> None:
        deployment = builders.deployment(OWNER, _spec(), IMAGE)
        metadata = deployment["metadata"]
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "modeldeploy"
        assert metadata["labels"]["app.kubernetes.io/instance"] == "iris"
        (ref,) = metadata["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("ModelDeployment", "uid-1", True)
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert template_labels[builders.LABEL_MODEL_VERSION] == "3"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template_labels.items()
        assert builders.LABEL_MODEL_VERSION not in selector  # selectors are immutable

    def test_model_digest_changes_with_the_model_only(self) -> None:
        digest = builders.model_digest
        assert digest(_spec()) == digest(_spec(replicas=3))
        assert digest(_spec()) != digest(_spec(quantization="dynamic-int8"))
        other = _spec(model={"uri": "s3://models/iris/4/model.onnx", "version": "4"})
        assert digest(_spec()) != digest(other)

    def test_gpu_limits_node_selector_and_toleration(self) -> None:
        spec = _spec(
            accelerator={"count": 2, "product": "NVIDIA-A100-SXM4-80GB"},
            nodeSelector={"zone": "a"},
            tolerations=[{"key": "spot", "operator": "Exists"}],
            resources={"limits": {"memory": "2Gi"}},
        )
        pod = _pod(spec)["spec"]
        assert pod["containers"][0]["resources"]["limits"] == {
            "memory": "2Gi",
            "nvidia.com/gpu": "2",
        }
        assert pod["nodeSelector"] == {
            "zone": "a",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        }
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert _arg(pod["containers"][0]["args"], "--device") == "cuda"

    def test_replicas_default_to_one_and_are_never_set_under_autoscaling(self) -> None:
        assert builders.deployment(OWNER, _spec(), IMAGE)["spec"]["replicas"] == 1
        assert builders.deployment(OWNER, _spec(replicas=0), IMAGE)["spec"]["replicas"] == 0
        scaled = builders.deployment(OWNER, _spec(autoscaling={}), IMAGE)
        assert "replicas" not in scaled["spec"]

    def test_pvc_uri_mounts_the_claim_read_only(self) -> None:
        pod = _pod(_spec(model={"uri": "pvc://models-claim/iris/model.onnx"}))["spec"]
        claims = [
            v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        ]
        assert claims == [{"claimName": "models-claim", "readOnly": True}]
        mounts = pod["initContainers"][0]["volumeMounts"]
        assert {"name": "pvc-0", "mountPath": "/mnt/pvc/models-claim", "readOnly": True} in mounts

    def test_image_defaults_to_the_operators(self) -> None:
        assert _pod(_spec())["spec"]["containers"][0]["image"] == IMAGE
        own = _spec(runtime={"image": "mine:2"})
        assert _pod(own)["spec"]["containers"][0]["image"] == "mine:2"


class TestOtherChildren:
    def test_only_wanted_children_are_built(self) -> None:
        assert set(builders.children(OWNER, _spec(), IMAGE)) == {
            builders.DEPLOYMENT,
            builders.SERVICE,
        }
        everything = _spec(
            ingress={"host": "iris.example.com"},
            autoscaling={},
            disruptionBudget={"minAvailable": 1},
            networkPolicy={},
        )
        assert set(builders.children(OWNER, everything, IMAGE)) == set(builders.CHILD_KINDS) - {
            builders.HTTP_ROUTE
        }
        routed = _spec(gateway={"parentRefs": [{"name": "public"}], "hostnames": ["iris.example"]})
        assert set(builders.children(OWNER, routed, IMAGE)) == {
            builders.DEPLOYMENT,
            builders.SERVICE,
            builders.HTTP_ROUTE,
        }

    def test_service_ports(self) -> None:
        service = builders.service(OWNER, _spec(service={"type": "NodePort"}))
        assert service["spec"]["type"] == "NodePort"
        assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
            ("http", 8080),
            ("grpc", 8081),
        ]

    def test_ingress_with_tls(self) -> None:
        settings = api.IngressSettings(
            host="iris.example.com", class_name="nginx", tls_secret_name="t"
        )
        ingress = builders.ingress(OWNER, settings)["spec"]
        assert ingress["ingressClassName"] == "nginx"
        assert ingress["tls"] == [{"hosts": ["iris.example.com"], "secretName": "t"}]
        backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "iris", "port": {"name": "http"}}

    def test_autoscaler_metrics(self) -> None:
        cpu = builders.autoscaler(OWNER, api.Autoscaling(min_replicas=2, max_replicas=5))["spec"]
        assert cpu["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "iris",
        }
        assert (cpu["minReplicas"], cpu["maxReplicas"]) == (2, 5)
        assert cpu["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
        concurrency = builders.autoscaler(OWNER, api.Autoscaling(metric="concurrency", target=8))
        pods = concurrency["spec"]["metrics"][0]["pods"]
        assert pods["metric"]["name"] == "modeldeploy_inflight_requests"
        assert pods["target"] == {"type": "AverageValue", "averageValue": "8"}

    def test_disruption_budget_and_network_policy(self) -> None:
        pdb = builders.disruption_budget(OWNER, api.DisruptionBudget(max_unavailable="50%"))
        assert pdb["spec"]["maxUnavailable"] == "50%"
        peer = {"namespaceSelector": {"matchLabels": {"team": "ml"}}}
        policy = builders.network_policy(OWNER, api.NetworkPolicySettings(allow_from=[peer]))
        assert policy["spec"]["ingress"] == [
            {"ports": [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}],
             "from": [peer]}
        ]  # fmt: skip

    def test_a_network_policy_admits_the_operators_pods_to_the_metrics_port(self) -> None:
        """The operator in a pod scrapes /metrics on the HTTP port for status.metrics: a policy
        that admits only the user's clients would starve it."""
        peer = {"namespaceSelector": {"matchLabels": {"team": "ml"}}}
        operator = builders.OperatorPods(
            "modeldeploy-system",
            (("app.kubernetes.io/component", "operator"), ("app.kubernetes.io/instance", "md")),
        )
        settings = api.NetworkPolicySettings(allow_from=[peer])
        clients, scrape = builders.network_policy(OWNER, settings, operator)["spec"]["ingress"]
        assert clients["from"] == [peer]
        assert scrape == {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "modeldeploy-system"}
                    },
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/component": "operator",
                            "app.kubernetes.io/instance": "md",
                        }
                    },
                }
            ],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }
        # The same through children(), as the reconciler asks for it.
        spec = _spec(networkPolicy={"allowFrom": [peer]})
        child = builders.children(OWNER, spec, IMAGE, operator)[builders.NETWORK_POLICY]
        assert child["spec"]["ingress"][1] == scrape

    def test_a_network_policy_open_to_all_or_off_cluster_needs_no_scrape_rule(self) -> None:
        operator = builders.OperatorPods("modeldeploy-system", ())
        open_to_all = builders.network_policy(OWNER, api.NetworkPolicySettings(), operator)
        assert [rule.get("from") for rule in open_to_all["spec"]["ingress"]] == [None]
        peer = {"podSelector": {}}
        off_cluster = builders.network_policy(OWNER, api.NetworkPolicySettings(allow_from=[peer]))
        assert [rule["from"] for rule in off_cluster["spec"]["ingress"]] == [[peer]]

    def test_http_route_to_the_services_http_port(self) -> None:
        settings = api.GatewaySettings.model_validate(
            {
                "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "http"}],
                "hostnames": ["iris.example.com", "models.example.com"],
                "path": "/iris",
            }
        )
        route = builders.http_route(OWNER, settings)
        assert (route["apiVersion"], route["kind"]) == ("gateway.networking.k8s.io/v1", "HTTPRoute")
        assert route["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert route["spec"] == {
            "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "http"}],
            "hostnames": ["iris.example.com", "models.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/iris"}}],
                    "backendRefs": [{"name": "iris", "port": 8080}],
                }
            ],
        }

    def test_url_prefers_the_ingress(self) -> None:
        assert builders.url(OWNER, _spec()) == "http://iris.ml.svc:8080/v2/models/iris"
        https = _spec(ingress={"host": "iris.example.com", "tlsSecretName": "t"})
        assert builders.url(OWNER, https) == "https://iris.example.com/v2/models/iris"

    def test_a_routed_path_is_in_the_url_and_the_runtime_serves_under_it(self) -> None:
        # The Ingress and the HTTPRoute pass the path on unchanged: the URL only answers because
        # the pods serve the model under that prefix too.
        ingress = _spec(ingress={"host": "iris.example.com", "path": "/ml/"})
        gateway = _spec(
            gateway={
                "parentRefs": [{"name": "public", "port": 443}],
                "hostnames": ["models.example.com"],
                "path": "/teams/ml",
            }
        )
        for spec, url, prefix in (
            (ingress, "http://iris.example.com/ml/v2/models/iris", "/ml"),
            (gateway, "https://models.example.com/teams/ml/v2/models/iris", "/teams/ml"),
        ):
            assert builders.url(OWNER, spec) == url
            args = _pod(spec)["spec"]["containers"][0]["args"]
            assert _arg(args, "--path-prefix") == prefix
        root = _spec(ingress={"host": "iris.example.com", "path": "/"})
        assert "--path-prefix" not in _pod(root)["spec"]["containers"][0]["args"]

    def test_applied_digest_tracks_the_desired_object(self) -> None:
        def digest(spec: api.ModelDeploymentSpec) -> str:
            annotations = builders.service(OWNER, spec)["metadata"]["annotations"]
            return str(annotations[builders.ANNOTATION_APPLIED_DIGEST])

        assert digest(_spec()) == digest(_spec())
        assert digest(_spec()) != digest(_spec(service={"type": "NodePort"}))
