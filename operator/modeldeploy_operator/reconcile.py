"""Level-based reconciliation of one ModelDeployment: desired vs observed, then act on the gap.

Whatever triggered it (the ModelDeployment changed, a child or pod changed, the operator
restarted), a reconcile compares the desired children with the observed ones and the computed
status with the stored one, and writes only where they differ: an unchanged ModelDeployment
costs no write at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from modeldeploy_operator import builders, diff, kube, status
from modeldeploy_operator import spec as api

Object = dict[str, Any]
Key = tuple[str, str]
# Status keys other writers own: kopf's bookkeeping, and the metrics summary.
_FOREIGN_STATUS = frozenset({"kopf", "metrics"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observed:
    """The children and pods of one ModelDeployment, as the watches last saw them."""

    children: Mapping[builders.Kind, Object] = field(default_factory=dict)
    pods: list[Object] = field(default_factory=list)


class Reconciler:
    def __init__(self, client: kube.Kube, runtime_image: str) -> None:
        self._kube = client
        self._runtime_image = runtime_image
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = {}
        # The last status written per object. The watch delivers it back a little later; until
        # then the stored status is stale, and comparing with it alone would write it twice.
        self._written: dict[Key, Object] = {}

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._written.pop((namespace, name), None)

    def reread(self, namespace: str, name: str) -> Object | None:
        return self._kube.get_model_deployment(namespace, name)

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, md: Mapping[str, Any], observed: Observed) -> None:
        metadata = md["metadata"]
        if metadata.get("deletionTimestamp"):
            return  # the garbage collector removes the children
        key = (metadata["namespace"], metadata["name"])
        with self._lock(key):
            self._reconcile(md, observed, key)

    def _reconcile(self, md: Mapping[str, Any], observed: Observed, key: Key) -> None:
        owner = builders.Owner(name=key[1], namespace=key[0], uid=md["metadata"]["uid"])
        spec: api.ModelDeploymentSpec | None = None
        spec_error = apply_error = None
        try:
            spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except pydantic.ValidationError as error:
            spec_error = "; ".join(
                f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
            )

        children = dict(observed.children)
        if spec is not None:
            try:
                children = self._converge_children(owner, spec, children)
            except Exception as error:
                if not kube.is_permanent(error):
                    raise
                apply_error = kube.error_message(error)

        stored: Object = md.get("status") or {}
        previous = self._written.get(key) or stored
        observation = status.Observation(
            owner=owner,
            generation=md["metadata"].get("generation", 0),
            spec=spec,
            spec_error=spec_error,
            apply_error=apply_error,
            deployment=children.get(builders.DEPLOYMENT),
            pods=observed.pods,
            previous=previous.get("conditions", []),
        )
        computed = status.compute(observation, kube.now())
        new = computed.model_dump(by_alias=True, exclude_none=True, mode="json")
        ours = {k: v for k, v in stored.items() if k not in _FOREIGN_STATUS}
        if new in (ours, self._written.get(key)):
            return
        # A merge patch keeps the foreign keys; keys we no longer set are removed with null.
        patch: Object = {k: None for k in ours if k not in new} | new
        self._kube.patch_status(owner.namespace, owner.name, patch)
        self._written[key] = new
        event = status.transition(previous.get("conditions", []), computed)
        if event:
            self._kube.emit_event(dict(md), event.type, event.reason, event.message)

    def _converge_children(
        self,
        owner: builders.Owner,
        spec: api.ModelDeploymentSpec,
        observed: dict[builders.Kind, Object],
    ) -> dict[builders.Kind, Object]:
        """Applies what differs, deletes what is unwanted; returns the children as they are now."""
        desired = builders.children(owner, spec, self._runtime_image)
        current = dict(observed)
        for kind in builders.CHILD_KINDS:
            want, have = desired.get(kind), observed.get(kind)
            action = diff.decide(want, have)
            if action in (diff.Action.CREATE, diff.Action.UPDATE):
                assert want is not None
                logger.info("%s %s %s/%s", action.value, kind.kind, owner.namespace, owner.name)
                current[kind] = self._kube.apply(kind, want)
            elif action is diff.Action.DELETE:
                assert have is not None
                if not _owned_by(have, owner.uid):
                    continue
                logger.info("delete %s %s/%s", kind.kind, owner.namespace, owner.name)
                self._kube.delete(kind, owner.namespace, owner.name, have["metadata"]["uid"])
                current.pop(kind)
        return current


def _owned_by(obj: Object, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))
