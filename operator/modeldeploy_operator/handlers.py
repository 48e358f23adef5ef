"""kopf wiring: settings, watches and in-memory indexes, and handlers that only queue work.

Every watch event only puts the key of the ModelDeployment it concerns into a work queue and
returns; a few workers take keys and hand the ModelDeployment and what the indexes hold of its
children and pods to the reconciler (level-based: whatever changed, the whole object is
converged). Children and pods are watched (by the managed-by label) and indexed by their
ModelDeployment, so reconciling reads nothing from the API server, and a child edited or deleted
by hand triggers a reconcile of its owner at once.

Memory: at a thousand ModelDeployments the operator's memory is what is in flight, not what is
stored. kopf decodes every watch event into a body and keeps it while the object's handlers run;
handlers that waited for a reconcile kept a thousand bodies (and, with kopf's change-detection
handlers, a thousand status patches on as many TLS connections) alive at once. So nothing waits
in a handler, kopf writes nothing (no change-detection handlers, no bookkeeping), and the indexes
hold only what the reconciler and the status computation read, packed (packed.py): at a few
thousand ModelDeployments the stored objects as dicts were most of the memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from modeldeploy_contract import paths
from modeldeploy_operator import builders, collect, kube, packed, reconcile, workqueue
from modeldeploy_operator import settings as config
from modeldeploy_operator import spec as api

POD = builders.Kind("v1", "Pod", "pods")
_MANAGED = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}
_MD = (api.GROUP, api.VERSION, api.PLURAL)
_CHILD_KINDS_BY_PLURAL = {kind.plural: kind for kind in builders.CHILD_KINDS}
Key = tuple[str, str]
# How often discovery is asked again while a ModelDeployment needs a kind not served.
UNSERVED_RECHECK_S = 10.0
Queue = workqueue.WorkQueue[Key, builders.Kind]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dependencies:
    """What the handlers act with, made once at startup."""

    reconciler: reconcile.Reconciler
    queue: Queue
    metrics: collect.MetricsLoop
    executor: concurrent.futures.ThreadPoolExecutor
    tasks: list[asyncio.Task[None]]


def memo(settings: config.OperatorSettings) -> kopf.Memo:
    """The memo `modeldeploy run` starts kopf with: its validated settings, and the insights
    (what the cluster serves) it gives kopf.run. Started any other way (`kopf run -m
    modeldeploy_operator.handlers`), the operator reads its settings from the environment, and
    a CRD installed after the start is seen after a restart only."""
    from kopf._cogs.structs.references import Insights

    return kopf.Memo(settings=settings, insights=Insights())


async def _rediscover(memo: kopf.Memo, group: str, settings: kopf.OperatorSettings) -> bool:
    """Asks the API server's discovery again what an API group serves; when it serves something
    now, has kopf watch it and returns True.

    Without it a CRD installed after the start (the Gateway API's) is unknown to kopf until a
    restart: kopf scans once at the start, as it may not watch the CRDs (least privilege), and
    discovery needs no permission. kopf does the same when it watches the CRDs; its functions
    for it are not public, hence the private imports, here only."""
    insights = memo.get("insights")
    if insights is None:
        return False
    from kopf._cogs.clients import scanning
    from kopf._core.reactor import observation

    resources = await scanning.scan_resources(groups={group}, settings=settings, logger=logger)
    if not resources:
        return False
    async with insights.revised:
        observation.revise_resources(
            resources=resources,
            insights=insights,
            registry=kopf.get_default_registry(),
            group=group,
        )
        await insights.backbone.fill(resources=resources)
        insights.revised.notify_all()
    logger.info("API group %s is served now: watching its kinds", group)
    return True


def _operator_pods(operator: config.OperatorSettings) -> builders.OperatorPods | None:
    """Where this operator's pods run; None outside a cluster."""
    if operator.pod_namespace is None:
        return None
    return builders.OperatorPods(operator.pod_namespace, tuple(sorted(operator.pod_labels.items())))


def _settings(memo: kopf.Memo) -> config.OperatorSettings:
    settings = memo.get("settings")
    if settings is None:
        settings = memo["settings"] = config.OperatorSettings()
    assert isinstance(settings, config.OperatorSettings)
    return settings


def _dependencies(memo: kopf.Memo) -> Dependencies:
    dependencies: Dependencies = memo.dependencies
    return dependencies


def _index_id(kind: builders.Kind) -> str:
    return f"{kind.plural}_index"


class NoDiffBase(kopf.DiffBaseStorage):
    """No base for kopf's change detection: the operator has no change-detection handlers
    (on.create, on.update, on.field and the like), which alone read it.

    For every watch event kopf builds the object's "essence" (a deep copy of its body, then the
    copy's progress fields cleared) and diffs it with the stored one: at a thousand
    ModelDeployments that was 40% of kopf's time per event, for nothing. A change-detection
    handler added later needs the default storage back."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf would post an Event per handler run; the reconciler posts Events on transitions only.
    settings.posting.enabled = False
    # Peering would write a KopfPeering object every minute; `modeldeploy run` elects one active
    # replica with a Lease instead (leader.py), before kopf starts.
    settings.peering.standalone = True
    # Least privilege: the operator may not watch CRDs or namespaces. Without this kopf tries,
    # logs the 403s and falls back to what it does now: namespaces given by exact name only.
    # A CRD installed after the start is found by asking discovery again (see _rediscover).
    settings.scanning.disabled = True
    settings.persistence.diffbase_storage = NoDiffBase()
    # An object's kopf worker (and the last body it saw) lingers this long after its last event:
    # in a burst (thousands of ModelDeployments applied at once, their children and pods rolling
    # out) the bodies alive are the events of this many seconds. A worker started again costs
    # less than keeping a body of tens of KiB.
    settings.queueing.idle_timeout = 0.2
    # A watch that cannot reconnect tries these intervals over and over: after an outage the
    # operator hears of what changed within 5 s (kopf's default goes up to 21 s).
    settings.networking.error_backoffs = (1, 1, 2, 3, 5)


@kopf.on.startup()
async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, **indexes: Any) -> None:
    operator = _settings(memo)
    client = kube.Kube.shared(operator.kubeconfig, operator.context)
    source: collect.Source = (
        collect.PrometheusSource(operator.prometheus_url, operator.metrics_window)
        if operator.prometheus_url
        else collect.DirectSource(timeout=min(5.0, operator.metrics_interval / 2))
    )

    async def write(namespace: str, name: str, metrics: dict[str, Any]) -> None:
        await asyncio.to_thread(client.patch_status, namespace, name, {"metrics": metrics})

    writer = collect.MetricsWriter(source, write, operator.metrics_interval)
    # The indexes are live views: the workers and the metrics loop read them as the watches
    # last saw them (kopf runs no handler before every index is filled).
    pod_index = indexes[_index_id(POD)]
    metrics = collect.MetricsLoop(
        writer, lambda key: [packed.unpack(p) for p in pod_index.get(key, [])], paths.HTTP_PORT
    )
    reconciler = reconcile.Reconciler(client, operator.runtime_image, _operator_pods(operator))
    queue: Queue = workqueue.WorkQueue(permanent=kube.is_permanent)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=operator.reconcile_workers, thread_name_prefix="reconcile"
    )

    # API group -> the ModelDeployments that wait for it to be served
    waiting: dict[str, set[Key]] = {}
    tasks: list[asyncio.Task[None]] = []

    async def wait_for_group(group: str) -> None:
        """Asks discovery every few seconds until the group is served; then kopf watches its
        kinds, and the objects that wait for it are reconciled again."""
        while True:
            await asyncio.sleep(UNSERVED_RECHECK_S)
            try:
                if not await _rediscover(memo, group, settings):
                    continue
            except Exception as error:  # asked again at the next interval
                logger.warning("discovery of API group %s: %s", group, error)
                continue
            for key in waiting.pop(group, set()):
                await queue.add(key)
            return

    async def handle(key: Key, gone: set[builders.Kind]) -> None:
        unserved = await _reconcile(reconciler, executor, indexes, key, gone)
        if memo.get("insights") is None:
            return  # started by `kopf run`: a CRD installed later needs a restart
        for group in {kind.group for kind in unserved}:
            if group not in waiting:
                tasks.append(asyncio.create_task(wait_for_group(group)))
            waiting.setdefault(group, set()).add(key)

    def failed(key: Key, error: BaseException, retry_in: float | None) -> None:
        if retry_in is None:
            logger.error(
                "reconciling %s/%s failed, and retrying cannot help; left until the object or "
                "a child changes, or the next resync: %s", *key, error,
            )  # fmt: skip
        else:
            logger.error("reconciling %s/%s failed (retry in %.1fs): %s", *key, retry_in, error)

    workers = [queue.work(handle, failed) for _ in range(operator.reconcile_workers)]
    # Every ModelDeployment the watch knows, from time to time: a reconcile reads only the
    # indexes and writes only where something differs, so at steady state this costs no request.
    resync = queue.resync(operator.resync_interval, lambda: indexes["model_deployments_index"])
    # Resource handlers get a shallow copy of this memo: the dependencies are shared.
    memo.dependencies = Dependencies(
        reconciler=reconciler,
        queue=queue,
        metrics=metrics,
        executor=executor,
        tasks=tasks,
    )
    tasks.extend(map(asyncio.create_task, [metrics.run(), resync, *workers]))


async def _reconcile(
    reconciler: reconcile.Reconciler,
    executor: concurrent.futures.Executor,
    indexes: Mapping[str, Any],
    key: Key,
    gone: set[builders.Kind],
) -> set[builders.Kind]:
    """One reconcile, from what the indexes hold now (read here, on the event loop); returns
    the kinds it needs that are not served (see Reconciler.reconcile)."""
    mds = list(indexes["model_deployments_index"].get(key, []))
    if not mds:
        return set()  # deleted meanwhile: the garbage collector removes the children
    md = packed.unpack(mds[0])
    observed = _observed(indexes, key, md["metadata"]["uid"])

    def run() -> set[builders.Kind]:
        current: api.Object | None = md
        if gone:
            # The owner may be gone already with its deletion not yet seen by our watch: do not
            # recreate a child the garbage collector just removed.
            current = reconciler.reread(*key)
        return set() if current is None else reconciler.reconcile(current, observed, gone=gone)

    return await asyncio.get_running_loop().run_in_executor(executor, run)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    dependencies = _dependencies(memo)
    await dependencies.queue.close()
    for task in dependencies.tasks:
        task.cancel()
    await dependencies.metrics.writer.source.close()
    dependencies.executor.shutdown(wait=False, cancel_futures=True)


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf piggybacks on our client's configuration: the same credentials, refreshed the same
    way (kopf logs in again when the API server answers 401), so the watches and the writes
    always act as one identity."""
    operator = _settings(memo)
    info = kube.login_info(kube.configuration(operator.kubeconfig, operator.context))
    return kopf.ConnectionInfo(
        server=info.server,
        ca_path=info.ca_path,
        insecure=info.insecure,
        scheme=info.scheme,
        token=info.token,
        certificate_path=info.certificate_path,
        private_key_path=info.private_key_path,
        username=info.username,
        password=info.password,
        proxy_url=info.proxy_url,
        trust_env=settings.networking.trust_env,
    )


def _slim_model_deployment(body: kopf.Body) -> packed.Packed:
    """What reconciling reads of a ModelDeployment: its identity, spec and our status keys."""
    meta = body.metadata
    metadata = {
        key: meta[key]
        for key in ("name", "namespace", "uid", "generation", "deletionTimestamp")
        if key in meta
    }
    return packed.pack(
        {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": metadata,
            "spec": body.get("spec", {}),
            "status": {k: v for k, v in body.status.items() if k != "kopf"},
        }
    )


def _slim_child(body: kopf.Body, keep_status: bool) -> packed.Packed:
    """A child as the diff reads it: without managedFields (often the largest part), and without
    status unless the status computation reads it (the Deployment's and the HTTPRoute's)."""
    child = {k: v for k, v in body.items() if k != "status" or keep_status}
    child["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return packed.pack(child)


# The index functions are coroutines, though they await nothing: kopf runs a plain function in a
# thread (a hand-over and back per watch event and index), and these take tens of microseconds.


@kopf.index(*_MD)
async def model_deployments_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, packed.Packed]:
    return {(namespace or "", name): _slim_model_deployment(body)}


async def _index_child(
    resource: kopf.Resource, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, packed.Packed]:
    instance = labels.get(builders.LABEL_INSTANCE)
    if not instance:
        return {}
    keep_status = resource.plural in (builders.DEPLOYMENT.plural, builders.HTTP_ROUTE.plural)
    return {(namespace or "", instance): _slim_child(body, keep_status)}


async def _index_pod(
    namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[Key, packed.Packed]:
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
        "status": _slim_pod_status(status),
    }
    return {(namespace or "", instance): packed.pack(summary)}


_CONDITION_KEYS = ("type", "status", "reason", "message")
_TERMINATED_KEYS = ("exitCode", "reason", "message")


def _slim_pod_status(status: Mapping[str, Any]) -> api.Object:
    """What the status computation and the metrics read of a pod's status: its address, its
    conditions and why its containers wait or exited (a pod's status is most of its size)."""

    def container(c: Mapping[str, Any]) -> api.Object:
        state = c.get("state") or {}
        slim: api.Object = {"name": c.get("name"), "state": {}}
        if "waiting" in state:
            waiting = state["waiting"] or {}
            slim["state"]["waiting"] = {
                k: waiting[k] for k in ("reason", "message") if k in waiting
            }
        if "terminated" in state:
            terminated = state["terminated"] or {}
            slim["state"]["terminated"] = {
                k: terminated[k] for k in _TERMINATED_KEYS if k in terminated
            }
        last = (c.get("lastState") or {}).get("terminated")
        if last:
            slim["lastState"] = {"terminated": {k: last[k] for k in _TERMINATED_KEYS if k in last}}
        return slim

    slim: api.Object = {
        "conditions": [
            {k: c[k] for k in _CONDITION_KEYS if k in c} for c in status.get("conditions") or []
        ],
    }
    if status.get("podIP"):
        slim["podIP"] = status["podIP"]
    for key in ("initContainerStatuses", "containerStatuses"):
        if status.get(key):
            slim[key] = [container(c) for c in status[key]]
    return slim


for _kind in builders.CHILD_KINDS:
    kopf.index(_kind.api_version, _kind.plural, labels=_MANAGED, id=_index_id(_kind))(_index_child)
kopf.index(POD.api_version, POD.plural, labels=_MANAGED, id=_index_id(POD))(_index_pod)


def _observed(indexes: Mapping[str, Any], key: Key, uid: str) -> reconcile.Observed:
    children = {}
    for kind in builders.CHILD_KINDS:
        candidates = [packed.unpack(c) for c in indexes[_index_id(kind)].get(key, [])]
        # After a delete and re-create under the same name, the old children linger until the
        # garbage collector gets to them: prefer the ones owned by this object.
        owned = [c for c in candidates if builders.owned_by(c, uid)]
        if owned or candidates:
            children[kind] = (owned or candidates)[0]
    pods = [packed.unpack(p) for p in indexes[_index_id(POD)].get(key, [])]
    return reconcile.Observed(children=children, pods=pods)


@kopf.on.event(*_MD, id="model_deployment_changed")
async def model_deployment_event(
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    key = (namespace or "", name)
    dependencies = _dependencies(memo)
    if event["type"] == "DELETED":
        dependencies.reconciler.forget(*key)
        dependencies.queue.forget(key)
        dependencies.metrics.forget(key)
        return
    model = spec.get("model", {}).get("name") or name
    dependencies.metrics.track(key, model, copy.deepcopy(status.get("metrics")))
    # Listed at startup, just created, or a new generation; not our own status writes.
    if event["type"] in (None, "ADDED") or status.get("observedGeneration") != meta.get(
        "generation"
    ):
        await dependencies.queue.add(key)


async def _child_changed(
    event: kopf.RawEvent,
    resource: kopf.Resource,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    # The initial listing (type None) needs nothing: listing the ModelDeployments queues them all.
    change = event["type"]
    instance = labels.get(builders.LABEL_INSTANCE)
    if change is None or not instance or not namespace:
        return
    gone = _CHILD_KINDS_BY_PLURAL.get(resource.plural) if change == "DELETED" else None
    await _dependencies(memo).queue.add((namespace, instance), gone)


for _kind in (*builders.CHILD_KINDS, POD):
    kopf.on.event(_kind.api_version, _kind.plural, labels=_MANAGED, id=f"{_kind.plural}_changed")(
        _child_changed
    )
