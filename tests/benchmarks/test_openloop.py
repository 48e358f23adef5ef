"""The open-loop load generator: its rate search, and a real run against a local server."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "runtime"))
import openloop


def _result(rate: float, p99_ms: float) -> openloop.Result:
    return openloop.Result(rate, 100, 100, 0, 0, p99_ms / 2, p99_ms, p99_ms, p99_ms, 0.1)


def test_the_search_finds_the_highest_rate_within_the_bound() -> None:
    tried: list[float] = []

    def measure(rate: float) -> openloop.Result:
        tried.append(rate)
        return _result(rate, 5 if rate <= 1234 else 50)

    best, trials = openloop.max_rate(measure, 10, tries=1)
    assert 1234 * 0.9 <= best <= 1234
    assert tried[:4] == [250, 500, 1000, 2000]
    assert [t.rate for t in trials] == tried


def test_one_stalled_run_does_not_end_the_search_but_two_do() -> None:
    stalls = {500: 1, 1000: 2}

    def measure(rate: float) -> openloop.Result:
        if stalls.get(rate, 0) > 0:
            stalls[rate] -= 1
            return _result(rate, 300)
        return _result(rate, 5)

    best, trials = openloop.max_rate(measure, 10, ceiling=4000, tries=2)
    # 500 passed on its second run; 1000 failed twice and was retried no more.
    assert 500 <= best < 1000
    assert [t.rate for t in trials][:5] == [250, 500, 500, 1000, 1000]


@pytest.fixture
def slow_server() -> Iterator[str]:
    """A loopback HTTP server that answers every POST after 2 ms."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    address: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.002)
        return web.json_response({"ok": True})

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/infer", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address.append(f"http://127.0.0.1:{runner.addresses[0][1]}/infer")
        return runner

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    yield address[0]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_poisson_run_sends_at_the_rate_and_times_each_answer(slow_server: str) -> None:
    result = openloop.measure(slow_server, b"{}", {}, 200, duration=1.5, warmup=0.5)
    # About 300 arrivals counted (Poisson: within a few standard deviations of 300).
    assert 220 < result.sent < 380
    assert result.answered == result.sent and result.failed == 0 and result.non_2xx == 0
    # Every answer takes the server's 2 ms at least.
    assert 2 <= result.p50_ms <= result.p99_ms <= result.max_ms
