"""kopf wiring: settings, watches and in-memory indexes, and thin handlers.

Every handler only gathers what the watches saw and hands it to the reconciler. Children and
pods are watched (by the managed-by label) and indexed by their ModelDeployment, so reconciling
reads nothing from the API server, and a child edited or deleted by hand triggers a reconcile
of its owner at once.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import kopf

from modeldeploy_operator import builders, kube, reconcile
from modeldeploy_operator import spec as api

DEFAULT_RUNTIME_IMAGE = "ghcr.io/modeldeploy/modeldeploy-runtime:0.1.0"
POD = builders.Kind("v1", "Pod", "pods")
_MANAGED = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}
_MD = (api.GROUP, api.VERSION, api.PLURAL)
_CHILD_KINDS_BY_PLURAL = {kind.plural: kind for kind in builders.CHILD_KINDS}


def _index_id(kind: builders.Kind) -> str:
    return f"{kind.plural}_index"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # kopf's bookkeeping goes into status, not annotations, so GitOps tools see no drift.
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration"
    )
    settings.persistence.progress_storage = kopf.StatusProgressStorage(
        field="status.kopf.progress", touch_field="status.kopf.dummy"
    )
    # kopf would post an Event per handler run, a write on every resync; the reconciler posts
    # Events on transitions only.
    settings.posting.enabled = False
    # Peering would write a KopfPeering object every minute; run a single replica instead.
    settings.peering.standalone = True
    runtime_image = memo.get("runtime_image") or os.environ.get(
        "MODELDEPLOY_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE
    )
    memo["reconciler"] = reconcile.Reconciler(kube.Kube.from_environment(), runtime_image)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod the service account; elsewhere $KUBECONFIG as it is now (kopf's default handler
    # goes through the client library, which reads it only once, when first imported).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _plain(body: kopf.Body) -> dict[str, Any]:
    # kopf's bodies are live views; the indexes keep a snapshot.
    return copy.deepcopy(dict(body))


@kopf.index(*_MD)
def model_deployments_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", name): _plain(body)}


def _index_by_owner(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    instance = labels.get(builders.LABEL_INSTANCE)
    return {(namespace or "", instance): _plain(body)} if instance else {}


def _index_pod(
    namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    instance = labels.get(builders.LABEL_INSTANCE)
    if not instance:
        return {}
    # Only what the status computation reads: pods are the most numerous objects watched.
    summary = {
        "metadata": {
            "name": meta.get("name"),
            "annotations": dict(meta.get("annotations", {})),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "status": copy.deepcopy(dict(status)),
    }
    return {(namespace or "", instance): summary}


for _kind in builders.CHILD_KINDS:
    kopf.index(_kind.api_version, _kind.plural, labels=_MANAGED, id=_index_id(_kind))(
        _index_by_owner
    )
kopf.index(POD.api_version, POD.plural, labels=_MANAGED, id=_index_id(POD))(_index_pod)


def _observed(indexes: Mapping[str, Any], key: tuple[str, str], uid: str) -> reconcile.Observed:
    children = {}
    for kind in builders.CHILD_KINDS:
        candidates = list(indexes[_index_id(kind)].get(key, []))
        # After a delete and re-create under the same name, the old children linger until the
        # garbage collector gets to them: prefer the ones owned by this object.
        owned = [c for c in candidates if _owned_by(c, uid)]
        if owned or candidates:
            children[kind] = (owned or candidates)[0]
    return reconcile.Observed(children=children, pods=list(indexes[_index_id(POD)].get(key, [])))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


@kopf.on.resume(*_MD, id="resume")
@kopf.on.create(*_MD, id="create")
@kopf.on.update(*_MD, id="update")
def model_deployment_changed(
    body: kopf.Body, namespace: str | None, name: str, uid: str, memo: Any, **kwargs: Any
) -> None:
    reconciler: reconcile.Reconciler = memo["reconciler"]
    reconciler.reconcile(body, _observed(kwargs, (namespace or "", name), uid))


@kopf.on.event(*_MD, id="forget")
def model_deployment_event(
    event: kopf.RawEvent, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    if event["type"] == "DELETED":
        reconciler: reconcile.Reconciler = memo["reconciler"]
        reconciler.forget(namespace or "", name)


def _child_changed(
    event: kopf.RawEvent,
    resource: kopf.Resource,
    namespace: str | None,
    labels: kopf.Labels,
    memo: Any,
    **kwargs: Any,
) -> None:
    # The initial listing (type None) needs nothing: the resume handlers cover every object.
    change = event["type"]
    instance = labels.get(builders.LABEL_INSTANCE)
    if change is None or not instance or not namespace:
        return
    reconciler: reconcile.Reconciler = memo["reconciler"]
    key = (namespace, instance)
    mds = list(kwargs["model_deployments_index"].get(key, []))
    md: dict[str, Any] | None = mds[0] if mds else None
    gone = _CHILD_KINDS_BY_PLURAL.get(resource.plural) if change == "DELETED" else None
    if gone is not None and md is not None:
        # The owner may be gone already with its deletion not yet seen by our watch: do not
        # recreate a child the garbage collector just removed.
        md = reconciler.reread(namespace, instance)
    if md is not None:
        reconciler.reconcile(md, _observed(kwargs, key, md["metadata"]["uid"]), gone=gone)


for _kind in (*builders.CHILD_KINDS, POD):
    kopf.on.event(_kind.api_version, _kind.plural, labels=_MANAGED, id=f"{_kind.plural}_changed")(
        _child_changed
    )
