"""Wires the model, batcher, data plane and both transports, and runs their lifecycle.

Two shapes, one behaviour:

- ``Server``: one process listens, decodes, batches and runs (CPU pods: the model's own
  threads want every core, and this measured fastest there).
- ``Engine``: front-end worker processes (``worker.py``) share the ports (SO_REUSEPORT),
  accept and decode HTTP and gRPC, and hand tensors through shared memory (``ipc.py``) to
  this process, which owns the model and its one batcher, so batches stay large.

Start: listen at once (liveness answers while a model quantizes), then load, quantize,
warm up every batch size, and only then report ready.  Stop (SIGTERM): report not ready,
stop accepting, let in-flight requests finish, then unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

from modeldeploy_runtime import (
    batching,
    dataplane,
    frontend,
    ipc,
    metrics,
    model,
    quantization,
    runner,
    settings,
    worker,
)

logger = logging.getLogger(__name__)


def load(config: settings.ServeSettings, stats: metrics.ModelMetrics) -> model.OnnxModel:
    """Load (and quantize) the model with a session per batch size; blocking."""
    path = config.model_path
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    session_config = model.SessionConfig.of(config)
    sizes = config.sizes_for(model.resolve_device(config.device))
    if config.quantization is settings.Quantization.NONE:
        served = model.OnnxModel(path, session_config)
        served.load(sizes)
    else:
        reference = model.OnnxModel(path, session_config)
        reference.load()
        samples = (
            quantization.load_samples(config.calibration_path, reference.inputs)
            if config.calibration_path is not None
            else quantization.random_samples(reference.inputs)
        )
        calibration = samples if config.quantization is settings.Quantization.STATIC_INT8 else None
        quantized = quantization.quantize(path, config.quantization, calibration, config.cache_dir)
        served = model.OnnxModel(quantized, session_config)
        served.load(sizes)
        accuracy = quantization.compare(reference, served, samples)
        reference.unload()
        logger.info(
            "%s vs FP32 on %d samples: top-1 agreement %.4f, max abs error %.6g",
            config.quantization.value,
            accuracy.samples,
            accuracy.top1_agreement,
            accuracy.max_abs_error,
        )
        stats.set_quantization_accuracy(accuracy.top1_agreement, accuracy.max_abs_error)
    stats.set_model_info(config.model_version, config.quantization.value, served.device_used)
    return served


def _warm_up(
    session_runner: runner.SessionRunner, served: model.OnnxModel, sizes: Sequence[int]
) -> None:
    for size in sizes:
        for _ in range(2):
            session_runner.run(session_runner.prepare([served.example_inputs(size)], size, size))


class _Backend:
    """Loads the model, runs its batcher, and warms every batch size up."""

    def __init__(self, config: settings.ServeSettings, stats: metrics.ModelMetrics) -> None:
        self.config = config
        self.stats = stats
        self.model: model.OnnxModel | None = None
        self.batcher: batching.Batcher | None = None
        self.signature: model.Signature | None = None

    async def start(self, *, bound_bytes: bool) -> batching.Batcher:
        config = self.config
        served = await asyncio.to_thread(load, config, self.stats)
        self.model = served
        self.signature = served.signature
        sizes = served.sizes
        session_runner = runner.SessionRunner(served, config.cuda_device_id)
        # Every size runs before traffic (each session's first run is slow), through both
        # pipeline slots so their buffers exist; warm-up is kept out of the metrics.
        await asyncio.to_thread(_warm_up, session_runner, served, sizes)
        self.batcher = batching.Batcher(
            session_runner,
            sizes=sizes,
            max_delay_s=config.max_batch_delay_ms / 1000,
            max_queue_size=config.max_queue_size,
            max_queue_bytes=config.max_queue_bytes if bound_bytes else None,
            stats=self.stats,
            pipelined=served.device_used == "cuda",
        )
        self.batcher.start()
        return self.batcher

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.model is not None:
            self.model.unload()


class Server:
    """Everything in one process."""

    def __init__(self, config: settings.ServeSettings) -> None:
        self.config = config
        self.stats = metrics.ModelMetrics(config.model_name)
        self.plane = dataplane.DataPlane(
            name=config.model_name, version=config.model_version, stats=self.stats
        )
        self._frontend = frontend.Frontend(config, self.plane)
        self._backend = _Backend(config, self.stats)

    @property
    def http_port(self) -> int:
        return self._frontend.http_port

    @property
    def grpc_port(self) -> int:
        return self._frontend.grpc_port

    @property
    def signature(self) -> model.Signature | None:
        return self._backend.signature

    async def start(self) -> None:
        await self._frontend.start()
        batcher = await self._backend.start(bound_bytes=True)
        assert self._backend.signature is not None
        self.plane.attach(self._backend.signature, batcher)
        self.plane.ready = True
        logger.info(
            "model %s version %s is ready", self.config.model_name, self.config.model_version
        )

    async def stop(self) -> None:
        was_ready, self.plane.ready = self.plane.ready, False
        await self._frontend.stop(drain=was_ready)
        self.plane.close()
        await self._backend.stop()
        logger.info("stopped")


class _WorkerProcess:
    """One front-end process and the engine's link to it."""

    def __init__(self, index: int, process: subprocess.Popen[bytes], channel: ipc.Channel) -> None:
        self.index = index
        self.process = process
        self.channel = channel


