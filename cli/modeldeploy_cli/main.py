"""`modeldeploy run ...` (the operator) and `modeldeploy serve -f md.yaml` (direct deployment)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: modeldeploy {run,serve} ...

  run     run the operator against the current cluster (needs the operator extra)
  serve   serve a ModelDeployment's model on this machine, no cluster needed (needs the runtime
          extra)

`modeldeploy <command> --help` describes a command's flags.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command == "run":
        from modeldeploy_operator import cli as operator_cli

        return operator_cli.main(args[1:])
    if command == "serve":
        from modeldeploy_cli import serve

        return serve.main(args[1:])
    if command in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    print(USAGE, end="", file=sys.stderr)
    print(f"modeldeploy: unknown command {command!r}" if command else "", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
