"""kopf wiring: settings, watches and in-memory indexes, and thin handlers.

Every handler only gathers what the watches saw and hands it to the reconciler. Children and
pods are watched (by the managed-by label) and indexed by their ModelDeployment, so reconciling
reads nothing from the API server, and a child edited or deleted by hand triggers a reconcile
of its owner at once.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf

from modeldeploy_operator import builders, collect, kube, reconcile
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
    # Peering would write a KopfPeering object every minute; `modeldeploy run` elects one active
    # replica with a Lease instead (leader.py), before kopf starts.
    settings.peering.standalone = True
    # Least privilege: the operator may not watch CRDs or namespaces. Without this kopf tries,
    # logs the 403s and falls back to what it does now: namespaces given by exact name only.
    settings.scanning.disabled = True
    client = kube.Kube.from_environment()
    memo["reconciler"] = reconcile.Reconciler(
        client, _setting(memo, "runtime_image", DEFAULT_RUNTIME_IMAGE)
    )
    prometheus_url = _setting(memo, "prometheus_url", "")
    source: collect.Source = (
        collect.PrometheusSource(prometheus_url, int(_setting(memo, "metrics_window", "60")))
        if prometheus_url
        else collect.DirectSource()
    )

    async def write(namespace: str, name: str, metrics: dict[str, Any]) -> None:
        await asyncio.to_thread(client.patch_status, namespace, name, {"metrics": metrics})

    interval = float(_setting(memo, "metrics_interval", "30"))
    memo["metrics_writer"] = collect.MetricsWriter(source, write, interval)
    # Resource handlers get a shallow copy of this memo: share state through containers in it.
    memo["metrics_targets"] = {}
    memo["indexes"] = {}


def _setting(memo: Any, name: str, default: str) -> str:
    """`modeldeploy run` puts its flags into the memo; else MODELDEPLOY_<NAME>, else default."""
    value = memo.get(name) or os.environ.get(f"MODELDEPLOY_{name.upper()}") or default
    return str(value)


@kopf.on.startup()
async def start_metrics(memo: Any, **_: Any) -> None:
    memo["metrics_task"] = asyncio.create_task(_summarise_metrics(memo))


@kopf.on.cleanup()
async def stop_metrics(memo: Any, **_: Any) -> None:
    memo["metrics_task"].cancel()
    await memo["metrics_writer"].source.close()


async def _summarise_metrics(memo: Any) -> None:
    """Every interval, status.metrics of every ModelDeployment, from one loop.

    One loop rather than a kopf timer per object: kopf puts a finalizer on objects with
    timers, which is a write per object and something for GitOps tools to trip over.
    """
    writer: collect.MetricsWriter = memo["metrics_writer"]
    limit = asyncio.Semaphore(32)

    async def one(key: tuple[str, str], model: str, written: dict[str, Any] | None) -> None:
        pods = list(memo["indexes"].get(POD, {}).get(key, []))
        urls = collect.ready_pod_urls(pods, builders.HTTP_PORT)
        async with limit:
            await writer.collect(collect.Target(key[0], key[1], model, urls), written)

    while True:
        started = time.monotonic()
        targets = list(memo["metrics_targets"].items())
        await asyncio.gather(*(one(key, *value) for key, value in targets))
        await asyncio.sleep(max(0.0, writer.interval - (time.monotonic() - started)))


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
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: Any,
    **kwargs: Any,
) -> None:
    key = (namespace or "", name)
    if event["type"] == "DELETED":
        reconciler: reconcile.Reconciler = memo["reconciler"]
        reconciler.forget(*key)
        memo["metrics_targets"].pop(key, None)
        memo["metrics_writer"].forget(*key)
        return
    # What the metrics loop needs; the pods index is a live view, kept once.
    memo["indexes"].setdefault(POD, kwargs[_index_id(POD)])
    model = spec.get("model", {}).get("name") or name
    memo["metrics_targets"][key] = (model, copy.deepcopy(status.get("metrics")))


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
