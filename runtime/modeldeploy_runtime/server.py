"""Wires the model, batcher, data plane and both transports, and runs their lifecycle.

Start: listen on both ports at once (liveness answers while a model quantizes), then
load, quantize, warm up, and only then report ready.  Stop (SIGTERM): report not
ready, stop accepting, let in-flight requests finish, then unload.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from modeldeploy_runtime import batching, dataplane, metrics, model, quantization, rest, settings
from modeldeploy_runtime import grpc as grpc_adapter

logger = logging.getLogger(__name__)

# How long in-flight requests get to finish after SIGTERM; below the pod's default
# 30 s termination grace period.
DRAIN_SECONDS = 25.0


class Server:
    def __init__(self, config: settings.ServeSettings) -> None:
        self.config = config
        self.stats = metrics.ModelMetrics(config.model_name)
        self.plane = dataplane.DataPlane(name=config.model_name, version=config.model_version)
        self._runner = web.AppRunner(
            rest.create_app(self.plane, self.stats, config.max_request_bytes),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=DRAIN_SECONDS,
        )
        self._grpc = grpc_adapter.create_server(self.plane, self.stats, config.max_request_bytes)
        self._model: model.OnnxModel | None = None
        self._batcher: batching.Batcher | None = None
        self.http_port = 0
        self.grpc_port = 0

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port, backlog=1024)
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        self.grpc_port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        await self._grpc.start()
        logger.info("listening: http %d, grpc %d", self.http_port, self.grpc_port)

        served = await asyncio.to_thread(self._load)
        self._model = served
        self._batcher = batching.Batcher(
            served.predict,
            max_batch_size=self.config.max_batch_size if served.batchable else 1,
            max_delay_s=self.config.max_batch_delay_ms / 1000,
            max_queue_size=self.config.max_queue_size,
            stats=self.stats,
        )
        self._batcher.start()
        self.plane.attach(served, self._batcher)
        await self._warm_up(served, self._batcher)
        self.plane.ready = True
        logger.info(
            "model %s version %s is ready", self.config.model_name, self.config.model_version
        )

    def _load(self) -> model.OnnxModel:
        config = self.config
        path = config.model_path
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        if config.quantization is settings.Quantization.NONE:
            served = model.OnnxModel(path, threads=config.threads, device=config.device)
            served.load()
        else:
            reference = model.OnnxModel(path, threads=config.threads, device=config.device)
            reference.load()
            samples = (
                quantization.load_samples(config.calibration_path, reference.inputs)
                if config.calibration_path is not None
                else quantization.random_samples(reference.inputs)
            )
            calibration = (
                samples if config.quantization is settings.Quantization.STATIC_INT8 else None
            )
            quantized = quantization.quantize(
                path, config.quantization, calibration, config.cache_dir
            )
            served = model.OnnxModel(quantized, threads=config.threads, device=config.device)
            served.load()
            accuracy = quantization.compare(reference, served, samples)
            reference.unload()
            logger.info(
                "%s vs FP32 on %d samples: top-1 agreement %.4f, max abs error %.6g",
                config.quantization.value,
                accuracy.samples,
                accuracy.top1_agreement,
                accuracy.max_abs_error,
            )
            self.stats.set_quantization_accuracy(accuracy.top1_agreement, accuracy.max_abs_error)
        self.stats.set_model_info(
            config.model_version, config.quantization.value, served.device_used
        )
        return served

    async def _warm_up(self, served: model.OnnxModel, batcher: batching.Batcher) -> None:
        """Run the first (slow) inferences before traffic, at batch 1 and the largest batch."""
        sizes = {1, self.config.max_batch_size} if served.batchable else {1}
        for size in sorted(sizes):
            await batcher.submit(served.example_inputs(size), size)

    async def stop(self) -> None:
        self.plane.ready = False
        logger.info("draining in-flight requests")
        await asyncio.gather(self._runner.cleanup(), self._grpc.stop(DRAIN_SECONDS))
        if self._batcher is not None:
            await self._batcher.stop()
        if self._model is not None:
            self._model.unload()
        logger.info("stopped")


async def serve(config: settings.ServeSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = Server(config)
    try:
        starting = asyncio.ensure_future(server.start())
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stop_wait
        else:
            starting.cancel()
    finally:
        await server.stop()
