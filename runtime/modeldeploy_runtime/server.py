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
    validation,
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
    reference = None
    if config.quantization is settings.Quantization.NONE:
        served = model.OnnxModel(path, session_config)
        served.load(sizes)
    else:
        reference = model.OnnxModel(path, session_config)
        reference.load()
        samples, unmeasured = (
            (quantization.load_samples(config.calibration_path, reference.inputs), "")
            if config.calibration_path is not None
            else quantization.random_samples(reference, config.warmup_shapes)
        )
        calibration = samples if config.quantization is settings.Quantization.STATIC_INT8 else None
        quantized = quantization.quantize(path, config.quantization, calibration, config.cache_dir)
        served = model.OnnxModel(quantized, session_config)
        served.load(sizes)
        # With the accuracy gate's samples, the agreement is measured on those (below).
        if config.validation_path is None:
            _measure_agreement(config, reference, served, samples, unmeasured, stats)
    if config.validation_path is not None:
        report = validation.check(
            config.validation_path,
            served,
            reference,
            min_agreement=config.min_agreement,
            min_accuracy=config.min_accuracy,
            tolerance=config.validation_tolerance,
        )
        for figure, value in (("agreement", report.agreement), ("accuracy", report.accuracy)):
            if value is not None:
                stats.set_validation(figure, value)
    if reference is not None:
        reference.unload()
    stats.set_model_info(config.model_version, config.quantization.value, served.device_used)
    return served


def _measure_agreement(
    config: settings.ServeSettings,
    reference: model.OnnxModel,
    served: model.OnnxModel,
    samples: dict[str, model.Array] | None,
    unmeasured: str,
    stats: metrics.ModelMetrics,
) -> None:
    """Logs and exports the quantized model's agreement with FP32 on the calibration or
    stand-in samples; only logs why when there are none."""
    if samples is None:
        logger.warning(
            "%s: agreement with FP32 not measured: %s", config.quantization.value, unmeasured
        )
        return
    accuracy = quantization.compare(reference, served, samples, config.validation_tolerance)
    logger.info(
        "%s vs FP32 on %d samples: agreement %.4f, max abs error %.6g",
        config.quantization.value,
        accuracy.samples,
        accuracy.top1_agreement,
        accuracy.max_abs_error,
    )
    stats.set_quantization_accuracy(accuracy.top1_agreement, accuracy.max_abs_error)


def _warm_up(
    session_runner: runner.SessionRunner, served: model.OnnxModel, example: batching.Inputs
) -> None:
    """Run every batch size twice (each session's first run is slow), or the example alone
    when requests are not merged; an output whose rows do not follow the batch turns
    merging off."""
    for size in served.sizes:
        inputs = model.batch_of(example, size)
        for _ in range(2):
            outputs = session_runner.run(session_runner.prepare([inputs], size, size))
        problem = model.row_problem(served.outputs, outputs, size)
        if problem is not None:
            served.unbatch(problem)
            break
    if not served.sizes:
        for _ in range(2):
            session_runner.run_once(example)


async def _warm_up_if_known(
    config: settings.ServeSettings, session_runner: runner.SessionRunner, served: model.OnnxModel
) -> None:
    """Warm up with what the user gave, else with what the model's dims say; never invent.

    A warm-up the user asked for that fails stops the start (model.WarmupError); one they
    did not ask for is only logged.
    """
    asked = config.warmup_path is not None or config.warmup_shapes is not None
    example, origin = model.warmup_example(served, config.warmup_shapes, config.warmup_path)
    if example is None:
        logger.warning("no warm-up: %s; the first requests will be slower", origin)
        return
    try:
        await asyncio.to_thread(_warm_up, session_runner, served, example)
    except Exception as error:
        if asked:
            raise model.WarmupError(f"the warm-up with {origin} failed: {error}") from error
        logger.warning("the warm-up with %s failed, serving without it: %s", origin, error)
        return
    logger.info(
        "warmed up with %s at batch sizes %s",
        origin,
        list(served.sizes) if served.sizes else "none (requests are not merged)",
    )


def _padding(config: settings.ServeSettings, served: model.Signature) -> batching.Padding | None:
    if config.padding is None:
        return None
    given = config.padding
    padding = batching.Padding.for_model(
        served,
        {name: (padded.axis, padded.value) for name, padded in given.inputs.items()},
        given.outputs,
        given.buckets,
    )
    cut = [served.outputs[index].name for index in padding.outputs]
    logger.info(
        "padding %s to %s; outputs cut back: %s",
        sorted(padding.inputs),
        f"the buckets {list(padding.buckets)}" if padding.buckets else "the longest in a batch",
        cut or "none",
    )
    return padding


class _Backend:
    """Loads the model, runs its batcher, and warms every batch size up."""

    def __init__(self, config: settings.ServeSettings, stats: metrics.ModelMetrics) -> None:
        self.config = config
        self.stats = stats
        self.model: model.OnnxModel | None = None
        self.batcher: batching.Batcher | batching.Unbatched | None = None
        self.signature: model.Signature | None = None

    async def start(self, *, bound_bytes: bool) -> batching.Batcher | batching.Unbatched:
        config = self.config
        served = await asyncio.to_thread(load, config, self.stats)
        self.model = served
        session_runner = runner.SessionRunner(served, config.cuda_device_id)
        # Every size runs before traffic (each session's first run is slow), through both
        # pipeline slots so their buffers exist; warm-up is kept out of the metrics.
        await _warm_up_if_known(config, session_runner, served)
        self.signature = served.signature
        max_queue_bytes = config.max_queue_bytes if bound_bytes else None
        padding = _padding(config, served.signature)
        if not served.sizes:
            self.batcher = batching.Unbatched(
                session_runner.run_once,
                concurrency=config.threads or model.cpu_limit(),
                max_queue_size=config.max_queue_size,
                max_queue_bytes=max_queue_bytes,
                stats=self.stats,
            )
        else:
            self.batcher = batching.Batcher(
                session_runner,
                padding=padding,
                sizes=served.sizes,
                max_delay_s=config.max_batch_delay_ms / 1000,
                max_queue_size=config.max_queue_size,
                max_queue_bytes=max_queue_bytes,
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
                try:
                    link.handle(message)
                except Exception:
                    # A message this engine cannot even read fails no one else's request.
                    logger.exception("worker %d sent a message that was dropped", child.index)
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
