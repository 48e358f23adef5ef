"""Operator scale benchmark: N ModelDeployments against the local control plane.

Prints, per N: seconds until every child exists, seconds until every ModelDeployment is Ready
(for its current generation), the operator's writes and reads per ModelDeployment, its CPU
seconds until then, its peak RSS, its writes per minute at steady state, and the machine's load
average. Not a test; run it on a quiet machine:

    .venv/bin/python benchmarks/operator/bench_operator.py --counts 500 1000

`--baseline OTHER_CHECKOUT` runs that checkout's operator (its .venv) at every count too, right
after this one's, so that a change is measured before and after in one run; the tables then
give the growth per ModelDeployment between consecutive counts for both.
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from modeldeploy_dev import cluster as localcluster
from modeldeploy_dev import crd
from modeldeploy_runtime import metrics as runtime_metrics

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
OPERATOR_AGENTS = ("modeldeploy-operator", "kopf/")
HEALTH_PORT, METRICS_PORT = 28080, 29090
METRICS_INTERVAL_S = 30


def _kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = localcluster.run_kubectl(kubeconfig, *args, input=input)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def _operator_writes(audit_log: Path, offset: int, namespace: str) -> int:
    count = 0
    with audit_log.open() as log:
        log.seek(offset)
        for line in log:
            event = json.loads(line)
            if (
                event.get("stage") == "ResponseComplete"
                and event["verb"] in WRITE_VERBS
                and event.get("objectRef", {}).get("namespace") == namespace
                and event.get("userAgent", "").startswith(OPERATOR_AGENTS)
            ):
                count += 1
    return count


# Where the time to Ready goes, per ModelDeployment, from the audit log: the operator picks up
# the new object and applies its Deployment; the cluster (controller-manager, scheduler, KWOK)
# rolls the Deployment out; the operator sees the rollout and writes Ready.
PHASES = ("pickup", "rollout", "reaction")


def _phases(audit_log: Path, offset: int, namespace: str) -> dict[str, tuple[float, float]]:
    """Per phase, the median and the largest seconds over the ModelDeployments; under "write",
    the median and the 95th percentile of the API server's time to answer the operator's
    writes."""
    times: dict[str, dict[str, float]] = {
        "created": {},
        "applied": {},
        "rolled_out": {},
        "ready": {},
    }
    latencies = []
    with audit_log.open() as log:
        log.seek(offset)
        for line in log:
            event = json.loads(line)
            ref = event.get("objectRef", {})
            if event.get("stage") != "ResponseComplete" or ref.get("namespace") != namespace:
                continue
            at = datetime.datetime.fromisoformat(event["stageTimestamp"]).timestamp()
            name, resource = ref.get("name", ""), ref.get("resource")
            subresource, verb = ref.get("subresource"), event["verb"]
            ours = event.get("userAgent", "").startswith(OPERATOR_AGENTS)
            if ours and verb in WRITE_VERBS and "requestReceivedTimestamp" in event:
                received = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"])
                latencies.append(at - received.timestamp())
            if resource == "modeldeployments" and verb == "create":
                times["created"].setdefault(name, at)
            elif resource == "deployments" and not subresource and ours:
                times["applied"].setdefault(name, at)
            elif resource == "deployments" and subresource == "status" and not ours:
                times["rolled_out"][name] = at  # the last one: the rollout's end
            elif resource == "modeldeployments" and subresource == "status" and ours:
                times["ready"][name] = at
    spans: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for name, created in times["created"].items():
        points = [created] + [times[k].get(name) for k in ("applied", "rolled_out", "ready")]
        for phase, start, end in zip(PHASES, points, points[1:], strict=False):
            if start is not None and end is not None:
                spans[phase].append(max(0.0, end - start))
    result = {
        phase: (statistics.median(values), max(values)) if values else (float("nan"),) * 2
        for phase, values in spans.items()
    }
    if len(latencies) > 1:
        result["write"] = (statistics.median(latencies), statistics.quantiles(latencies, n=20)[-1])
    return result


def _operator_reads() -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modeldeploy_operator_api_requests_total{") and 'verb="GET"' in line
    )


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmHWM")


def _rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class _LoopbackOnlyServer(http.server.ThreadingHTTPServer):
    """Any address, but only on the loopback interface (SO_BINDTODEVICE): every 127.x.y.z pod IP
    reaches it, nothing from another interface does."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        super().server_bind()


