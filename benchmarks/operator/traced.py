"""`modeldeploy` under tracemalloc: on SIGUSR1, writes where the live memory was allocated.

    python benchmarks/operator/traced.py OUT_DIR run --namespace ns ...

Writes OUT_DIR/<tag>-by-file.txt (top 40 by file:line), OUT_DIR/<tag>-by-traceback.txt (top 15
allocation sites with 12 frames each) and OUT_DIR/<tag>.snapshot (for `Snapshot.load` and
`compare_to`, say between 1000 and 3000 ModelDeployments), <tag> being the operator's namespace
and the dump's number. Tracing slows the operator and adds its own memory; the
figures are for where the memory goes, not for how much there is.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import tracemalloc
from pathlib import Path

from modeldeploy_cli import main

FRAMES = 12


def _dump(directory: Path, tag: str) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"traced now {current / 2**20:.1f} MiB, traced peak {peak / 2**20:.1f} MiB", ""]
    by_file = snapshot.statistics("lineno")[:40]
    lines += [str(stat) for stat in by_file]
    snapshot.dump(str(directory / f"{tag}.snapshot"))
    (directory / f"{tag}-by-file.txt").write_text("\n".join(lines) + "\n")
    stacks = []
    for stat in snapshot.statistics("traceback")[:15]:
        stacks.append(f"{stat.size / 2**20:.1f} MiB in {stat.count} blocks")
        stacks += [f"    {line}" for line in stat.traceback.format(limit=FRAMES)]
    (directory / f"{tag}-by-traceback.txt").write_text("\n".join(stacks) + "\n")


def traced(directory: Path, argv: list[str]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    numbers = itertools.count(1)
    namespace = argv[argv.index("--namespace") + 1] if "--namespace" in argv else "operator"
    signal.signal(
        signal.SIGUSR1,
        lambda *_: threading.Thread(
            target=_dump, args=(directory, f"{namespace}-{next(numbers)}")
        ).start(),
    )
    return main.main(argv)


if __name__ == "__main__":
    sys.exit(traced(Path(sys.argv[1]), sys.argv[2:]))
