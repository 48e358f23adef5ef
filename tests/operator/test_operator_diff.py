"""Deciding what to do about a child: observed objects carry server-filled fields."""

from __future__ import annotations

from decimal import Decimal

import pytest

from modeldeploy_operator import diff

DESIRED = {
    "spec": {
        "replicas": 1,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "runtime",
                        "args": ["serve", "--threads", "0"],
                        "resources": {"limits": {"cpu": "1000m", "memory": "1024Mi"}},
                    }
                ]
            }
        },
    }
}


def _observed(**changes: object) -> dict[str, object]:
    container = {
        "name": "runtime",
        "args": ["serve", "--threads", "0"],
        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
        "imagePullPolicy": "IfNotPresent",
        "terminationMessagePath": "/dev/termination-log",
    } | changes
    return {
        "metadata": {"resourceVersion": "7"},
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "sidecar"}, container]}},
        },
        "status": {"readyReplicas": 1},
    }


def test_server_defaults_and_canonical_quantities_are_no_change() -> None:
    assert diff.decide(DESIRED, _observed()) is diff.Action.UNCHANGED


def test_a_changed_value_is_an_update() -> None:
    assert diff.decide(DESIRED, _observed(args=["serve", "--threads", "4"])) is diff.Action.UPDATE
    changed = {"limits": {"cpu": "2", "memory": "1Gi"}}
    assert diff.decide(DESIRED, _observed(resources=changed)) is diff.Action.UPDATE


def test_a_removed_field_is_an_update() -> None:
    assert diff.decide(DESIRED, _observed(resources={})) is diff.Action.UPDATE


def test_scalar_lists_keep_their_order() -> None:
    assert not diff.covers(["a", "b"], ["b", "a"])
    assert not diff.covers(["a", "b", "c"], ["a", "b"])


def test_create_delete_and_nothing() -> None:
    assert diff.decide(DESIRED, None) is diff.Action.CREATE
    assert diff.decide(None, _observed()) is diff.Action.DELETE
    assert diff.decide(None, None) is diff.Action.UNCHANGED


def test_booleans_are_not_numbers() -> None:
    assert not diff.covers(1, True)
    assert diff.covers(False, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("500m", Decimal("0.5")), ("1Gi", 2**30), ("1e3", 1000), ("2k", 2000)],
)
def test_quantities(text: str, value: Decimal | int) -> None:
    assert diff.parse_quantity(text) == value


def test_non_quantities() -> None:
    assert diff.parse_quantity("http") is None
    assert diff.parse_quantity("50%") is None
