"""kopf wiring: settings, watches and in-memory indexes, and thin handlers.

Every handler only gathers what the watches saw and hands it to the reconciler. Children and
pods are watched (by the managed-by label) and indexed by their ModelDeployment, so reconciling
reads nothing from the API server, and a child edited or deleted by hand triggers a reconcile
of its owner at once.

Memory: the indexes hold what the reconciler and the status computation read, not the watched
bodies: no managedFields, no kopf bookkeeping, only a pod's status. At a thousand
ModelDeployments the indexes are most of what the operator holds.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from modeldeploy_contract import paths
from modeldeploy_operator import builders, collect, kube, reconcile
from modeldeploy_operator import settings as config
from modeldeploy_operator import spec as api

POD = builders.Kind("v1", "Pod", "pods")
_MANAGED = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}
_MD = (api.GROUP, api.VERSION, api.PLURAL)
_CHILD_KINDS_BY_PLURAL = {kind.plural: kind for kind in builders.CHILD_KINDS}
Key = tuple[str, str]


@dataclass(frozen=True)
class Dependencies:
    """What the handlers act with, made once at startup."""

    reconciler: reconcile.Reconciler
    metrics: collect.MetricsLoop
    tasks: list[asyncio.Task[None]]


def memo(settings: config.OperatorSettings) -> kopf.Memo:
    """The memo `modeldeploy run` starts kopf with: its validated settings. Started any other way
    (`kopf run -m modeldeploy_operator.handlers`), the operator reads them from the environment."""
    return kopf.Memo(settings=settings)


def _dependencies(memo: kopf.Memo) -> Dependencies:
    dependencies: Dependencies = memo.dependencies
    return dependencies


def _index_id(kind: builders.Kind) -> str:
    return f"{kind.plural}_index"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    # Peering would write a KopfPeering object every minute; `modeldeploy run` elects one active
    # replica with a Lease instead (leader.py), before kopf starts.
    settings.peering.standalone = True
    # Least privilege: the operator may not watch CRDs or namespaces. Without this kopf tries,
    # logs the 403s and falls back to what it does now: namespaces given by exact name only.
    settings.scanning.disabled = True


@kopf.on.startup()
async def start(memo: kopf.Memo, **indexes: Any) -> None:
    pods: kopf.Index[Key, api.Object] = indexes[_index_id(POD)]
    operator: config.OperatorSettings = memo.get("settings") or config.OperatorSettings()
    client = kube.Kube.from_environment()
    source: collect.Source = (
        collect.PrometheusSource(operator.prometheus_url, operator.metrics_window)
        if operator.prometheus_url
        else collect.DirectSource()
    )

    async def write(namespace: str, name: str, metrics: dict[str, Any]) -> None:
        await asyncio.to_thread(client.patch_status, namespace, name, {"metrics": metrics})

    writer = collect.MetricsWriter(source, write, operator.metrics_interval)
    # The pods index is a live view: the loop reads the pods as the watch last saw them.
    metrics = collect.MetricsLoop(writer, pods, paths.HTTP_PORT)
    # Resource handlers get a shallow copy of this memo: the dependencies are shared.
    memo.dependencies = Dependencies(
        reconciler=reconcile.Reconciler(client, operator.runtime_image),
        metrics=metrics,
        tasks=[asyncio.create_task(metrics.run())],
    )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    dependencies = _dependencies(memo)
    for task in dependencies.tasks:
        task.cancel()
    await dependencies.metrics.writer.source.close()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod the service account; elsewhere $KUBECONFIG as it is now.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _slim_model_deployment(body: kopf.Body) -> api.Object:
    """What reconciling reads of a ModelDeployment: its identity, spec and our status keys."""
    meta = body.metadata
    metadata = {
        key: meta[key]
        for key in ("name", "namespace", "uid", "generation", "deletionTimestamp")
        if key in meta
    }
    status = {k: copy.deepcopy(v) for k, v in body.status.items() if k != "kopf"}
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": metadata,
        "spec": copy.deepcopy(dict(body.spec)),
        "status": status,
    }


def _slim_child(body: kopf.Body, keep_status: bool) -> api.Object:
    """A child as the diff reads it: without managedFields (often the largest part), and without
    status unless the status computation reads it (the Deployment's)."""
    child = {k: copy.deepcopy(v) for k, v in body.items() if k != "status" or keep_status}
    child["metadata"].pop("managedFields", None)
    return child


@kopf.index(*_MD)
def model_deployments_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, api.Object]:
    return {(namespace or "", name): _slim_model_deployment(body)}


def _index_child(
    resource: kopf.Resource, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, api.Object]:
    instance = labels.get(builders.LABEL_INSTANCE)
    if not instance:
        return {}
    keep_status = resource.plural == builders.DEPLOYMENT.plural
    return {(namespace or "", instance): _slim_child(body, keep_status)}


def _index_pod(
    namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[Key, api.Object]:
    instance = labels.get(builders.LABEL_INSTANCE)
    if not instance:
        return {}
    # Only what the status computation reads: pods are the most numerous objects watched.
    summary = {
        "metadata": {
            "name": meta.get("name"),
            "annotations": {
                k: v
                for k, v in meta.get("annotations", {}).items()
                if k == builders.ANNOTATION_MODEL_DIGEST
            },
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "status": copy.deepcopy(dict(status)),
    }
    return {(namespace or "", instance): summary}


for _kind in builders.CHILD_KINDS:
    kopf.index(_kind.api_version, _kind.plural, labels=_MANAGED, id=_index_id(_kind))(_index_child)
kopf.index(POD.api_version, POD.plural, labels=_MANAGED, id=_index_id(POD))(_index_pod)


def _observed(indexes: Mapping[str, Any], key: Key, uid: str) -> reconcile.Observed:
    children = {}
    for kind in builders.CHILD_KINDS:
        candidates = list(indexes[_index_id(kind)].get(key, []))
        # After a delete and re-create under the same name, the old children linger until the
        # garbage collector gets to them: prefer the ones owned by this object.
        owned = [c for c in candidates if builders.owned_by(c, uid)]
        if owned or candidates:
            children[kind] = (owned or candidates)[0]
    return reconcile.Observed(children=children, pods=list(indexes[_index_id(POD)].get(key, [])))


@kopf.on.resume(*_MD, id="resume")
@kopf.on.create(*_MD, id="create")
@kopf.on.update(*_MD, id="update")
def model_deployment_changed(
    body: kopf.Body, namespace: str | None, name: str, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    key = (namespace or "", name)
    _dependencies(memo).reconciler.reconcile(body, _observed(kwargs, key, uid))


@kopf.on.event(*_MD, id="forget")
def model_deployment_event(
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    key = (namespace or "", name)
    dependencies = _dependencies(memo)
    if event["type"] == "DELETED":
        dependencies.reconciler.forget(*key)
        dependencies.metrics.forget(key)
        return
    model = spec.get("model", {}).get("name") or name
    dependencies.metrics.track(key, model, copy.deepcopy(status.get("metrics")))


def _child_changed(
    event: kopf.RawEvent,
    resource: kopf.Resource,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    # The initial listing (type None) needs nothing: the resume handlers cover every object.
    change = event["type"]
    instance = labels.get(builders.LABEL_INSTANCE)
    if change is None or not instance or not namespace:
        return
    reconciler = _dependencies(memo).reconciler
    key = (namespace, instance)
    mds = list(kwargs["model_deployments_index"].get(key, []))
    md: api.Object | None = mds[0] if mds else None
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