class _SyntheticPods:
    """Stands in for N runtime pods' /metrics at once: one server on port 8080 of the loopback
    interface answers every pod IP (all of 127.0.0.0/8 is loopback) with the exposition of the
    runtime's own metrics code, advanced by `rate` requests per second per pod since the previous
    scrape. What is measured is the operator's metrics path; 1000 real model servers do not fit
    on this machine."""

    def __init__(self, model_of_ip: dict[str, str], fluctuate: bool) -> None:
        self._models = {ip: runtime_metrics.ModelMetrics(m) for ip, m in model_of_ip.items()}
        self._last = dict.fromkeys(model_of_ip, time.monotonic())
        self._fluctuate = fluctuate
        self._lock = threading.Lock()
        self._random = random.Random(1)
        pods = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pods.scrape(self.connection.getsockname()[0])
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._server = _LoopbackOnlyServer(("0.0.0.0", 8080), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def scrape(self, ip: str) -> bytes:
        with self._lock:
            metrics = self._models.get(ip)
            if metrics is None:
                return b""
            now = time.monotonic()
            rate = 20.0 * (self._random.uniform(0.5, 1.5) if self._fluctuate else 1.0)
            for _ in range(int(rate * (now - self._last[ip]))):
                metrics.observe_request(
                    runtime_metrics.Protocol.HTTP, runtime_metrics.Outcome.SUCCESS, 0.004
                )
            metrics.batch_size.observe(4)
            self._last[ip] = now
            return metrics.exposition()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _metric_writes_per_min(
    kubeconfig: Path, audit_log: Path, namespace: str, fluctuate: bool, seconds: int
) -> float:
    pods = json.loads(_kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json"))["items"]
    model_of_ip = {
        p["status"]["podIP"]: p["metadata"]["labels"]["app.kubernetes.io/instance"]
        for p in pods
        if p["status"].get("podIP")
    }
    synthetic = _SyntheticPods(model_of_ip, fluctuate)
    try:
        # The first scrape of each pod only sets its baseline; then one full interval.
        time.sleep(2 * METRICS_INTERVAL_S)
        offset = audit_log.stat().st_size
        time.sleep(seconds)
        return _operator_writes(audit_log, offset, namespace) * 60 / seconds
    finally:
        synthetic.close()


def _model_deployments(namespace: str, count: int) -> str:
    items = [
        {
            "apiVersion": "modeldeploy.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": f"m{i}", "namespace": namespace},
            "spec": {"model": {"uri": f"s3://models/m{i}/1/model.onnx", "version": "1"}},
        }
        for i in range(count)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _wait(what: str, probe: Any, deadline: float) -> float:
    start = time.monotonic()
    while not probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)
    return time.monotonic() - start


def run(
    count: int,
    kubeconfig: Path,
    audit_log: Path,
    steady_seconds: int,
    metrics_seconds: int,
    tracemalloc_dir: Path | None = None,
    operator_command: list[str] | None = None,
) -> dict[str, Any]:
    namespace = f"bench-{count}-{uuid.uuid4().hex[:6]}"
    _kubectl(kubeconfig, "create", "namespace", namespace)
    log = Path(tempfile.gettempdir()) / f"modeldeploy-bench-{namespace}.log"
    # Under --tracemalloc the operator runs in traced.py, which writes where its memory was
    # allocated on SIGUSR1.
    command = operator_command or [str(Path(sys.executable).with_name("modeldeploy"))]
    if tracemalloc_dir is not None:
        command = [sys.executable, str(Path(__file__).with_name("traced.py")), str(tracemalloc_dir)]
    operator = subprocess.Popen(
        [
            *command,
            "run",
            "--namespace",
            namespace,
            "--bind-address",
            "127.0.0.1",
            "--health-port",
            str(HEALTH_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--log-format",
            "json",
            "--metrics-interval",
            str(METRICS_INTERVAL_S),
        ],
        env=os.environ | {"KUBECONFIG": str(kubeconfig)},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(3)  # the operator's watches start
        offset = audit_log.stat().st_size
        started = time.monotonic()
        deadline = started + 900
        _kubectl(kubeconfig, "create", "-f", "-", input=_model_deployments(namespace, count))
        created = time.monotonic() - started

        def children_exist() -> bool:
            names = _kubectl(
                kubeconfig, "get", "deployments,services", "-n", namespace, "-o", "name"
            )
            return len(names.split()) >= 2 * count

        def all_ready() -> bool:
            listed = json.loads(_kubectl(kubeconfig, "get", "md", "-n", namespace, "-o", "json"))
            ready = 0
            for md in listed["items"]:
                status = md.get("status", {})
                current = status.get("observedGeneration") == md["metadata"]["generation"]
                conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
                ready += current and conditions.get("Ready") == "True"
            return ready >= count

        _wait("children", children_exist, deadline)
        children_s = time.monotonic() - started
        _wait("Ready", all_ready, deadline)
        ready_s = time.monotonic() - started
        cpu_s = _cpu_s(operator.pid)
        load = _load()
        time.sleep(5)  # let the last status writes settle before the steady-state window
        writes = _operator_writes(audit_log, offset, namespace)
        phases = _phases(audit_log, offset, namespace)
        reads = _operator_reads()
        steady_offset = audit_log.stat().st_size
        time.sleep(steady_seconds)
        steady_writes = _operator_writes(audit_log, steady_offset, namespace)
        peak_rss = _peak_rss_mib(operator.pid)
        rss = _rss_mib(operator.pid)
        if tracemalloc_dir is not None:
            operator.send_signal(signal.SIGUSR1)
            # traced.py writes the traceback listing last.
            _wait(
                "the tracemalloc dump",
                lambda: any(tracemalloc_dir.glob(f"{namespace}-*-by-traceback.txt")),
                time.monotonic() + 300,
            )
        metric_writes = {
            fluctuate: _metric_writes_per_min(
                kubeconfig, audit_log, namespace, fluctuate, metrics_seconds
            )
            if metrics_seconds
            else float("nan")
            for fluctuate in (False, True)
        }
        return {
            "count": count,
            "create_s": created,
            "children_s": children_s,
            "ready_s": ready_s,
            "writes_per_md": writes / count,
            "reads_per_md": reads / count,
            "cpu_s": cpu_s,
            "phases": phases,
            "load": load,
            "peak_rss_mib": peak_rss,
            "rss_mib": rss,
            "steady_writes_per_min": steady_writes * 60 / steady_seconds,
            "metric_writes_steady_traffic": metric_writes[False],
            "metric_writes_fluctuating": metric_writes[True],
            "metrics_peak_rss_mib": _peak_rss_mib(operator.pid),
        }
    finally:
        operator.terminate()
        operator.wait(timeout=60)
        _kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--steady-seconds", type=int, default=60)
    parser.add_argument(
        "--metrics-seconds", type=int, default=90, help="0 skips the status.metrics phase"
    )
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        metavar="DIR",
        help="run the operator under tracemalloc; write where its memory went into DIR",
    )
    parser.add_argument(
        "--operator-command",
        type=shlex.split,
        metavar="CMD",
        help="how to start `modeldeploy` (default: this virtualenv's), e.g. to measure another "
        "checkout",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run this checkout's operator (CHECKOUT/.venv/bin/modeldeploy) at every count",
    )
    args = parser.parse_args()
    state = localcluster.up()
    # The CRD, as the chart or `kubectl apply -f crds/` installs it.
    _kubectl(state.kubeconfig, "apply", "--server-side", "-f", str(crd.crd_paths()[0]))
    _kubectl(
        state.kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
        "crd/modeldeployments.modeldeploy.io",
    )  # fmt: skip
    operators = {"this": args.operator_command}
    if args.baseline is not None:
        operators["baseline"] = [str(args.baseline / ".venv/bin/modeldeploy")]
    results: list[dict[str, Any]] = [
        {"operator": label}
        | run(
            count,
            state.kubeconfig,
            state.audit_log,
            args.steady_seconds,
            args.metrics_seconds,
            args.tracemalloc if label == "this" else None,
            command,
        )
        for count in args.counts
        for label, command in operators.items()
    ]
    print(
        f"{'operator':>9} {'MDs':>5} {'create s':>9} {'children s':>11} {'Ready s':>8} "
        f"{'writes/MD':>10} {'reads/MD':>9} {'CPU s':>6} {'peak RSS MiB':>13} "
        f"{'KiB/MD':>7} {'RSS MiB':>8} {'steady writes/min':>18} {'load':>5}"
    )
    previous: dict[str, dict[str, Any]] = {}
    for r in results:
        before = previous.get(r["operator"])
        growth = (
            (r["peak_rss_mib"] - before["peak_rss_mib"]) * 1024 / (r["count"] - before["count"])
            if before is not None and r["count"] != before["count"]
            else float("nan")
        )
        previous[r["operator"]] = r
        print(
            f"{r['operator']:>9} {r['count']:>5} {r['create_s']:>9.1f} {r['children_s']:>11.1f} "
            f"{r['ready_s']:>8.1f} {r['writes_per_md']:>10.2f} {r['reads_per_md']:>9.2f} "
            f"{r['cpu_s']:>6.1f} {r['peak_rss_mib']:>13.0f} {growth:>7.1f} {r['rss_mib']:>8.0f} "
            f"{r['steady_writes_per_min']:>18.1f} {r['load']:>5.1f}"
        )
    print(
        "\nwhere the time to Ready went, seconds per ModelDeployment, median / largest (audit "
        "log): pickup = created to Deployment applied (operator), rollout = applied to the "
        "Deployment's last status update (cluster), reaction = that to the last status write "
        "(operator); write = the API server's time per write of the operator"
    )
    print(
        f"{'operator':>9} {'MDs':>5} "
        + " ".join(f"{phase:>15}" for phase in PHASES)
        + f" {'write s p50/p95':>17}"
    )
    for r in results:
        write = r["phases"].get("write", (float("nan"),) * 2)
        cells = [f"{r['phases'][p][0]:6.1f} / {r['phases'][p][1]:6.1f}" for p in PHASES]
        cells.append(f"{write[0]:7.3f} / {write[1]:7.3f}")
        print(f"{r['operator']:>9} {r['count']:>5} " + " ".join(f"{c:>15}" for c in cells))
    if args.metrics_seconds:
        print(
            f"\nstatus.metrics writes per minute (interval {METRICS_INTERVAL_S}s; budget: at most "
            "one write per ModelDeployment per interval, only on a change of more than 10%)"
        )
        print(
            f"{'operator':>9} {'MDs':>5} {'steady traffic':>15} {'fluctuating traffic':>20} "
            f"{'budget':>7} {'RSS MiB':>8}"
        )
        for r in results:
            budget = r["count"] * 60 / METRICS_INTERVAL_S
            print(
                f"{r['operator']:>9} {r['count']:>5} {r['metric_writes_steady_traffic']:>15.1f} "
                f"{r['metric_writes_fluctuating']:>20.1f} {budget:>7.0f} "
                f"{r['metrics_peak_rss_mib']:>8.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
