"""``modeldeploy-runtime fetch`` (the init container) and ``modeldeploy-runtime serve``.

Every flag is also read from ``MODELDEPLOY_<FLAG>`` (dashes as underscores); a flag
given on the command line wins.  Flags default to ``None`` here so that pydantic
settings, not argparse, decide between the environment and the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic

from modeldeploy_contract import flags, values
from modeldeploy_runtime import fetch, settings

logger = logging.getLogger("modeldeploy_runtime")
# Where the kubelet reads a failed container's termination message (the pod's
# terminationMessagePath, which the builders leave at Kubernetes' default).
TERMINATION_LOG = Path("/dev/termination-log")


def _last_words(error: BaseException | str) -> None:
    """The error's first line as the container's termination message, when it runs in a pod:
    the ModelDeployment's condition shows it instead of the tail of the log."""
    lines = str(error).strip().splitlines()
    if TERMINATION_LOG.exists() and lines:
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(lines[0][:1024])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=flags.COMMAND,
        description="Fetch and serve one ONNX model over the Open Inference Protocol.",
        epilog="Every flag can also be set as MODELDEPLOY_<FLAG>, e.g. MODELDEPLOY_MAX_BATCH_SIZE.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser(
        flags.FETCH, help="download a model, verify its sha256, write it to DIR"
    )
    get.add_argument(
        flags.flag(flags.URI), help="https://, http://, s3://, gs://, pvc://<claim>/<path>, file://"
    )
    get.add_argument(
        flags.flag(flags.SHA256), help="expected hex digest; a mismatch exits non-zero"
    )
    get.add_argument(
        flags.flag(flags.DEST), metavar="DIR", help="directory to write the model into"
    )
    get.add_argument(
        flags.flag(flags.MAX_BYTES), type=int, help="fail when the file is larger than this"
    )

    run = commands.add_parser(flags.SERVE, help="serve a model over HTTP and gRPC")
    run.add_argument(flags.flag(flags.MODEL_PATH), metavar="P", help="the .onnx file")
    run.add_argument(flags.flag(flags.MODEL_NAME), metavar="N", help="name under /v2/models/<name>")
    run.add_argument(
        flags.flag(flags.MODEL_VERSION), metavar="V", help="version reported (default 1)"
    )
    run.add_argument(
        flags.flag(flags.QUANTIZATION), choices=[q.value for q in settings.Quantization]
    )
    run.add_argument(flags.flag(flags.CALIBRATION_PATH), metavar="C", help=".npz of sample inputs")
    run.add_argument(
        flags.flag(flags.WARMUP_PATH), metavar="W", help=".npz of one request's inputs to warm up"
    )
    run.add_argument(
        flags.flag(flags.WARMUP_SHAPES),
        metavar="JSON",
        help='input shapes to warm up with zeros, e.g. {"x": [1, 3, 224, 224]}',
    )
    run.add_argument(
        flags.flag(flags.VALIDATION_PATH),
        metavar="V",
        help=".npz of sample inputs (and expected.<output> arrays) the model must pass before "
        "it is ready",
    )
    for field, meaning in (
        (flags.MIN_AGREEMENT, "floor of the quantized model's agreement with the unquantized one"),
        (flags.MIN_ACCURACY, "floor of the accuracy against the expected outputs (0..1)"),
        (flags.VALIDATION_TOLERANCE, "relative and absolute tolerance of values (default 0.01)"),
    ):
        run.add_argument(flags.flag(field), type=float, help=meaning)
    run.add_argument(
        flags.flag(flags.MAX_BATCH_SIZE),
        type=int,
        help="examples per batch (default 32); 0 = never merge requests",
    )
    run.add_argument(
        flags.flag(flags.BATCH_SIZES),
        metavar="1,2,4",
        help="sizes batches are padded to (default: powers of two on a GPU, all on CPU)",
    )
    run.add_argument(
        flags.flag(flags.MAX_BATCH_DELAY_MS), type=float, help="longest wait to fill a batch (5)"
    )
    run.add_argument(
        flags.flag(flags.MAX_QUEUE_SIZE), type=int, help="queued requests before 429 (1024)"
    )
    run.add_argument(
        flags.flag(flags.MAX_QUEUE_BYTES), type=int, help="queued tensor bytes before 429"
    )
    run.add_argument(
        flags.flag(flags.WORKERS), type=int, help="front-end processes; 0 = derive (default)"
    )
    run.add_argument(
        flags.flag(flags.THREADS), type=int, help="ONNX Runtime threads; 0 = the CPU limit"
    )
    run.add_argument(flags.flag(flags.DEVICE), choices=[d.value for d in settings.Device])
    run.add_argument(
        flags.flag(flags.CUDNN_CONV_ALGO_SEARCH), choices=[s.value for s in settings.ConvAlgoSearch]
    )
    run.add_argument(
        flags.flag(flags.DRAIN_SECONDS), type=float, help="serving on after SIGTERM, not ready (10)"
    )
    run.add_argument(flags.flag(flags.HTTP_PORT), type=int, help="default 8080")
    run.add_argument(flags.flag(flags.GRPC_PORT), type=int, help="default 8081")
    run.add_argument(
        flags.flag(flags.PATH_PREFIX),
        metavar="/P",
        help="serve the HTTP routes under this prefix too (the Ingress or HTTPRoute path)",
    )
    run.add_argument(
        flags.flag(flags.PADDING),
        metavar="JSON",
        help='pad variable-length inputs to share batches: {"inputs": {"ids": {"axis": 1}}}',
    )
    return parser


