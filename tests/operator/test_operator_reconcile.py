"""The reconciler writes only what differs: an unchanged object costs no write."""

from __future__ import annotations

import copy
from typing import Any

from modeldeploy_operator import builders, kube, reconcile
from modeldeploy_operator import spec as api


class FakeKube:
    """Records writes; applies echo the object back as a server would (plus a status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_with: Exception | None = None
        self.event_failures: list[Exception] = []
        self.unserved: set[builders.Kind] = set()

    def apply(self, kind: builders.Kind, obj: dict[str, Any]) -> dict[str, Any]:
        if self.fail_with:
            raise self.fail_with
        if kind in self.unserved:
            raise kube.ApiError(status=404, reason="Not Found", body="404 page not found")
        self.calls.append(("apply", kind.kind))
        echoed = copy.deepcopy(obj)
        echoed["metadata"] |= {
            "uid": f"uid-{kind.plural}",
            "generation": 1,
            "resourceVersion": "b7",
        }
        echoed["status"] = {"observedGeneration": 1}
        return echoed

    def delete(self, kind: builders.Kind, namespace: str, name: str, uid: str) -> None:
        self.calls.append(("delete", kind.kind))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", status))
        return {}

    def emit_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        if self.event_failures:
            raise self.event_failures.pop(0)
        self.calls.append(("event", reason))


def _md(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris", "namespace": "ml", "uid": "md-uid", "generation": 1},
        "spec": {"model": {"uri": "s3://m/iris.onnx"}} | spec,
    }


def _reconciler() -> tuple[reconcile.Reconciler, FakeKube]:
    fake = FakeKube()
    return reconcile.Reconciler(fake, "runtime:1"), fake  # type: ignore[arg-type]


def _children(md: dict[str, Any]) -> dict[builders.Kind, dict[str, Any]]:
    owner = builders.Owner("iris", "ml", "md-uid")
    spec = api.ModelDeploymentSpec.model_validate(md["spec"])
    children = builders.children(owner, spec, "runtime:1")
    for kind, child in children.items():
        child["metadata"]["uid"] = f"uid-{kind.plural}"
    return children


def test_first_reconcile_creates_children_and_writes_status_once() -> None:
    reconciler, fake = _reconciler()
    reconciler.reconcile(_md(), reconcile.Observed())
    kinds = [what for call, what in fake.calls if call == "apply"]
    assert sorted(kinds) == ["Deployment", "Service"]
    assert [call for call, _ in fake.calls].count("status") == 1


def test_unchanged_object_makes_no_writes_even_after_a_restart() -> None:
    md = _md()
    reconciler, fake = _reconciler()
    reconciler.reconcile(md, reconcile.Observed())
    written = next(body for call, body in fake.calls if call == "status")
    observed = reconcile.Observed(children=_children(md))

    fake.calls.clear()
    reconciler.reconcile(md, observed)  # the watch has not delivered our status yet
    assert fake.calls == []

    restarted, fake = _reconciler()
    stored = md | {"status": written | {"kopf": {"progress": {}}}}
    restarted.reconcile(stored, observed)
    assert fake.calls == []


def test_unwanted_owned_child_is_deleted() -> None:
    md = _md()
    reconciler, fake = _reconciler()
    with_ingress = _md(ingress={"host": "iris.example.com"})
    observed = _children(with_ingress)
    reconciler.reconcile(md, reconcile.Observed(children=observed))
    assert ("delete", "Ingress") in fake.calls
    assert not any(call == "apply" for call, _ in fake.calls)


def test_hand_edited_child_is_applied_again() -> None:
    md = _md()
    observed = _children(md)
    observed[builders.DEPLOYMENT]["spec"]["template"]["spec"]["containers"][0]["image"] = "x"
    reconciler, fake = _reconciler()
    reconciler.reconcile(md, reconcile.Observed(children=observed))
    assert [what for call, what in fake.calls if call == "apply"] == ["Deployment"]


def test_rejected_child_stalls_with_the_servers_message() -> None:
    reconciler, fake = _reconciler()
    fake.fail_with = kube.ApiError(status=422, reason="Invalid")
    fake.fail_with.body = '{"message": "spec.template.spec.tolerations[0].operator: Unsupported"}'
    reconciler.reconcile(_md(), reconcile.Observed())
    status = next(body for call, body in fake.calls if call == "status")
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ApplyFailed")
    assert "tolerations[0].operator" in stalled["message"]


def test_deleted_object_is_left_to_the_garbage_collector() -> None:
    reconciler, fake = _reconciler()
    md = _md()
    md["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    reconciler.reconcile(md, reconcile.Observed())
    assert fake.calls == []


def test_without_the_gateway_api_the_status_says_so_and_the_rest_converges() -> None:
    reconciler, fake = _reconciler()
    fake.unserved = {builders.HTTP_ROUTE}
    md = _md(gateway={"parentRefs": [{"name": "public"}], "hostnames": ["iris.example.com"]})
    assert reconciler.reconcile(md, reconcile.Observed())  # to be tried again later
    assert sorted(what for call, what in fake.calls if call == "apply") == ["Deployment", "Service"]
    status = next(body for call, body in fake.calls if call == "status")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GatewayAPIMissing")
    assert "install its CRDs" in ready["message"]


def _ready_md() -> tuple[dict[str, Any], reconcile.Observed]:
    """An object whose Deployment is available: reconciling it flips Ready to True."""
    md = _md()
    children = _children(md)
    deployment = children[builders.DEPLOYMENT]
    # What the watch shows after our apply (FakeKube answers applies with version "b7").
    deployment["metadata"] |= {"generation": 1, "resourceVersion": "b7"}
    deployment["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    return md, reconcile.Observed(children=children)


def test_an_event_whose_post_failed_is_posted_by_the_retry() -> None:
    md, observed = _ready_md()
    reconciler, fake = _reconciler()
    reconciler.reconcile(md, reconcile.Observed())  # Ready False: the first status
    first = next(body for call, body in fake.calls if call == "status")
    md["status"] = first
    fake.calls.clear()
    fake.event_failures = [ConnectionError("connection reset")]
    try:
        reconciler.reconcile(md, observed)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failed POST was swallowed: nothing would retry it")
    written = next(body for call, body in fake.calls if call == "status")
    assert next(c for c in written["conditions"] if c["type"] == "Ready")["status"] == "True"
    # The retry sees the status it wrote already (the watch delivered it): nothing to patch,
    # but the Event of the transition is still owed.
    md["status"] = written
    fake.calls.clear()
    reconciler.reconcile(md, observed)
    assert fake.calls == [
        ("event", next(c for c in written["conditions"] if c["type"] == "Ready")["reason"])
    ]
    fake.calls.clear()
    reconciler.reconcile(md, observed)
    assert fake.calls == []  # posted once, not again


def test_an_event_the_server_refuses_does_not_block_the_object() -> None:
    md, observed = _ready_md()
    reconciler, fake = _reconciler()
    reconciler.reconcile(md, reconcile.Observed())
    md["status"] = next(body for call, body in fake.calls if call == "status")
    fake.event_failures = [kube.ApiError(status=403, reason="Forbidden")]
    reconciler.reconcile(md, observed)  # no exception: retrying a 403 cannot help
    fake.calls.clear()
    reconciler.reconcile(md, observed)
    assert not any(call == "event" for call, _ in fake.calls)


def _with_version(child: dict[str, Any], version: str) -> dict[str, Any]:
    child = copy.deepcopy(child)
    child["metadata"]["resourceVersion"] = version
    return child


def test_resource_versions_are_opaque_strings_compared_for_equality_only() -> None:
    """A lagging watch (still showing what was there before our apply) is not mistaken for a
    newer change; once it moves, it is current again. The versions are not numbers."""
    md = _md()
    desired = _children(md)
    stale = _with_version(desired[builders.DEPLOYMENT], "zz-old")
    stale["spec"]["replicas"] = 7  # someone scaled it by hand: we apply it back
    reconciler, fake = _reconciler()
    observed = reconcile.Observed(children={**desired, builders.DEPLOYMENT: stale})
    reconciler.reconcile(md, observed)
    assert [w for c, w in fake.calls if c == "apply"] == ["Deployment"]

    fake.calls.clear()
    reconciler.reconcile(md, observed)  # the watch still shows the old version: no re-apply
    assert not any(call == "apply" for call, _ in fake.calls)

    # The watch moved on: someone changed it again after our apply ("a0" sorts before "b7" and
    # "zz-old": an ordering would take it for older). It is repaired.
    edited = _with_version(stale, "a0")
    reconciler.reconcile(md, reconcile.Observed(children={**desired, builders.DEPLOYMENT: edited}))
    assert [w for c, w in fake.calls if c == "apply"] == ["Deployment"]
