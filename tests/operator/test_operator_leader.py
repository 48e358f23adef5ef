"""The Lease election's rules, against an in-memory API server with optimistic concurrency."""

from __future__ import annotations

import copy
import socket
import threading
from typing import Any

from modeldeploy_operator import kube, leader


class FakeLeases:
    """Keeps Leases as the API server does: every write bumps resourceVersion, and a stale one
    (or a create of an existing name) is answered 409."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.versions = 0
        self.fail_with: Exception | None = None
        # A slow API server: each request takes this long on `clock`, or times out.
        self.clock: Clock | None = None
        self.latency = 0.0
        self.timeouts: list[float] = []

    def _wait(self, timeout: float) -> None:
        self.timeouts.append(timeout)
        if self.clock is not None:
            self.clock.now += min(self.latency, timeout)
            if self.latency > timeout:
                raise TimeoutError("the API server did not answer in time")

    def get_lease(self, namespace: str, name: str, *, timeout: float) -> dict[str, Any] | None:
        self._wait(timeout)
        if self.fail_with:
            raise self.fail_with
        found = self.leases.get(name)
        return copy.deepcopy(found) if found else None

    def create_lease(self, lease: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        self._wait(timeout)
        if lease["metadata"]["name"] in self.leases:
            raise kube.ApiError(status=409, reason="AlreadyExists")
        return self._store(lease)

    def replace_lease(self, lease: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        self._wait(timeout)
        current = self.leases[lease["metadata"]["name"]]
        if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise kube.ApiError(status=409, reason="Conflict")
        return self._store(lease)

    def write_as(self, holder: str) -> None:
        lease = copy.deepcopy(self.leases["lock"])
        lease["spec"]["holderIdentity"] = holder
        self._store(lease)

    def _store(self, lease: dict[str, Any]) -> dict[str, Any]:
        self.versions += 1
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(self.versions)
        self.leases[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _elector(api: FakeLeases, name: str, clock: Clock, lease_seconds: int = 15) -> leader.Elector:
    return leader.Elector(
        api,  # type: ignore[arg-type]
        "ops",
        "lock",
        identity=name,
        lease_seconds=lease_seconds,
        clock=clock,
    )


def test_the_first_creates_the_lease_and_the_second_waits_it_out() -> None:
    api, clock = FakeLeases(), Clock()
    first, second = _elector(api, "a", clock), _elector(api, "b", clock)
    assert first.try_acquire_or_renew(timeout=1)
    spec = api.leases["lock"]["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0

    assert not second.try_acquire_or_renew(timeout=1)
    assert second.holder == "a"
    clock.now += 10
    assert first.try_acquire_or_renew(timeout=1)  # a renewal: the standby's wait starts over
    clock.now += 10
    assert not second.try_acquire_or_renew(timeout=1)
    clock.now += 14
    assert not second.try_acquire_or_renew(timeout=1)
    clock.now += 1  # unchanged for 15s, as the standby timed it
    assert second.try_acquire_or_renew(timeout=1)
    assert api.leases["lock"]["spec"]["holderIdentity"] == "b"
    assert api.leases["lock"]["spec"]["leaseTransitions"] == 1


def test_of_two_racing_writers_one_wins() -> None:
    api, clock = FakeLeases(), Clock()
    first, second = _elector(api, "a", clock), _elector(api, "b", clock)
    assert first.try_acquire_or_renew(timeout=1)
    stale = api.get_lease("ops", "lock", timeout=1)
    api.write_as("a")  # a renewal between the standby's read and its write
    api.get_lease = lambda *args, **kwargs: copy.deepcopy(stale)  # type: ignore[method-assign]
    clock.now += 60
    assert not second.try_acquire_or_renew(timeout=1)
    assert api.leases["lock"]["spec"]["holderIdentity"] == "a"


def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    first, second = _elector(api, "a", clock), _elector(api, "b", clock)
    assert first.try_acquire_or_renew(timeout=1)
    assert not second.try_acquire_or_renew(timeout=1)
    first.release()
    assert "holderIdentity" not in api.leases["lock"]["spec"]
    assert second.try_acquire_or_renew(timeout=1)


def test_the_leader_gives_up_when_another_holds_the_lease() -> None:
    api = FakeLeases()
    elector = leader.Elector(api, "ops", "lock", identity="a", lease_seconds=1)  # type: ignore[arg-type]
    elector.acquire()
    lost = threading.Event()
    elector.keep_renewing(on_lost=lost.set)
    api.write_as("b")
    assert lost.wait(timeout=5)
    assert not elector.leading


def test_the_leader_gives_up_before_its_lease_can_expire_when_it_cannot_renew() -> None:
    api = FakeLeases()
    elector = leader.Elector(api, "ops", "lock", identity="a", lease_seconds=1)  # type: ignore[arg-type]
    elector.acquire()
    lost = threading.Event()
    elector.keep_renewing(on_lost=lost.set)
    api.fail_with = ConnectionError("the API server is unreachable")
    assert not lost.wait(timeout=0.3)
    # A retry period (2/15 s) and the renew deadline (2/3 s) past the last renewal: before the
    # 1 s lease expires.
    assert lost.wait(timeout=2)


def test_a_slow_read_does_not_make_the_holder_look_older() -> None:
    api, clock = FakeLeases(), Clock()
    first, second = _elector(api, "a", clock), _elector(api, "b", clock)
    assert first.try_acquire_or_renew(timeout=1)
    api.clock, api.latency = clock, 5.0
    # The standby's read starts at 100 and returns at 105: it has seen the Lease since 105.
    assert not second.try_acquire_or_renew(timeout=10)
    api.latency = 0.0
    clock.now = 118  # 18 s after the read began, 13 s after it returned
    assert not second.try_acquire_or_renew(timeout=1)
    clock.now = 120
    assert second.try_acquire_or_renew(timeout=1)


def test_a_renewal_reads_and_writes_within_one_deadline() -> None:
    api, clock = FakeLeases(), Clock()
    elector = _elector(api, "a", clock)
    assert elector.try_acquire_or_renew(timeout=1)
    api.clock, api.latency, api.timeouts = clock, 6.0, []
    renewed_at = clock.now
    # 10 s left of the renew deadline; the read takes 6, so the write gets only 4 and fails.
    assert not elector.try_acquire_or_renew(timeout=elector.renew_deadline)
    assert api.timeouts == [10.0, 4.0]
    assert clock.now - renewed_at <= elector.renew_deadline


def test_each_renewal_cycle_gets_a_renew_deadline_of_its_own() -> None:
    """On a slow connection an attempt takes most of the renew deadline; client-go gives every
    renewal cycle a fresh one, so a leader whose renewals keep succeeding keeps leading."""
    api, clock = FakeLeases(), Clock()
    elector = _elector(api, "a", clock, lease_seconds=1)
    api.clock, api.latency = clock, 0.25  # a read and a write: 0.5 of the 2/3 s renew deadline
    elector.acquire()
    written = api.versions
    lost = threading.Event()
    elector.keep_renewing(on_lost=lost.set)
    try:
        assert not lost.wait(timeout=1.0)  # several retry periods (2/15 s each)
        assert api.versions > written + 2
        assert elector.leading
    finally:
        elector.release()


def test_each_start_of_the_operator_has_its_own_identity() -> None:
    # In a container every start is pid 1: the identity must still differ, or a restarted leader
    # would take its dead predecessor's Lease for its own instead of waiting for it to expire.
    first, second = leader.identity(), leader.identity()
    assert first != second
    assert first.startswith(f"{socket.gethostname()}_")