def parse(argv: Sequence[str]) -> settings.FetchSettings | settings.ServeSettings:
    """The settings of a command line plus the environment, as the runtime would run them.

    Raises SystemExit on unknown flags (argparse) and pydantic.ValidationError on bad values.
    """
    args = _parser().parse_args(argv)
    given: dict[str, Any] = {
        key: value for key, value in vars(args).items() if key != "command" and value is not None
    }
    if args.command == flags.FETCH:
        return settings.FetchSettings(**given)
    return settings.ServeSettings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = parse(sys.argv[1:] if argv is None else argv)
        if isinstance(config, settings.FetchSettings):
            path = fetch.fetch(
                config.uri,
                config.dest,
                config.sha256,
                pvc_root=config.pvc_root,
                max_bytes=config.max_bytes,
            )
            print(path)
            return 0
    except pydantic.ValidationError as error:
        logger.error("invalid settings:\n%s", error)
        _last_words(f"invalid settings: {error}".replace("\n", " "))
        return 2
    except fetch.FetchError as error:
        logger.error("%s", error)
        _last_words(error)
        return 1
    return _serve(config)


def _serve(config: settings.ServeSettings) -> int:
    # Imported here so that `fetch` (the init container) does not load ONNX Runtime.
    import uvloop

    from modeldeploy_runtime import model

    device = model.resolve_device(config.device)
    workers = config.worker_count(device, model.cpu_limit())
    if workers > 1:
        # Before prometheus-client is imported: it picks its storage at import time.
        directory = config.cache_dir / f"metrics-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        # A restarted container has pid 1 again and the same /tmp: start from zero, or the
        # previous run's counters would be summed into this one's.
        for stale in directory.glob("*.db"):
            stale.unlink()
        os.environ[settings.METRICS_DIR_ENV] = str(directory)
    from modeldeploy_runtime import server, validation

    logger.info("serving on %s with %d front-end process(es)", device, workers)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(config, workers))
    except model.WarmupError as error:
        logger.error("%s", error)
        _last_words(error)
        return values.EXIT_WARMUP_FAILED
    except validation.ValidationError as error:
        logger.error("%s", error)
        _last_words(error)
        return values.EXIT_VALIDATION_FAILED
    except Exception as error:
        logger.exception("the runtime failed")
        _last_words(f"the runtime failed: {type(error).__name__}: {error}")
        return 1
    return 0
