"""A front-end worker process: HTTP and gRPC in, tensors to the engine through shared memory.

Started by ``server.Engine`` as ``python -m modeldeploy_runtime.worker INDEX SOCKET_FD
ARENA_FD`` with the engine's settings in ``MODELDEPLOY_WORKER_CONFIG``.  It listens on the
pod's ports beside its siblings (SO_REUSEPORT spreads the connections), answers liveness at
once and readiness once the engine says the model is warm.  On SIGTERM (or when the engine
goes away) it reports not ready, stops accepting, finishes its in-flight requests, exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import uvloop

from modeldeploy_runtime import dataplane, frontend, ipc, metrics, settings

logger = logging.getLogger("modeldeploy_runtime.worker")

CONFIG_ENV = "MODELDEPLOY_WORKER_CONFIG"


async def _run(config: settings.ServeSettings, sock: socket.socket, arena: ipc.Arena) -> bool:
    """Serve until told to stop; False when the link to the engine failed."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    stats = metrics.ModelMetrics(config.model_name)
    plane = dataplane.DataPlane(name=config.model_name, version=config.model_version, stats=stats)
    listeners = frontend.Frontend(config, plane, reuse_port=True)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    channel = ipc.Channel(reader, writer)
    client = ipc.EngineClient(channel, arena)
    await listeners.start()

    async def listen() -> None:
        while (messages := await channel.receive()) is not None:
            for message in messages:
                kind = message[0]
                if kind == ipc.RESULTS:
                    client.deliver(message[1], message[2], message[3])
                elif kind == ipc.READY:
                    client.signature = ipc.decode_signature(message[1])
                    plane.attach(client.signature, client)
                    plane.ready = True
        client.fail_all("the model engine stopped")

    def listened(task: asyncio.Task[None]) -> None:
        # Without its link this worker can answer nothing: it exits, and the engine starts
        # another in its place.
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())
            logger.error("the link to the engine failed", exc_info=task.exception())
            client.fail_all("this front-end worker lost its link to the model engine")
        stopping.set()

    failed: list[BaseException | None] = []
    listener = loop.create_task(listen())
    listener.add_done_callback(listened)
    await stopping.wait()
    was_ready, plane.ready = plane.ready, False
    await listeners.stop(drain=was_ready and not failed)
    plane.close()
    listener.cancel()
    channel.close()
    return not failed


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker-{argv[0]} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = settings.ServeSettings.model_validate_json(os.environ[CONFIG_ENV])
    sock = socket.socket(fileno=int(argv[1]))
    arena = ipc.Arena.attach(int(argv[2]))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        ok = runner.run(_run(config, sock, arena))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
