"""Level-based reconciliation of one ModelDeployment: desired vs observed, then act on the gap.

Whatever triggered it (the ModelDeployment changed, a child or pod changed, the operator
restarted), a reconcile compares the desired children with the observed ones and the computed
status with the stored one, and writes only where they differ: an unchanged ModelDeployment
costs no write at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from modeldeploy_operator import builders, diff, kube, opmetrics, packed, status
from modeldeploy_operator import spec as api

Key = tuple[str, str]
# Status keys other writers own: kopf's bookkeeping, and the metrics summary.
_FOREIGN_STATUS = frozenset({"kopf", "metrics"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observed:
    """The children and pods of one ModelDeployment, as the watches last saw them."""

    children: Mapping[builders.Kind, api.Object] = field(default_factory=dict)
    pods: list[api.Object] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        client: kube.Kube,
        runtime_image: str,
        operator_pods: builders.OperatorPods | None = None,
    ) -> None:
        self._kube = client
        self._runtime_image = runtime_image
        self._operator_pods = operator_pods
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = {}
        # What this process last wrote, per object. The watches deliver it back a little later;
        # until then what they show is stale, and acting on it alone would write twice.
        self._written: dict[Key, packed.Packed] = {}
        # Our last apply of a child (packed: after a burst of creations there is one per child
        # until the watches catch up), its resourceVersion, and the one the watch showed when we
        # made it.
        self._applied: dict[
            tuple[Key, builders.Kind], tuple[packed.Packed, str | None, str | None]
        ] = {}
        # Events whose transition is written in the status but which are not posted yet: a
        # failed POST is retried with the reconcile, which would otherwise find nothing to do.
        self._unposted: dict[Key, status.Event] = {}

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._guard:
            self._locks.pop(key, None)
            self._written.pop(key, None)
            self._unposted.pop(key, None)
            for kind in builders.CHILD_KINDS:
                self._applied.pop((key, kind), None)

    def reread(self, namespace: str, name: str) -> api.Object | None:
        return self._kube.get_model_deployment(namespace, name)

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(
        self, md: Mapping[str, Any], observed: Observed, gone: Collection[builders.Kind] = ()
    ) -> set[builders.Kind]:
        """Converges one object; `gone` names the child kinds just seen deleted. Returns the
        kinds it needs that the cluster does not serve (yet): it should be reconciled again
        later, as installing their CRDs raises no event of ours."""
        metadata = md["metadata"]
        if metadata.get("deletionTimestamp"):
            return set()  # the garbage collector removes the children
        key = (metadata["namespace"], metadata["name"])
        with self._lock(key), opmetrics.RECONCILE_DURATION.time():
            for kind in gone:
                self._applied.pop((key, kind), None)
            latest = {
                kind: child
                for kind in builders.CHILD_KINDS
                if (child := self._latest(key, kind, observed.children.get(kind))) is not None
            }
            unserved: set[builders.Kind] = set()
            try:
                valid = self._reconcile(
                    md, Observed(children=latest, pods=observed.pods), key, unserved
                )
            except Exception:
                opmetrics.RECONCILES.labels("error").inc()
                raise
            opmetrics.RECONCILES.labels("success" if valid else "invalid").inc()
            return unserved

    def _latest(self, key: Key, kind: builders.Kind, seen: api.Object | None) -> api.Object | None:
        """The newer of what the watch shows and what our last apply returned.

        resourceVersions are opaque: they are compared for equality only. Once the watch shows
        our apply's version, or any version other than the one it showed when we applied (its
        events come in order, so it has moved past that point), the watch is current again.
        """
        entry = self._applied.get((key, kind))
        if entry is None:
            return seen
        applied, applied_version, seen_before = entry
        version = _revision(seen)
        if seen is not None and (version == applied_version or version != seen_before):
            del self._applied[(key, kind)]
            return seen
        return packed.unpack(applied)

    def _reconcile(
        self, md: Mapping[str, Any], observed: Observed, key: Key, unserved: set[builders.Kind]
    ) -> bool:
        """Converges and writes the status; False when the spec or an apply was refused."""
        owner = builders.Owner(name=key[1], namespace=key[0], uid=md["metadata"]["uid"])
        spec: api.ModelDeploymentSpec | None = None
        spec_error = apply_error = None
        try:
            spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except pydantic.ValidationError as error:
            spec_error = api.problems(error)

        children = dict(observed.children)
        if spec is not None:
            try:
                children = self._converge_children(
                    key, owner, spec, children, _converged(md), unserved
                )
            except Exception as error:
                if not kube.is_permanent(error):
                    raise
                apply_error = kube.error_message(error)

        stored: api.Object = md.get("status") or {}
        written = self._written.get(key)
        last = None if written is None else packed.unpack(written)
        previous = last or stored
        observation = status.Observation(
            owner=owner,
            generation=md["metadata"].get("generation", 0),
            spec=spec,
            spec_error=spec_error,
            apply_error=apply_error,
            deployment=children.get(builders.DEPLOYMENT),
            http_route=children.get(builders.HTTP_ROUTE),
            gateway_api_missing=builders.HTTP_ROUTE in unserved,
            pods=observed.pods,
            previous=previous.get("conditions", []),
        )
        computed = status.compute(observation, api.now())
        new = computed.model_dump(by_alias=True, exclude_none=True, mode="json")
        ours = {k: v for k, v in stored.items() if k not in _FOREIGN_STATUS}
        valid = spec_error is None and apply_error is None
        if new not in (ours, last):
            event = status.transition(previous.get("conditions", []), computed)
            if event:
                self._unposted[key] = event  # a newer transition replaces an unposted one
            # A merge patch keeps the foreign keys; keys we no longer set are removed with null.
            patch: api.Object = {k: None for k in ours if k not in new} | new
            self._kube.patch_status(owner.namespace, owner.name, patch)
            self._written[key] = packed.pack(new)
        unposted = self._unposted.get(key)
        if unposted is not None:
            try:
                self._kube.emit_event(dict(md), unposted.type, unposted.reason, unposted.message)
            except Exception as error:
                if not kube.is_permanent(error):
                    raise  # the reconcile is retried, and posts it then
                logger.warning("Event %s of %s/%s refused: %s", unposted.reason, *key, error)
            self._unposted.pop(key, None)
        return valid

    def _converge_children(
        self,
        key: Key,
        owner: builders.Owner,
        spec: api.ModelDeploymentSpec,
        observed: dict[builders.Kind, api.Object],
        converged: bool,
        unserved: set[builders.Kind],
    ) -> dict[builders.Kind, api.Object]:
        """Applies what differs, deletes what is unwanted; returns the children as they are now.

        `converged`: this generation was reconciled before, so a missing or differing child
        was deleted or edited by someone else and is being repaired. A wanted kind whose API the
        cluster does not serve is added to `unserved`; the other children converge all the same.
        """
        desired = builders.children(owner, spec, self._runtime_image, self._operator_pods)
        current = dict(observed)
        for kind in builders.CHILD_KINDS:
            want, have = desired.get(kind), observed.get(kind)
            action = diff.decide(want, have)
            if action in (diff.Action.CREATE, diff.Action.UPDATE):
                assert want is not None
                logger.info("%s %s %s/%s", action.value, kind.kind, owner.namespace, owner.name)
                try:
                    applied = self._kube.apply(kind, want)
                except kube.ApiError as error:
                    if not kube.is_unserved(error):
                        raise
                    unserved.add(kind)
                    continue
                # Kept until the watch shows it: without managedFields, as the indexes keep it.
                applied.get("metadata", {}).pop("managedFields", None)
                self._applied[(key, kind)] = (
                    packed.pack(applied),
                    _revision(applied),
                    _revision(have),
                )
                current[kind] = applied
                opmetrics.CHILDREN.labels(kind.kind, _child_action(want, have, converged)).inc()
            elif action is diff.Action.DELETE:
                assert have is not None
                if not builders.owned_by(have, owner.uid):
                    continue
                logger.info("delete %s %s/%s", kind.kind, owner.namespace, owner.name)
                self._kube.delete(kind, owner.namespace, owner.name, have["metadata"]["uid"])
                self._applied.pop((key, kind), None)
                current.pop(kind)
                opmetrics.CHILDREN.labels(kind.kind, "deleted").inc()
        return current


def _converged(md: Mapping[str, Any]) -> bool:
    observed_generation = (md.get("status") or {}).get("observedGeneration")
    return bool(observed_generation == md["metadata"].get("generation"))


def _child_action(want: api.Object, have: api.Object | None, converged: bool) -> str:
    """created / updated for spec changes, repaired when someone else changed the child."""
    if have is None:
        return "repaired" if converged else "created"
    digest = builders.ANNOTATION_APPLIED_DIGEST
    same_spec = (
        have["metadata"].get("annotations", {}).get(digest)
        == want["metadata"]["annotations"][digest]
    )
    return "repaired" if same_spec else "updated"


def _revision(obj: api.Object | None) -> str | None:
    """The object's resourceVersion: opaque, compared for equality only (API conventions)."""
    return None if obj is None else obj["metadata"].get("resourceVersion")
