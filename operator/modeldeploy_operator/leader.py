"""Leader election on a coordination.k8s.io/v1 Lease: of the operator's replicas, one acts.

The rules are client-go's. A standby takes the Lease when it has no holder, or when it has seen
it unchanged for the Lease's whole duration, timed on its own clock (clocks need not agree). The
leader renews it every retry period and gives up (the process exits) when a renewal cycle could not
renew within `renew_deadline`, a third shorter than the duration: it stops before a standby may
start. Every write carries the resourceVersion it read, so of two racing writers the API server
lets one win and answers the other 409. On a graceful shutdown the leader clears the holder,
and a standby takes over at its next attempt.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modeldeploy_operator import kube

logger = logging.getLogger(__name__)


def identity() -> str:
    """The pod (its hostname) and this start of the process: unique among replicas and their
    restarts. Not the pid: in a container it is 1 at every restart, and a restarted leader would
    take its dead predecessor's Lease for its own."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class _Observed:
    resource_version: str
    holder: str | None
    duration: float
    since: float


class Elector:
    def __init__(
        self,
        api: kube.Kube,
        namespace: str,
        name: str,
        *,
        identity: str,
        lease_seconds: int = 15,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        # client-go's defaults keep these ratios: a 15s lease, renewed within 10s, every 2s.
        self.renew_deadline = lease_seconds * 2 / 3
        self.retry_period = lease_seconds * 2 / 15
        self._api, self._clock, self._wall_clock = api, clock, wall_clock
        self._observed: _Observed | None = None
        self._renewed_at: float | None = None
        self._stopping = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def holder(self) -> str | None:
        return self._observed.holder if self._observed else None

    @property
    def leading(self) -> bool:
        return self._renewed_at is not None

    def try_acquire_or_renew(self, timeout: float) -> bool:
        """One attempt, its requests all within `timeout`; True if this process now leads.

        As client-go: the time a change of the Lease is observed is when the read returns
        (a slow read must not make a holder look older than it is), and a renewal's read and
        write share one deadline, so a leader never renews past its renew deadline.
        """
        started = self._clock()
        deadline = started + timeout

        def left() -> float:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise TimeoutError(f"no time left of the attempt's {timeout:.1f} s")
            return remaining

        try:
            lease = self._api.get_lease(self.namespace, self.name, timeout=left())
            if lease is not None:
                self._observe(lease, self._clock())
                if not self._may_take(self._clock()):
                    return False
            written = (
                self._api.replace_lease(self._taken(lease), timeout=left())
                if lease is not None
                else self._api.create_lease(self._taken(None), timeout=left())
            )
        except kube.ApiError as error:
            if error.status != 409:  # 409: another replica wrote first
                logger.warning("Lease %s/%s: %s", self.namespace, self.name, error)
            return False
        except Exception as error:  # any failure is a failed attempt, retried
            logger.warning("Lease %s/%s: %s", self.namespace, self.name, error)
            return False
        self._observe(written, self._clock())
        # The lead is counted from before the read: a leader's view errs on the short side.
        self._renewed_at = started
        return True

    def acquire(self) -> None:
        """Blocks until this process leads."""
        announced: str | None = None
        while not self.try_acquire_or_renew(timeout=self.lease_seconds):
            if self.holder != announced:
                announced = self.holder
                logger.info(
                    "Standing by: the Lease %s/%s is held by %s",
                    self.namespace,
                    self.name,
                    announced,
                )
            time.sleep(self.retry_period)
        logger.info(
            "Leading: holding the Lease %s/%s as %s", self.namespace, self.name, self.identity
        )

    def keep_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renews in a thread; calls `on_lost` there once the lead is lost or cannot be kept."""

        def renew() -> None:
            # As client-go: after each renewal, a retry period's pause, then a new cycle with a
            # renew deadline of its own, retried every retry period within it. A lead thus lasts
            # at most a retry period and a renew deadline past its last renewal (4/5 of the
            # Lease's duration), and one slow renewal does not eat into the next one's time.
            while not self._stopping.wait(self.retry_period):
                deadline = self._clock() + self.renew_deadline
                while not self.try_acquire_or_renew(timeout=deadline - self._clock()):
                    taken = self.holder not in (None, self.identity)
                    if taken or self._clock() + self.retry_period >= deadline:
                        self._renewed_at = None
                        logger.error(
                            "Lost the Lease %s/%s (now held by %s)",
                            self.namespace,
                            self.name,
                            self.holder,
                        )
                        on_lost()
                        return
                    if self._stopping.wait(self.retry_period):
                        return

        self._renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Stops renewing and, if still leading, clears the holder so a standby takes over now."""
        self._stopping.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.leading:
            return
        self._renewed_at = None
        try:
            lease = self._api.get_lease(self.namespace, self.name, timeout=self.retry_period)
            if lease is None or lease.get("spec", {}).get("holderIdentity") != self.identity:
                return
            released = copy.deepcopy(lease)
            released["spec"] = {
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(self._wall_clock()),
                "leaseTransitions": lease["spec"].get("leaseTransitions", 0),
            }
            self._api.replace_lease(released, timeout=self.retry_period)
            logger.info("Released the Lease %s/%s", self.namespace, self.name)
        except Exception as error:  # the Lease then expires on its own
            logger.warning(
                "Could not release the Lease %s/%s: %s", self.namespace, self.name, error
            )

    def _observe(self, lease: dict[str, Any], now: float) -> None:
        version = lease["metadata"]["resourceVersion"]
        if self._observed is None or self._observed.resource_version != version:
            spec = lease.get("spec", {})
            self._observed = _Observed(
                version,
                spec.get("holderIdentity") or None,
                float(spec.get("leaseDurationSeconds") or self.lease_seconds),
                now,
            )

    def _may_take(self, now: float) -> bool:
        observed = self._observed
        assert observed is not None
        if observed.holder in (None, self.identity):
            return True
        return now >= observed.since + observed.duration

    def _taken(self, lease: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time(self._wall_clock())
        if lease is None:
            taken: dict[str, Any] = {
                "apiVersion": kube.LEASE.api_version,
                "kind": kube.LEASE.kind,
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"leaseTransitions": 0, "acquireTime": now},
            }
        else:
            taken = copy.deepcopy(lease)
            taken.setdefault("spec", {})
            if taken["spec"].get("holderIdentity") != self.identity:
                transitions = taken["spec"].get("leaseTransitions", 0)
                taken["spec"] |= {"leaseTransitions": transitions + 1, "acquireTime": now}
        taken["spec"] |= {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": now,
        }
        return taken
