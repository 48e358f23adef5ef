"""What kopf and the indexes keep of watched objects: packed, unpacked equal to what was indexed,
and no diff base (each of them a copy per object or per event)."""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import kopf
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldeploy_operator import builders, handlers, packed
from modeldeploy_operator import spec as api

OWNER = builders.Owner(name="iris", namespace="ml", uid="uid-1")
SPEC = api.ModelDeploymentSpec.model_validate({"model": {"uri": "s3://m/iris.onnx"}})

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.dictionaries(st.text(), _json))
def test_an_object_unpacks_equal_to_what_was_packed(obj: dict[str, Any]) -> None:
    assert packed.unpack(packed.pack(obj)) == obj
    assert packed.pack(copy.deepcopy(obj)) == packed.pack(obj)


def _deep_size(obj: Any) -> int:
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_deep_size(k) + _deep_size(v) for k, v in obj.items())
    elif isinstance(obj, list):
        size += sum(_deep_size(v) for v in obj)
    return size


def _served(kind: builders.Kind, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as the API server returns it: identity, managedFields and a status added."""
    served = copy.deepcopy(obj)
    served["metadata"] |= {
        "uid": f"uid-{kind.plural}",
        "resourceVersion": "4242",
        "generation": 1,
        "creationTimestamp": "2030-01-01T00:00:00Z",
        "managedFields": [
            {"manager": "modeldeploy", "operation": "Apply", "fieldsV1": {"f:spec": {}}}
        ],
    }
    served["status"] = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1}
    return served


def test_a_child_is_indexed_without_managed_fields_and_status_only_where_read() -> None:
    children = builders.children(OWNER, SPEC, "runtime:1")
    deployment = _served(builders.DEPLOYMENT, children[builders.DEPLOYMENT])
    body = copy.deepcopy(deployment)

    indexed = packed.unpack(handlers._slim_child(kopf.Body(body), keep_status=True))
    expected = copy.deepcopy(deployment)
    del expected["metadata"]["managedFields"]
    assert indexed == expected
    assert body == deployment  # the watched body is left as it was

    service = _served(builders.SERVICE, children[builders.SERVICE])
    indexed = packed.unpack(handlers._slim_child(kopf.Body(service), keep_status=False))
    assert "status" not in indexed and "managedFields" not in indexed["metadata"]
    assert indexed["spec"] == service["spec"]
    # What the memory saving rests on: a packed Deployment is a small fraction of its dicts.
    assert len(handlers._slim_child(kopf.Body(body), True)) * 8 < _deep_size(expected)


def test_a_model_deployment_is_indexed_with_its_spec_and_our_status_keys() -> None:
    body = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "iris",
            "namespace": "ml",
            "uid": "uid-1",
            "generation": 3,
            "labels": {"team": "a"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": json.loads(SPEC.model_dump_json(by_alias=True, exclude_none=True)),
        "status": {"observedGeneration": 2, "kopf": {"progress": {}}, "metrics": {"rps": 1.0}},
    }
    indexed = packed.unpack(handlers._slim_model_deployment(kopf.Body(body)))
    assert indexed == {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": "iris", "namespace": "ml", "uid": "uid-1", "generation": 3},
        "spec": body["spec"],
        "status": {"observedGeneration": 2, "metrics": {"rps": 1.0}},
    }


def test_kopf_keeps_no_diff_base_as_no_handler_would_read_it() -> None:
    """NoDiffBase spares kopf a deep copy per watch event; it holds only while no handler
    needs change detection (on.create, on.update, on.field, timers, daemons)."""
    registry = kopf.get_default_registry()
    assert list(registry._changing.get_all_handlers()) == []
    assert list(registry._spawning.get_all_handlers()) == []
    assert list(registry._watching.get_all_handlers())  # the event handlers that queue keys
    storage = handlers.NoDiffBase()
    body = kopf.Body({"metadata": {"name": "iris"}, "spec": {"replicas": 2}})
    assert storage.fetch(body=body) is None
    assert storage.build(body=body) == {}