class Engine:
    """The model process behind front-end worker processes."""

    def __init__(self, config: settings.ServeSettings, workers: int) -> None:
        self.stats = metrics.ModelMetrics(config.model_name)
        self._backend = _Backend(config, self.stats)
        self._count = workers
        self._workers: list[_WorkerProcess] = []
        self._arenas: list[tuple[int, ipc.Arena]] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Held so the ports stay ours; the workers listen on them with SO_REUSEPORT.
        self._reserved = [_reserve(config.host, config.http_port)]
        self._reserved.append(_reserve(config.host, config.grpc_port))
        self.http_port = self._reserved[0].getsockname()[1]
        self.grpc_port = self._reserved[1].getsockname()[1]
        self.config = config.model_copy(
            update={"http_port": self.http_port, "grpc_port": self.grpc_port}
        )

    async def start(self) -> None:
        arena_bytes = max(self.config.max_queue_bytes // self._count, 1 << 20)
        for index in range(self._count):
            self._arenas.append(ipc.Arena.create(arena_bytes))
            await self._spawn(index)
        await self._backend.start(bound_bytes=False)
        for _, arena in self._arenas:
            self._pin(arena)
        for child in self._workers:
            self._send_ready(child)
        logger.info(
            "model %s version %s is ready behind %d workers",
            self.config.model_name,
            self.config.model_version,
            self._count,
        )

    async def _spawn(self, index: int) -> None:
        fd, _ = self._arenas[index]
        ours, theirs = socket.socketpair()
        env = os.environ | {worker.CONFIG_ENV: self.config.model_dump_json()}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modeldeploy_runtime.worker",
                str(index),
                str(theirs.fileno()),
                str(fd),
            ],
            env=env,
            pass_fds=(theirs.fileno(), fd),
        )
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child = _WorkerProcess(index, process, ipc.Channel(reader, writer))
        if index < len(self._workers):
            self._workers[index] = child
        else:
            self._workers.append(child)
        task = asyncio.get_running_loop().create_task(self._serve(child))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        if self._backend.signature is not None:
            self._send_ready(child)

    def _send_ready(self, child: _WorkerProcess) -> None:
        assert self._backend.signature is not None
        child.channel.send((ipc.READY, ipc.encode_signature(self._backend.signature)))

    async def _serve(self, child: _WorkerProcess) -> None:
        _, arena = self._arenas[child.index]
        link = ipc.WorkerLink(child.channel, arena, self._enqueue)
        while (messages := await child.channel.receive()) is not None:
            for message in messages:
                link.handle(message)
        returncode = await asyncio.to_thread(child.process.wait)
        metrics.process_exited(child.process.pid)
        if not self._stopping:
            logger.error("worker %d exited with %s; starting it again", child.index, returncode)
            # A fresh arena: the engine may still hold views of the old one's requests.
            self._arenas[child.index] = ipc.Arena.create(self._arenas[child.index][1].size)
            self._pin(self._arenas[child.index][1])
            await self._spawn(child.index)

    def _pin(self, arena: ipc.Arena) -> None:
        """On a GPU, requests are copied from the arenas straight to the device: pin them."""
        served = self._backend.model
        if served is not None and served.device_used == "cuda":
            runner.pin(arena.memory)

    def _enqueue(self, inputs: batching.Inputs, size: int) -> asyncio.Future[list[model.Array]]:
        if self._backend.batcher is None:
            raise batching.QueueFullError("the model is not loaded yet")
        return self._backend.batcher.enqueue(inputs, size)

    async def stop(self) -> None:
        self._stopping = True
        logger.info("stopping %d workers; they drain their in-flight requests", self._count)
        for child in self._workers:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        if self._readers:
            await asyncio.gather(*self._readers)
        await self._backend.stop()
        for sock in self._reserved:
            sock.close()
        logger.info("stopped")


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def serve(config: settings.ServeSettings, workers: int = 1) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runtime: Server | Engine = Server(config) if workers <= 1 else Engine(config, workers)
    try:
        starting = asyncio.ensure_future(runtime.start())
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stop_wait
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        await runtime.stop()
