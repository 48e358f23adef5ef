"""Open-loop load: requests at Poisson arrival times, whatever the server's answers do.

    python openloop.py URL BODY_FILE --rate 1000 [--duration 5] [--header 'K: V'] [--processes 1]

Closed-loop load (wrk's fixed connections) lets a slow server slow its clients down; real
traffic does not wait.  Here the arrival times are drawn in advance (exponential gaps at
the rate; independent Poisson streams add up to one, so several processes split a rate),
a pacer thread hands each request to the event loop at its time, and the loop sends it on
an idle keep-alive connection, opening another when none is idle.  Latency runs from the
scheduled arrival, so a server (or generator) that falls behind cannot hide it
(coordinated omission); a request still unanswered ``grace`` seconds after the last
arrival counts as failed, with an infinite latency.  The first ``warmup`` seconds of
arrivals are sent but not counted.

``max_rate`` is the MLPerf "server" search: the highest Poisson rate whose p99 latency
stays under a bound, found by doubling and then bisecting.

The command prints one JSON object (``Result``).  HTTP/1.1 with Content-Length answers
only, which every server measured here gives.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import threading
import time
import typing
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Result:
    rate: float  # the Poisson rate asked for, requests/s
    sent: int  # counted requests (arrivals after the warm-up)
    answered: int
    non_2xx: int
    failed: int  # connection errors and requests unanswered at the end
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    late_p99_ms: float  # how late the generator sent, p99: its own accuracy

    def within(self, bound_ms: float) -> bool:
        return self.p99_ms <= bound_ms and self.non_2xx == 0


class _Connection(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self._client = client
        self._buffer = bytearray()
        self._expect: int | None = None
        self._status = 0
        self.transport: asyncio.Transport | None = None
        self.scheduled: float | None = None  # the arrival time of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = typing.cast(asyncio.Transport, transport)

    def start(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(self._client.request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if self._expect is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                self._status = int(head[9:12])
                marker = head.find(b"content-length:")
                if marker < 0:
                    raise RuntimeError(f"an answer without Content-Length: {head[:300]!r}")
                line_end = head.find(b"\r\n", marker)
                length = int(head[marker + 15 : line_end if line_end >= 0 else None])
                self._expect = end + 4 + length
            if len(buffer) < self._expect:
                return
            del buffer[: self._expect]
            self._expect = None
            scheduled, self.scheduled = self.scheduled, None
            if scheduled is not None:
                self._client.answered(self, scheduled, self._status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.lost(self)


class _Client:
    """Sends each arrival on an idle connection, or queues it until one is free."""

    def __init__(self, host: str, port: int, request: bytes, max_connections: int) -> None:
        self.request = request
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._connections = 0
        self._connecting = 0
        self._idle: list[_Connection] = []
        self._backlog: collections.deque[float] = collections.deque()
        self.latencies: list[tuple[float, float]] = []  # (scheduled, latency s)
        self.non_2xx: list[float] = []
        self.failed: list[float] = []
        self.late: list[float] = []
        self.outstanding = 0
        self.drained = asyncio.Event()

    def send(self, due: list[float]) -> None:
        now = time.perf_counter()
        for scheduled in due:
            self.late.append(now - scheduled)
            self.outstanding += 1
            self.drained.clear()
            if self._idle:
                self._idle.pop().start(scheduled)
            else:
                self._backlog.append(scheduled)
        wanted = len(self._backlog) - self._connecting
        room = self._max_connections - self._connections - self._connecting
        for _ in range(max(0, min(wanted, room))):
            asyncio.get_running_loop().create_task(self.open())

    async def open(self) -> None:
        self._connecting += 1
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self), self._host, self._port
            )
        except OSError:
            self._connecting -= 1
            if self._backlog:
                self._done(self._backlog.popleft(), None)
            return
        self._connecting -= 1
        self._connections += 1
        self._ready(connection)

    def _ready(self, connection: _Connection) -> None:
        if self._backlog:
            connection.start(self._backlog.popleft())
        else:
            self._idle.append(connection)

    def answered(self, connection: _Connection, scheduled: float, status: int) -> None:
        self._done(scheduled, status)
        self._ready(connection)

    def lost(self, connection: _Connection) -> None:
        self._connections -= 1
        if connection in self._idle:
            self._idle.remove(connection)
        if connection.scheduled is not None:
            self._done(connection.scheduled, None)

    def _done(self, scheduled: float, status: int | None) -> None:
        if status is None:
            self.failed.append(scheduled)
        elif status >= 300:
            self.non_2xx.append(scheduled)
        else:
            self.latencies.append((scheduled, time.perf_counter() - scheduled))
        self.outstanding -= 1
        if self.outstanding == 0:
            self.drained.set()


def _pace(loop: asyncio.AbstractEventLoop, arrivals: np.ndarray, client: _Client) -> None:
    """In a thread: hand the loop every arrival that is due, sleeping until the next."""
    i = 0
    while i < len(arrivals):
        delay = arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        now = time.perf_counter()
        j = int(np.searchsorted(arrivals, now, side="right"))
        j = max(j, i + 1)
        loop.call_soon_threadsafe(client.send, arrivals[i:j].tolist())
        i = j


async def _share(
    url: str,
    body: bytes,
    headers: dict[str, str],
    rate: float,
    duration: float,
    warmup: float,
    grace: float,
    seed: int,
    max_connections: int,
) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    client = _Client(host, port, request, max_connections)
    rng = np.random.default_rng(seed)
    total = warmup + duration
    gaps = rng.exponential(1 / rate, int(rate * total * 1.2) + 100)
    offsets = np.cumsum(gaps)
    offsets = offsets[offsets < total]
    loop = asyncio.get_running_loop()
    # A few connections ready before the first arrival; more open as the load needs.
    await asyncio.gather(*(client.open() for _ in range(min(8, max_connections))))
    start = time.perf_counter() + 0.05
    arrivals = start + offsets
    pacer = threading.Thread(target=_pace, args=(loop, arrivals, client), daemon=True)
    pacer.start()
    await asyncio.to_thread(pacer.join)
    end = start + total
    with_grace = max(0.0, end + grace - time.perf_counter())
    if client.outstanding:
        try:
            async with asyncio.timeout(with_grace):
                await client.drained.wait()
        except TimeoutError:
            pass
    counted_from = start + warmup
    latencies = [latency for scheduled, latency in client.latencies if scheduled >= counted_from]
    late = [lag for lag, s in zip(client.late, arrivals, strict=False) if s >= counted_from]
    sent = int(np.count_nonzero(arrivals >= counted_from))
    return {
        "sent": sent,
        "latencies": latencies,
        "non_2xx": sum(1 for s in client.non_2xx if s >= counted_from),
        "late": late,
    }


def _run_share(*args: Any) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_share(*args))


def measure(
    url: str,
    body: bytes,
    headers: dict[str, str],
    rate: float,
    *,
    duration: float = 5,
    warmup: float = 1,
    grace: float = 5,
    processes: int = 1,
    seed: int = 0,
    max_connections: int = 1024,
) -> Result:
    """One open-loop run at ``rate`` requests/s, split over ``processes`` processes."""
    shares = [
        (url, body, headers, rate / processes, duration, warmup, grace, seed + i, max_connections)
        for i in range(processes)
    ]
    if processes == 1:
        outcomes = [_run_share(*shares[0])]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            outcomes = list(pool.map(_run_share, *zip(*shares, strict=True)))
    sent = sum(o["sent"] for o in outcomes)
    latencies = np.array([x for o in outcomes for x in o["latencies"]]) * 1e3
    non_2xx = sum(o["non_2xx"] for o in outcomes)
    failed = sent - len(latencies) - non_2xx
    # Failed and non-2xx requests count as never answered.
    padded = np.concatenate([latencies, np.full(sent - len(latencies), math.inf)])
    p50, p90, p99, worst = (
        np.percentile(padded, [50, 90, 99, 100], method="inverted_cdf") if sent else (math.inf,) * 4
    )
    late = np.array([x for o in outcomes for x in o["late"]]) * 1e3
    return Result(
        rate=rate,
        sent=sent,
        answered=len(latencies),
        non_2xx=non_2xx,
        failed=failed,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(worst),
        late_p99_ms=float(np.percentile(late, 99)) if len(late) else math.nan,
    )


def max_rate(
    measure: Callable[[float], Result],
    bound_ms: float,
    *,
    start: float = 250,
    ceiling: float = 64_000,
    precision: float = 0.1,
    tries: int = 2,
) -> tuple[float, list[Result]]:
    """The highest rate whose run keeps p99 within ``bound_ms`` (0 if even ``start`` fails).

    Doubles from ``start`` until a rate fails, then bisects until the gap between the best
    passing and the lowest failing rate is under ``precision`` of the passing one.  A rate
    fails when ``tries`` runs in a row exceed the bound: on a shared machine one stall of
    the server's core (or the generator's) should not end the search.
    """
    trials: list[Result] = []

    def run(rate: float) -> Result:
        for _ in range(tries):
            trials.append(result := measure(rate))
            if result.within(bound_ms):
                break
        return result

    passed, failed = 0.0, math.inf
    rate = start
    while rate <= ceiling:
        result = run(rate)
        if not result.within(bound_ms):
            failed = rate
            break
        passed, rate = rate, rate * 2
    if passed == 0:
        return 0.0, trials
    while failed - passed > precision * passed and failed != math.inf:
        rate = (passed + failed) / 2
        result = run(rate)
        if result.within(bound_ms):
            passed = rate
        else:
            failed = rate
    return passed, trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("body", type=Path)
    parser.add_argument("--rate", type=float, required=True, help="Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=5, help="seconds counted")
    parser.add_argument("--warmup", type=float, default=1, help="seconds sent, not counted")
    parser.add_argument("--grace", type=float, default=5, help="seconds to wait for the last")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    result = measure(
        args.url,
        args.body.read_bytes(),
        headers,
        args.rate,
        duration=args.duration,
        warmup=args.warmup,
        grace=args.grace,
        processes=args.processes,
        seed=args.seed,
    )
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
