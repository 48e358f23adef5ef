"""The HTTP and gRPC listeners of one process, in front of a data plane."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from modeldeploy_runtime import dataplane, metrics, rest, settings
from modeldeploy_runtime import grpc as grpc_adapter

logger = logging.getLogger(__name__)

# How long in-flight requests get to finish after SIGTERM; below the pod's default
# 30 s termination grace period.
DRAIN_SECONDS = 25.0


class Frontend:
    def __init__(
        self,
        config: settings.ServeSettings,
        plane: dataplane.DataPlane,
        stats: metrics.ModelMetrics,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._config = config
        self._reuse_port = reuse_port
        self._runner = web.AppRunner(
            rest.create_app(plane, stats, config.max_request_bytes),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=DRAIN_SECONDS,
        )
        self._grpc = grpc_adapter.create_server(plane, stats, config.max_request_bytes)
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

    async def stop(self) -> None:
        await asyncio.gather(self._runner.cleanup(), self._grpc.stop(DRAIN_SECONDS))
