"""The HTTP and gRPC listeners of one process, in front of a data plane."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from modeldeploy_contract import values
from modeldeploy_runtime import dataplane, rest, settings
from modeldeploy_runtime import grpc as grpc_adapter

logger = logging.getLogger(__name__)

# How long in-flight requests get to finish once the listeners closed.
FINISH_SECONDS = float(values.FINISH_SECONDS)


class Frontend:
    def __init__(
        self,
        config: settings.ServeSettings,
        plane: dataplane.DataPlane,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._config = config
        self._reuse_port = reuse_port
        self._draining = False
        app = rest.create_app(plane, config.max_request_bytes, config.path_prefix)
        app.on_response_prepare.append(self._close_when_draining)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=FINISH_SECONDS,
            # A client that hangs up cancels its request, queued work included.
            handler_cancellation=True,
        )
        # Room for a full queue plus the running and the waiting batch: the queue's own
        # (more telling) 429 comes first, and handlers past it are refused before decoding.
        self._grpc = grpc_adapter.create_server(
            plane, config.max_request_bytes, config.max_queue_size + 2 * config.max_batch_size
        )
        self.http_port = 0
        self.grpc_port = 0

    async def start(self) -> None:
        config = self._config
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            config.host,
            config.http_port,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        self.grpc_port = self._grpc.add_insecure_port(f"{config.host}:{config.grpc_port}")
        await self._grpc.start()
        logger.info("listening: http %d, grpc %d", self.http_port, self.grpc_port)

    async def _close_when_draining(self, _: web.Request, response: web.StreamResponse) -> None:
        """While draining, every response closes its connection: a keep-alive client then
        reconnects, and its next request goes to a pod still in the Service's endpoints instead
        of meeting this one's closed listener."""
        if self._draining:
            # Keep-alive is decided before this hook runs: both the header and the decision.
            response.force_close()
            response.headers["Connection"] = "close"

    async def stop(self, drain: bool = True) -> None:
        """Keep serving through the drain delay, then stop accepting and finish in flight.

        Readiness already answers 503; the delay covers the time the cluster takes to
        take this pod out of its Services' endpoints, while clients still arrive.
        """
        self._draining = True
        if drain and self._config.drain_seconds:
            logger.info(
                "draining for %.1f s before closing the listeners", self._config.drain_seconds
            )
            await asyncio.sleep(self._config.drain_seconds)
        await asyncio.gather(self._runner.cleanup(), self._grpc.stop(FINISH_SECONDS))
